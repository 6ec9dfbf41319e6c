"""diffusers' `DDIMScheduler` as pure functions.

This is the scheduler Latte-1 ships with (linear betas 0.0001 .. 0.02 over 1000 steps, epsilon
prediction, no clipping). Everything that depends only on the config, the step count and ``eta``
is computed once on the host (`make_schedule`, numpy float32 replaying diffusers' 0-d float32
tensor arithmetic); `step` indexes those arrays with the (possibly traced) step index and does
elementwise float32 math, so it sits inside one jitted denoising step. DDIM keeps no state
between steps (`init_state` returns ()).

Step i, with t = timesteps[i] and diffusers' t' = t - num_train_timesteps // num_inference_steps
(not the next schedule entry: the two differ for "trailing"/"linspace" spacings whose steps are not
that stride; diffusers uses t' all the same), a = alphas_cumprod[t], a' = alphas_cumprod[t'] (or
``final_alpha_cumprod`` where t' < 0: 1 with set_alpha_to_one, else alphas_cumprod[0])::

    x0   = (sample - sqrt(1 - a) * model_output) / sqrt(a);  eps = model_output     # epsilon
         = sqrt(a) * sample - sqrt(1 - a) * model_output;     eps = sqrt(a) * model_output + sqrt(1 - a) * sample
         = model_output;                                      eps = (sample - sqrt(a) * x0) / sqrt(1 - a)  # sample
    x0   = clip(x0, -clip_sample_range, clip_sample_range)                             # if clip_sample
    std  = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    prev = sqrt(a') * x0 + sqrt(1 - a' - std^2) * eps + std * noise

``eta`` > 0 (DDIM's stochastic variant) needs ``noise`` (standard normal, the sample's shape; diffusers
draws it inside `step` from its generator, the pipelines here from a JAX key): the schedule says so with
``needs_noise``. ``use_clipped_model_output`` is not supported (diffusers' pipelines never pass it).

Not supported (ValueError from `DDIMConfig`): thresholding, beta_schedule other than linear /
scaled_linear / squaredcos_cap_v2 (diffusers raises for them too), timestep_spacing other than
leading / trailing / linspace.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.config_util import FromConfigDict
from xdit_jax.schedulers.dpmsolver import _betas, _cumprod32

__all__ = ["INIT_NOISE_SIGMA", "DDIMConfig", "DDIMSchedule", "alphas_cumprod", "init_state", "make_schedule",
           "step"]

INIT_NOISE_SIGMA = 1.0  # diffusers' init_noise_sigma; scale_model_input is the identity

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class DDIMConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `DDIMScheduler` (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # only with thresholding (unsupported)
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0  # only with thresholding (unsupported)
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

        def bad(msg):
            raise ValueError(f"DDIMScheduler config: {msg}")

        if self.prediction_type not in _PREDICTION_TYPES:
            bad(f"prediction_type {self.prediction_type!r} is not one of {_PREDICTION_TYPES}")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            bad(f"beta_schedule {self.beta_schedule!r} is not supported; use one of {_BETA_SCHEDULES}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            bad(f"trained_betas has {len(self.trained_betas)} entries for {self.num_train_timesteps} timesteps")
        if self.timestep_spacing not in _SPACINGS:
            bad(f"timestep_spacing {self.timestep_spacing!r} is not one of {_SPACINGS}")
        if self.thresholding:
            bad("thresholding=True (dynamic thresholding) is not supported; clip_sample is")
        if self.num_train_timesteps < 1:
            bad(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


def alphas_cumprod(cfg: DDIMConfig) -> np.ndarray:
    """diffusers' float32 ``scheduler.alphas_cumprod``."""
    return _cumprod32(_F32(1) - _betas(cfg))


def _timesteps(cfg: DDIMConfig, n: int) -> np.ndarray:
    """diffusers' ``DDIMScheduler.set_timesteps(n)`` (int64), computed the same way."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sqrt_alpha", "sqrt_beta", "sqrt_alpha_prev", "c_eps", "c_noise"],
    meta_fields=["prediction_type", "clip_sample", "clip_sample_range", "num_inference_steps", "needs_noise"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """Timesteps and per-step float32 scalars (a pytree: arrays are leaves)."""

    prediction_type: str
    clip_sample: bool
    clip_sample_range: float
    num_inference_steps: int
    needs_noise: bool  # eta > 0 somewhere: `step` needs `noise`
    timesteps: np.ndarray  # int64, the model's t
    sqrt_alpha: np.ndarray  # sqrt(a)
    sqrt_beta: np.ndarray  # sqrt(1 - a)
    sqrt_alpha_prev: np.ndarray  # sqrt(a')
    c_eps: np.ndarray  # sqrt(1 - a' - std^2)
    c_noise: np.ndarray  # std = eta * sqrt(variance)

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def make_schedule(cfg: DDIMConfig, num_inference_steps: int, eta: float = 0.0) -> DDIMSchedule:
    """Host-side precomputation, as diffusers' ``set_timesteps(num_inference_steps)`` and the scalars of
    ``step(..., eta=eta)``."""
    T, n = cfg.num_train_timesteps, int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if n > T:
        raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (DDIM's noise weight; 0 is deterministic), got {eta!r}")
    ts = _timesteps(cfg, n)
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"diffusers' {cfg.timestep_spacing!r} spacing with num_inference_steps={n}, steps_offset="
                         f"{cfg.steps_offset} gives timesteps outside [0, {T}): {ts.tolist()}; use another "
                         "num_inference_steps, steps_offset or timestep_spacing")
    ac = alphas_cumprod(cfg)
    final = _F32(1) if cfg.set_alpha_to_one else ac[0]
    prev = ts - T // n
    one = _F32(1)
    a = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
    b, b_prev = one - a, one - a_prev
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (b_prev / b) * (one - a / a_prev)
        std = (_F32(eta) * np.sqrt(var)).astype(np.float32)
        c_eps = np.sqrt(one - a_prev - std * std)
    cols = dict(sqrt_alpha=np.sqrt(a), sqrt_beta=np.sqrt(b), sqrt_alpha_prev=np.sqrt(a_prev), c_eps=c_eps,
                c_noise=std)
    for name, c in cols.items():
        if not np.all(np.isfinite(c)):
            raise ValueError(f"non-finite DDIM {name} for timesteps {ts.tolist()} (a zero beta, or eta too large "
                             f"for 1 - a' - std^2 >= 0)")
    return DDIMSchedule(prediction_type=cfg.prediction_type, clip_sample=bool(cfg.clip_sample),
                        clip_sample_range=float(cfg.clip_sample_range), num_inference_steps=n,
                        needs_noise=bool(eta > 0), timesteps=ts,
                        **{k: np.asarray(v, np.float32) for k, v in cols.items()})


def init_state(sample_shape=None, dtype=jnp.float32):
    """DDIM carries nothing between steps."""
    del sample_shape, dtype
    return ()


def step(sched: DDIMSchedule, i, model_output, sample, state=(), noise=None):
    """``DDIMScheduler.step(model_output, timesteps[i], sample, eta)`` at step index i, in float32;
    returns (prev_sample in the sample's dtype, state). ``noise``: needed where ``sched.needs_noise``."""
    at = lambda arr: jnp.asarray(arr)[i]  # noqa: E731
    s = jnp.asarray(sample).astype(jnp.float32)
    m = jnp.asarray(model_output).astype(jnp.float32)
    sa, sb = at(sched.sqrt_alpha), at(sched.sqrt_beta)
    p = sched.prediction_type
    if p == "epsilon":
        x0, eps = (s - sb * m) / sa, m
    elif p == "v_prediction":
        x0, eps = sa * s - sb * m, sa * m + sb * s
    else:  # sample
        x0 = m
        eps = (s - sa * x0) / sb
    if sched.clip_sample:
        r = np.float32(sched.clip_sample_range)
        x0 = jnp.clip(x0, -r, r)
    prev = at(sched.sqrt_alpha_prev) * x0 + at(sched.c_eps) * eps
    if sched.needs_noise:
        if noise is None:
            raise ValueError("this DDIM schedule has eta > 0: pass noise (standard normal, the sample's shape)")
        prev = prev + at(sched.c_noise) * jnp.asarray(noise).astype(jnp.float32)
    return prev.astype(jnp.asarray(sample).dtype), state
