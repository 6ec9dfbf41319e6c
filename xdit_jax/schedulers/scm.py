"""diffusers' `SCMScheduler` (Sana Sprint's continuous-time consistency sampler, "trigflow") as pure functions.

Sana Sprint's hub `scheduler_config.json` is (diffusers' conversion script)::

    {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}

`make_schedule` is `set_timesteps` on the host (numpy): n + 1 angles in [0, pi/2], from
``[max_timesteps, intermediate_timesteps, 0]`` (two steps, Sprint's default), ``linspace(max_timesteps, 0, n + 1)``,
or custom ``timesteps`` (n + 1 of them), each float32 as diffusers', with their float32 cos / sin. Step i, with
s = timesteps[i] and t = timesteps[i + 1] (diffusers' step index from the start, its pipeline's
``set_begin_index(0)``)::

    x0   = cos(s) * sample - sin(s) * model_output          # trigflow
    prev = cos(t) * x0 + sin(t) * sigma_data * noise

diffusers draws `noise` (standard normal) inside `step` at every step (the schedule always has more than one
timestep); here the caller passes it. At t = 0 (the default schedules' last step) sin(t) = 0 and prev = x0. The
state carried between steps is the last x0 (diffusers' `pred_original_sample`, the ``denoised`` its pipeline decodes
at the end): `init_state` gives zeros, `step` returns (prev, x0).

Precision: the per-step cos / sin are numpy float32 of the float32 angles (correctly rounded; torch's float32 cos /
sin agree to ~1 ulp); the update is float32 as diffusers'. Not supported (ValueError, as diffusers):
prediction_type other than "trigflow".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.config_util import FromConfigDict

INIT_NOISE_SIGMA = 1.0  # diffusers' init_noise_sigma (Sana Sprint's pipeline multiplies by sigma_data itself)
MAX_TIMESTEPS = 1.57080  # diffusers' set_timesteps / SanaSprintPipeline defaults
INTERMEDIATE_TIMESTEPS = 1.3


@dataclasses.dataclass(frozen=True)
class SCMConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `SCMScheduler` (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    prediction_type: str = "trigflow"
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.prediction_type != "trigflow":
            raise ValueError(f"SCMScheduler config: unsupported prediction_type {self.prediction_type!r}; "
                             "only 'trigflow' (as diffusers).")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


@functools.partial(jax.tree_util.register_dataclass, data_fields=["timesteps", "cos", "sin"],
                   meta_fields=["num_inference_steps", "sigma_data"])
@dataclasses.dataclass(frozen=True, eq=False)
class SCMSchedule:
    """n + 1 float32 angles (diffusers' `scheduler.timesteps`, the last one the end point) and their cos / sin.
    A pytree (arrays are leaves)."""

    num_inference_steps: int
    sigma_data: float  # the config's: the step noise's standard deviation
    timesteps: np.ndarray
    cos: np.ndarray
    sin: np.ndarray

    @property
    def needs_noise(self) -> bool:
        return True

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def make_schedule(cfg: SCMConfig, num_inference_steps: int, *, timesteps=None,
                  max_timesteps: float | None = MAX_TIMESTEPS,
                  intermediate_timesteps: float | None = INTERMEDIATE_TIMESTEPS) -> SCMSchedule:
    """diffusers' `SCMScheduler.set_timesteps(num_inference_steps, timesteps, max_timesteps=,
    intermediate_timesteps=)`, with its checks."""
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if n > cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps {n} cannot be larger than num_train_timesteps "
                         f"{cfg.num_train_timesteps}.")
    if timesteps is not None and len(timesteps) != n + 1:
        raise ValueError("If providing custom timesteps, `timesteps` must be of length `num_inference_steps + 1`.")
    if timesteps is not None and max_timesteps is not None:
        raise ValueError("If providing custom timesteps, `max_timesteps` should not be provided.")
    if timesteps is None and max_timesteps is None:
        raise ValueError("Should provide either `timesteps` or `max_timesteps`.")
    if intermediate_timesteps is not None and n != 2:
        raise ValueError("Intermediate timesteps for SCM is not supported when num_inference_steps != 2 "
                         "(pass intermediate_timesteps=None for other step counts).")
    if timesteps is not None:
        ts = np.asarray(timesteps, np.float32).reshape(-1)
    elif intermediate_timesteps is not None:
        ts = np.array([max_timesteps, intermediate_timesteps, 0], np.float32)
    else:
        ts = _linspace_f32(float(max_timesteps), 0.0, n + 1)
    return SCMSchedule(num_inference_steps=n, sigma_data=float(cfg.sigma_data), timesteps=ts, cos=np.cos(ts), sin=np.sin(ts))


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32: the step in float32, the first half from ``start``, the
    second from ``end`` (torch's CPU kernel)."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    return np.where(i < half, np.float32(start) + step * i.astype(np.float32),
                    np.float32(end) - step * (steps - i - 1).astype(np.float32)).astype(np.float32)


def init_state(sample_shape, dtype=jnp.float32):
    """The last predicted x0 (diffusers' `pred_original_sample`): zeros before the first step."""
    return jnp.zeros(sample_shape, dtype)


def step(sched: SCMSchedule, i, model_output, sample, state=None, noise=None):
    """One `SCMScheduler.step(model_output, timesteps[i], sample)` at step index i (may be traced).
    noise: standard normal, the sample's shape (diffusers' draw; scaled by sigma_data here). Computed in float32;
    returns (prev_sample in the sample's dtype, x0 in float32 as the new state)."""
    del state
    if noise is None:
        raise ValueError("SCMScheduler's step adds noise: pass noise (standard normal, the sample's shape).")
    s = jnp.asarray(sample).astype(jnp.float32)
    m = jnp.asarray(model_output).astype(jnp.float32)
    at = lambda a, j: jnp.asarray(a)[j]  # noqa: E731
    x0 = at(sched.cos, i) * s - at(sched.sin, i) * m
    prev = at(sched.cos, i + 1) * x0 + at(sched.sin, i + 1) * (jnp.asarray(noise).astype(jnp.float32) * sched.sigma_data)
    return prev.astype(jnp.asarray(sample).dtype), x0


__all__ = ["SCMConfig", "SCMSchedule", "INIT_NOISE_SIGMA", "make_schedule", "init_state", "step"]
