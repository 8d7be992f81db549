"""Inference schedulers by short name, built from the model folder's scheduler config.

The config carries the training schedule (betas or sigmas, prediction_type, steps_offset), so an
SD2.1 v-prediction folder samples as v-prediction with any of these without further settings.

Each scheduler belongs to one noise schedule, the one its updates assume: "ddpm" (betas over
1000 steps; SD1.x/2.x, SDXL) or "edm" (sigmas with EDM's input and output preconditioning;
Playground v2.5). A model samples only with the schedulers of its family's `noise_schedule`:
a DDPM scheduler built from an EDM config would run on default betas, silently another model.
"""
from ..errors import UserError

# name -> (mindone.diffusers class, options on top of the folder's config, noise schedule)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "ddpm"),
    "euler": ("EulerDiscreteScheduler", {}, "ddpm"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "ddpm"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "ddpm"),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "ddpm",
    ),
    "edm_euler": ("EDMEulerScheduler", {}, "edm"),
    "edm_dpm++_2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "edm"),
}


def schedulers_for(noise_schedule: str) -> list:
    """The scheduler names that apply to a model trained on `noise_schedule`."""
    return [name for name, (_, _, schedule) in SCHEDULERS.items() if schedule == noise_schedule]


def check_scheduler(name: str, noise_schedule: str = "ddpm") -> None:
    """One line when `name` is unknown or assumes another noise schedule than the model's."""
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler: '{name}' is not one of {', '.join(SCHEDULERS)}")
    if SCHEDULERS[name][2] != noise_schedule:
        raise UserError(f"--scheduler: '{name}' assumes the {SCHEDULERS[name][2].upper()} noise schedule and this "
                        f"model was trained on the {noise_schedule.upper()} one; choose one of "
                        f"{', '.join(schedulers_for(noise_schedule))}")


def make_scheduler(name: str, config, noise_schedule: str = "ddpm"):
    """A fresh scheduler `name` from a scheduler config (e.g. components.noise_scheduler.config)."""
    import mindone.diffusers

    check_scheduler(name, noise_schedule)
    class_name, options, _ = SCHEDULERS[name]
    return getattr(mindone.diffusers, class_name).from_config(dict(config), **options)
