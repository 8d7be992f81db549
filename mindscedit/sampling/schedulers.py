"""Inference schedulers by short name, built from the model folder's scheduler config.

The config carries the training schedule (betas, prediction_type, steps_offset), so an SD2.1
v-prediction folder samples as v-prediction with any of these without further settings.
"""
from ..errors import UserError

# name -> (mindone.diffusers class, options on top of the folder's config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}


def make_scheduler(name: str, config):
    """A fresh scheduler `name` from a scheduler config (e.g. components.noise_scheduler.config)."""
    import mindone.diffusers

    if name not in SCHEDULERS:
        raise UserError(f"--scheduler: '{name}' is not one of {', '.join(SCHEDULERS)}")
    class_name, options = SCHEDULERS[name]
    return getattr(mindone.diffusers, class_name).from_config(dict(config), **options)
