"""Errors that carry one clear line for the user."""


class UserError(ValueError):
    """Bad input from the user (config, flag, file): the message is one line naming the culprit."""


class NonFiniteSamples(UserError):
    """Sampling gave non-finite latents (black images): the sample command refuses; training's
    validation reports it and trains on (a validation is a look at the weights, not a step)."""


class ModelFolderError(UserError):
    """A diffusers model folder is missing a piece or holds something that does not fit."""
