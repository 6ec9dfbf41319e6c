"""diffusers' `DDPMScheduler` (ancestral DDPM sampling) as pure functions.

This is the scheduler HunyuanDiT ships with. Its hub `scheduler_config.json` is (the values of
HunyuanDiT's own `SAMPLER_FACTORY["ddpm"]`; variance_type and timestep_spacing are diffusers'
defaults)::

    {"beta_start": 0.00085, "beta_end": 0.03, "beta_schedule": "scaled_linear",
     "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
     "steps_offset": 1, "variance_type": "fixed_small", "timestep_spacing": "leading"}

Everything that depends only on the config and the step count is computed once on the host
(`make_schedule`, numpy): the timesteps and, per step index `i`, the scalars diffusers computes
inside `step` (from alphas_cumprod at t and at the previous timestep). `step` only indexes those
arrays with `i` (which may be traced) and does elementwise float32 math, so it sits inside one
jitted denoising step. DDPM keeps no state between steps (`init_state` returns ()).

Step i, with t = timesteps[i] and t' = the next timestep in the schedule (-1 after the last,
where alphas_cumprod is taken as 1), is::

    x0   = (sample - sqrt_beta_prod[i] * model_output) / sqrt_alpha_prod[i]     # epsilon
         = sqrt_alpha_prod[i] * sample - sqrt_beta_prod[i] * model_output       # v_prediction
         = model_output                                                         # sample
    x0   = clip(x0, -clip_sample_range, clip_sample_range)                      # if clip_sample
    prev = c_x0[i] * x0 + c_sample[i] * sample + c_noise[i] * noise

with sqrt_alpha_prod = sqrt(ac[t]), sqrt_beta_prod = sqrt(1 - ac[t]), DDPM's posterior-mean
coefficients c_x0 = sqrt(ac[t']) (1 - ac[t] / ac[t']) / (1 - ac[t]),
c_sample = sqrt(ac[t] / ac[t']) (1 - ac[t']) / (1 - ac[t]), and c_noise the standard deviation
of the variance type ("fixed_small": the posterior variance (1 - ac[t']) / (1 - ac[t]) beta_t,
clamped to >= 1e-20, "fixed_large": beta_t = 1 - ac[t] / ac[t']; "fixed_small_log" is
"fixed_small" through exp(0.5 log(.)) as diffusers). diffusers adds noise iff t > 0 (not "unless
this is the last step": with "leading" spacing and steps_offset=1 the last timestep is 1 and gets
noise, of std 1e-10 for "fixed_small"); c_noise is 0 exactly where t == 0.

How diffusers' `HunyuanDiTPipeline` drives it (and what `step` mirrors)::

    scheduler.set_timesteps(num_inference_steps)              # -> make_schedule(cfg, n)
    latents = randn(...) * scheduler.init_noise_sigma         # INIT_NOISE_SIGMA = 1.0
    for i, t in enumerate(scheduler.timesteps):
        x = cat([latents] * 2)                                # CFG; scale_model_input = identity
        t_expand = tensor([t] * x.shape[0]).to(x.dtype)       # the transformer's timestep: the
        noise_pred = transformer(x, t_expand, ...)[0]         #   integer t cast to latent dtype
        noise_pred, _ = noise_pred.chunk(2, dim=1)            # drop the learned-variance channels
        noise_pred = uncond + guidance_scale * (text - uncond)   # (+ optional guidance_rescale)
        latents = scheduler.step(noise_pred, t, latents, generator=generator)[0]

diffusers draws the step noise inside `step` (`randn_tensor(model_output.shape, generator)`, only
when t > 0); here the caller passes `noise` (standard normal, shape of the sample).

Precision. The per-step scalars replay diffusers' float32 0-d tensor arithmetic in numpy float32
(same operations in the same order, from float32 alphas_cumprod bit-equal to torch's for the
linear / scaled_linear / cosine schedules; numpy's sqrt / log / exp are correctly rounded, torch's
float32 sqrt (MKL) is occasionally 1 ulp off), so they agree with diffusers' to ~1 ulp. The step
is computed in float32 and returns the sample's dtype (diffusers computes in the model output's
dtype). Trajectories agree with diffusers' to float32 rounding, not bit for bit: a few ulps of
max|x| over tens of steps, ~10 over 1000 jitted steps (XLA fuses the update and rounds slightly
differently from torch's separate ops). Epsilon prediction at a low-SNR timestep is
ill-conditioned: x0 = (x - sqrt(1 - a) eps) / sqrt(a) cancels, and half an ulp of rounding in
sqrt(1 - a) eps reaches the next sample times c_x0 / sqrt(a) (420 for a 2-step "linspace"
schedule 999 -> 0 with HunyuanDiT's betas; < 2 for ordinary schedules). There the jitted step
(fused multiply-add) lands within a few ulps of a float64 evaluation while diffusers' result is
~170 ulps off it. "fixed_small_log" equals "fixed_small" up to rounding (exp(0.5 log v) = sqrt v).

Not supported (ValueError from `DDPMConfig`): thresholding, beta_schedule "sigmoid" / "laplace",
variance_type "learned" / "learned_range" (the model's variance half would be needed; HunyuanDiT's
pipeline drops it, and diffusers' step then fails for these types), variance_type
"fixed_large_log" (diffusers' step takes the square root of log(beta_t) < 0: every sample is NaN;
"fixed_large" is the intended std sqrt(beta_t)). `make_schedule` raises where diffusers'
`set_timesteps` would produce a timestep outside [0, num_train_timesteps) ("leading" with
steps_offset=1 and n == num_train_timesteps; "trailing" for the n whose numpy arange overshoots,
e.g. 61 of 1000, giving n + 1 timesteps ending in -1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.config_util import FromConfigDict
from xdit_jax.schedulers.dpmsolver import _betas, _cumprod32, _exp32, _log32

__all__ = [
    "INIT_NOISE_SIGMA",
    "DDPMConfig",
    "DDPMSchedule",
    "alphas_cumprod",
    "init_state",
    "make_schedule",
    "predict_x0",
    "step",
]

# Standard deviation of the initial noise: latents = randn * INIT_NOISE_SIGMA (diffusers'
# `scheduler.init_noise_sigma`, 1.0 for this scheduler; `scale_model_input` is the identity).
INIT_NOISE_SIGMA = 1.0

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclasses.dataclass(frozen=True)
class DDPMConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `DDPMScheduler` (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # only used with thresholding (unsupported)
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0  # only used with thresholding (unsupported)
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        self._validate()

    def _validate(self):
        def bad(msg):
            raise ValueError(f"DDPMScheduler config: {msg}")

        if self.variance_type in ("learned", "learned_range"):
            bad(f"variance_type {self.variance_type!r} is not supported: it needs the model's predicted "
                "variance, which HunyuanDiT-style pipelines drop (noise_pred.chunk(2, dim=1)) before step, "
                "and diffusers' step then fails; use one of " + ", ".join(map(repr, _VARIANCE_TYPES)))
        if self.variance_type == "fixed_large_log":
            bad("variance_type 'fixed_large_log' is not supported: diffusers' DDPMScheduler.step takes the "
                "square root of log(beta_t) < 0, so every sample with t > 0 is NaN; 'fixed_large' is the "
                "intended noise std sqrt(beta_t)")
        if self.variance_type not in _VARIANCE_TYPES:
            bad(f"variance_type {self.variance_type!r} is not one of {_VARIANCE_TYPES}")
        if self.prediction_type not in _PREDICTION_TYPES:
            bad(f"prediction_type {self.prediction_type!r} is not one of {_PREDICTION_TYPES}")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            bad(f"beta_schedule {self.beta_schedule!r} is not supported; use one of {_BETA_SCHEDULES} "
                "(or pass trained_betas)")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            bad(f"trained_betas has {len(self.trained_betas)} entries, num_train_timesteps is "
                f"{self.num_train_timesteps}")
        if self.timestep_spacing not in _SPACINGS:
            bad(f"timestep_spacing {self.timestep_spacing!r} is not one of {_SPACINGS}")
        if self.thresholding:
            bad("thresholding=True (dynamic thresholding) is not supported; only thresholding=False "
                "(clip_sample / clip_sample_range are supported)")
        if self.clip_sample and not self.clip_sample_range > 0:
            bad(f"clip_sample_range must be > 0 with clip_sample=True, got {self.clip_sample_range!r}")
        if self.num_train_timesteps < 1:
            bad(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


# ----------------------------------------------------------------------------------------------
# Host-side precomputation (numpy), replaying diffusers' torch arithmetic and dtypes.

_F32 = np.float32


def alphas_cumprod(cfg: DDPMConfig) -> np.ndarray:
    """The scheduler's float32 `alphas_cumprod` (diffusers' `scheduler.alphas_cumprod`).

    Unlike DPM-Solver, DDPM keeps alphas_cumprod[-1] == 0 under rescale_betas_zero_snr.
    """
    return _cumprod32(_F32(1) - _betas(cfg))


def _spaced_timesteps(cfg: DDPMConfig, n: int) -> np.ndarray:
    """diffusers' `DDPMScheduler.set_timesteps(n)` timesteps (int64), computed the same way."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    # trailing (no steps_offset, as diffusers)
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "prev_timesteps", "sqrt_alpha_prod", "sqrt_beta_prod", "c_x0", "c_sample",
                 "c_noise"],
    meta_fields=["prediction_type", "variance_type", "clip_sample", "clip_sample_range", "num_inference_steps",
                 "needs_noise"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """Timesteps and per-step coefficients; per-step arrays have length num_inference_steps.

    Step i converts the model output to x0 with sqrt_alpha_prod[i], sqrt_beta_prod[i], clips it
    (if clip_sample), then prev = c_x0 * x0 + c_sample * sample + c_noise * noise.

    A pytree (arrays are leaves), so it can be closed over or passed into `jax.jit`.
    """

    prediction_type: str
    variance_type: str
    clip_sample: bool
    clip_sample_range: float
    num_inference_steps: int
    needs_noise: bool  # whether any step adds noise (c_noise != 0), i.e. `step` needs `noise`
    timesteps: np.ndarray  # int64: diffusers' scheduler.timesteps after set_timesteps (the model's t)
    prev_timesteps: np.ndarray  # int64: diffusers' previous_timestep(t) (-1 after the last step)
    sqrt_alpha_prod: np.ndarray  # float32: sqrt(alphas_cumprod[t])
    sqrt_beta_prod: np.ndarray  # float32: sqrt(1 - alphas_cumprod[t])
    c_x0: np.ndarray  # float32: pred_original_sample_coeff
    c_sample: np.ndarray  # float32: current_sample_coeff
    c_noise: np.ndarray  # float32: std of the added noise (0 where t == 0)

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def _step_scalars(cfg: DDPMConfig, ac: np.ndarray, ts: np.ndarray, prev: np.ndarray):
    """diffusers' float32 scalars of step(t) for every step (elementwise, the same float32 operations
    in the same order as diffusers' 0-d tensors): sqrt a_t, sqrt(1 - a_t), c_x0, c_sample, noise std."""
    one = _F32(1)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], one).astype(np.float32)
    b_t = one - a_t
    b_prev = one - a_prev
    cur_a = a_t / a_prev
    cur_b = one - cur_a
    c_x0 = (np.sqrt(a_prev) * cur_b) / b_t
    c_sample = np.sqrt(cur_a) * b_prev / b_t
    # _get_variance: the posterior variance, clamped so that its log is finite
    var = np.maximum((one - a_prev) / (one - a_t) * cur_b, _F32(1e-20))
    if cfg.variance_type == "fixed_small":
        std = np.sqrt(var)
    elif cfg.variance_type == "fixed_small_log":
        std = _exp32(_F32(0.5) * _log32(var))
    else:  # fixed_large
        std = np.sqrt(cur_b)
    std = np.where(ts > 0, std, _F32(0))  # diffusers adds noise only where t > 0
    return tuple(np.asarray(x, np.float32) for x in (np.sqrt(a_t), np.sqrt(b_t), c_x0, c_sample, std))


def make_schedule(cfg: DDPMConfig, num_inference_steps: int | None = None, *,
                  timesteps: Sequence[int] | None = None) -> DDPMSchedule:
    """Host-side precomputation, as diffusers' `set_timesteps(num_inference_steps)`.

    `timesteps`: custom timesteps instead of num_inference_steps, as `set_timesteps(timesteps=...)`
    (strictly descending, within [0, num_train_timesteps)).
    """
    T = cfg.num_train_timesteps
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        ts = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        if ts.size < 1:
            raise ValueError("timesteps must not be empty")
        if np.any(ts[1:] >= ts[:-1]):
            raise ValueError(f"custom timesteps must be in strictly descending order, got {ts.tolist()}")
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, {T}), got {ts.tolist()}")
    else:
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or timesteps")
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if n > T:
            raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
        ts = _spaced_timesteps(cfg, n)
        if len(ts) != n or ts.max() >= T or ts.min() < 0:
            raise ValueError(
                f"diffusers' {cfg.timestep_spacing!r} spacing with num_inference_steps={n}, steps_offset="
                f"{cfg.steps_offset}, num_train_timesteps={T} gives {len(ts)} timesteps {ts.tolist()}, not {n} "
                f"within [0, {T}) (diffusers would index alphas_cumprod out of range or wrap around); use "
                "another num_inference_steps or timestep_spacing")
    n = len(ts)
    if np.any(ts[1:] >= ts[:-1]):  # cannot happen for the spacings; diffusers' previous_timestep assumes it
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
    ac = alphas_cumprod(cfg)
    # diffusers' previous_timestep(t): the next entry of the schedule, -1 after the last one.
    prev = np.concatenate([ts[1:], [-1]]).astype(np.int64)
    names = ("sqrt_alpha_prod", "sqrt_beta_prod", "c_x0", "c_sample", "c_noise")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cols = dict(zip(names, _step_scalars(cfg, ac, ts, prev)))
    for name, c in cols.items():
        if not np.all(np.isfinite(c)):
            bad = np.nonzero(~np.isfinite(c))[0].tolist()
            raise ValueError(f"non-finite {name} at step indices {bad} (timesteps {ts.tolist()}): "
                             "alphas_cumprod[t] == 1 somewhere (a zero beta in trained_betas?)")
    if cfg.prediction_type == "epsilon" and np.any(cols["sqrt_alpha_prod"] == 0):
        raise ValueError(f"epsilon prediction at a zero-SNR timestep (alphas_cumprod[t] == 0, timesteps "
                         f"{ts.tolist()}) divides by zero (diffusers returns inf/nan); use v_prediction with "
                         "rescale_betas_zero_snr")
    return DDPMSchedule(
        prediction_type=cfg.prediction_type,
        variance_type=cfg.variance_type,
        clip_sample=bool(cfg.clip_sample),
        clip_sample_range=float(cfg.clip_sample_range),
        num_inference_steps=n,
        needs_noise=bool(np.any(cols["c_noise"] != 0)),
        timesteps=ts,
        prev_timesteps=prev,
        **cols,
    )


# ----------------------------------------------------------------------------------------------
# Pure step function (jit-friendly; `i` may be a traced int).


def _at(arr, i):
    return jnp.asarray(arr)[i]


def init_state(sample_shape=None, dtype=jnp.float32):
    """DDPM carries nothing between steps: the empty tuple (for the schedulers' uniform API)."""
    del sample_shape, dtype
    return ()


def predict_x0(sched: DDPMSchedule, i, model_output, sample):
    """diffusers' `pred_original_sample` at step index i (clipped if clip_sample), float32."""
    s = jnp.asarray(sample).astype(jnp.float32)
    m = jnp.asarray(model_output).astype(jnp.float32)
    p = sched.prediction_type
    if p == "epsilon":
        x0 = (s - _at(sched.sqrt_beta_prod, i) * m) / _at(sched.sqrt_alpha_prod, i)
    elif p == "v_prediction":
        x0 = _at(sched.sqrt_alpha_prod, i) * s - _at(sched.sqrt_beta_prod, i) * m
    else:  # "sample"
        x0 = m
    if sched.clip_sample:
        r = np.float32(sched.clip_sample_range)
        x0 = jnp.clip(x0, -r, r)
    return x0


def step(sched: DDPMSchedule, i, model_output, sample, state=(), noise=None):
    """One `DDPMScheduler.step(model_output, timesteps[i], sample)` at step index i.

    model_output: the model's prediction with the sample's shape (learned-variance channels
    already dropped). state: from `init_state` (unused, returned unchanged). noise: standard
    normal noise of the sample's shape (diffusers' `variance_noise`), required if
    `sched.needs_noise`; scaled by 0 at t == 0. Computed in float32; returns (prev_sample in
    the sample's dtype, state).
    """
    s = jnp.asarray(sample).astype(jnp.float32)
    x0 = predict_x0(sched, i, model_output, s)
    prev = _at(sched.c_x0, i) * x0 + _at(sched.c_sample, i) * s
    if sched.needs_noise:
        if noise is None:
            raise ValueError("this DDPM schedule adds noise at steps with t > 0: pass noise (standard normal, "
                             "the sample's shape)")
        prev = prev + _at(sched.c_noise, i) * jnp.asarray(noise).astype(jnp.float32)
    return prev.astype(jnp.asarray(sample).dtype), state
