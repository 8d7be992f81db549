"""Errors that carry one clear line for the user."""


class UserError(ValueError):
    """Bad input from the user (config, flag, file): the message is one line naming the culprit."""


class ModelFolderError(UserError):
    """A diffusers model folder is missing a piece or holds something that does not fit."""
