"""Schedulers as small pure functions over arrays (host-side schedule + jittable step)."""

from xdit_jax.schedulers import cogvideox, ddim, ddpm, dpmsolver, flow_match, scm, unipc
from xdit_jax.schedulers.cogvideox import (
    INIT_NOISE_SIGMA,
    Schedule,
    SchedulerConfig,
    alphas_cumprod,
    ddim_step,
    dpm_step,
    dynamic_guidance_scale,
    guidance_scale_at,
    guidance_scales,
    init_state,
    make_schedule,
    step,
)

# diffusers scheduler class (scheduler_config.json's `_class_name`) -> (module, config class name).
# Each module has `<Config>.from_dict`, `make_schedule(cfg, ...)`, `init_state(...)` and
# `step(schedule, i, model_output, sample, state, ...)`; the CogVideoX config reads `_class_name`
# itself to pick DDIM or DPM.
SCHEDULERS = {
    "CogVideoXDDIMScheduler": (cogvideox, "SchedulerConfig"),
    "CogVideoXDPMScheduler": (cogvideox, "SchedulerConfig"),
    "DDIMScheduler": (ddim, "DDIMConfig"),
    "DDPMScheduler": (ddpm, "DDPMConfig"),
    "DPMSolverMultistepScheduler": (dpmsolver, "DPMSolverConfig"),
    "FlowMatchEulerDiscreteScheduler": (flow_match, "FlowMatchEulerConfig"),
    "SCMScheduler": (scm, "SCMConfig"),
    "UniPCMultistepScheduler": (unipc, "UniPCConfig"),
}


def scheduler_from_config(d):
    """(module, config) for a diffusers scheduler config dict, by its `_class_name` (see SCHEDULERS)."""
    name = d.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler _class_name {name!r} is not supported; supported: {', '.join(SCHEDULERS)}")
    module, cfg_name = SCHEDULERS[name]
    return module, getattr(module, cfg_name).from_dict(d)


def module_of(config):
    """The scheduler module (of :data:`SCHEDULERS`) whose config class ``config`` is."""
    for module, cfg_name in SCHEDULERS.values():
        if type(config) is getattr(module, cfg_name):
            return module
    raise TypeError(f"{type(config).__name__} is not a scheduler config of xdit_jax.schedulers.")


__all__ = [
    "INIT_NOISE_SIGMA",
    "SCHEDULERS",
    "module_of",
    "Schedule",
    "SchedulerConfig",
    "alphas_cumprod",
    "ddim_step",
    "dpm_step",
    "dynamic_guidance_scale",
    "guidance_scale_at",
    "guidance_scales",
    "init_state",
    "make_schedule",
    "scheduler_from_config",
    "step",
]
