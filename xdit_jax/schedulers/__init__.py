"""Schedulers as small pure functions over arrays (host-side schedule + jittable step)."""

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

__all__ = [
    "INIT_NOISE_SIGMA",
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
    "step",
]
