"""CogVideoX schedulers (DDIM and SDE-DPM-Solver++ 2M), as in diffusers, as pure functions.

diffusers' `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` keep state and branch on Python
values inside `step`. Here everything that depends only on the config and the step count is
computed once on the host (`make_schedule`, numpy, float64 where diffusers computes in float64):
the timesteps and, per step index `i`, the scalar coefficients of the update. The step functions
only index those arrays with `i` (which may be traced) and do elementwise float32 math, so they
sit inside the one jitted denoising step.

What the step functions mirror is how `CogVideoXPipeline.__call__` drives the schedulers:

    DDIM: latents = scheduler.step(noise_pred, t, latents)[0]
    DPM:  latents, old_x0 = scheduler.step(noise_pred, old_x0, t,
                                           timesteps[i - 1] if i > 0 else None, latents)

i.e. the DPM solver is first order at `i == 0` (no previous x0) and wherever the step lands
past timestep 0 (`prev_timestep < 0`, the last step for the shipped configs), second order
elsewhere. Both cases are encoded as per-step coefficients (first order = `mult3 = 1, mult4 = 0`),
so there is no branch on traced values.

Notes on diffusers behaviour that we copy on purpose:
- `clip_sample`, `clip_sample_range`, `sample_max_value` and `eta` are accepted by diffusers'
  CogVideoX schedulers but never used in `step`; they are read and ignored here too.
- `prev_timestep = t - num_train_timesteps // num_inference_steps` even for "trailing" spacing
  whose timesteps are not evenly spaced (e.g. 7 steps); that is what diffusers does.
- The DPM scheduler is stochastic (SDE variant): each step adds `mult_noise * noise`. diffusers
  draws the noise inside `step` with `randn_tensor(sample.shape, generator, dtype=sample.dtype)`:
  once on first-order steps, twice on second-order steps (the first draw is discarded). The
  count is in `Schedule.noise_draws`, for callers that want to replay a torch generator stream.
  Here the caller passes the noise in.
- With `rescale_betas_zero_snr=True` the first timestep has alphas_cumprod == 0, so log-SNRs are
  infinite there; the coefficients are computed with those infinities on the host (as torch
  does) and come out finite (first step mult1 = 0; second step r = inf, so mult3 = 1, mult4 = 0).

Precision: the update is computed in float32 and cast back to the sample's dtype. diffusers'
pipeline keeps latents in the model dtype, so with a bf16 model its `a_t * sample` term (and its
DPM noise) is bf16; bf16 trajectories therefore agree only to bf16 rounding. For float32 configs
with float32 betas ("linear", cosine) alphas_cumprod can differ from torch's by an ulp (torch's
vectorised linspace/sqrt); the shipped "scaled_linear" schedule is float64 and agrees to ~1e-16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.config_util import known_fields

__all__ = [
    "INIT_NOISE_SIGMA",
    "SchedulerConfig",
    "Schedule",
    "make_schedule",
    "alphas_cumprod",
    "ddim_step",
    "dpm_step",
    "step",
    "init_state",
    "dynamic_guidance_scale",
    "guidance_scale_at",
    "guidance_scales",
]

# Standard deviation of the initial noise: latents = randn * INIT_NOISE_SIGMA (diffusers'
# `scheduler.init_noise_sigma`, 1.0 for both CogVideoX schedulers).
INIT_NOISE_SIGMA = 1.0

_CLASS_TO_KIND = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}
_KINDS = ("ddim", "dpm")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("linspace", "leading", "trailing")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' `scheduler_config.json` for the CogVideoX schedulers (defaults = diffusers')."""

    kind: str = "ddim"  # "ddim" (CogVideoXDDIMScheduler) or "dpm" (CogVideoXDPMScheduler)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.0120
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True  # unused by diffusers' CogVideoX step; kept for round trips
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0  # unused, as in diffusers
    sample_max_value: float = 1.0  # unused, as in diffusers
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"scheduler kind {self.kind!r} is not one of {_KINDS}")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            raise NotImplementedError(f"beta_schedule {self.beta_schedule!r} is not one of {_BETA_SCHEDULES}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {_PREDICTION_TYPES}")
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of {_SPACINGS}")
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kind: str | None = None) -> "SchedulerConfig":
        """Read a diffusers scheduler config dict; `_class_name` picks the kind unless `kind` is given.

        Unknown keys (`_diffusers_version`, ...) are ignored.
        """
        if kind is None:
            name = d.get("_class_name")
            if name not in _CLASS_TO_KIND:
                raise ValueError(
                    f"scheduler _class_name {name!r} is not one of {sorted(_CLASS_TO_KIND)}; pass kind= explicitly"
                )
            kind = _CLASS_TO_KIND[name]
        return cls(kind=kind, **known_fields(cls, d, exclude=("kind",)))

    @classmethod
    def from_json(cls, path, kind: str | None = None) -> "SchedulerConfig":
        import json

        with open(path) as f:
            return cls.from_dict(json.load(f), kind=kind)

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


# ----------------------------------------------------------------------------------------------
# Host-side precomputation (numpy), replicating diffusers' torch arithmetic and dtypes.


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: symmetric, computed in float32."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    idx = np.arange(steps)
    half = steps // 2
    lo = start32 + step * idx.astype(np.float32)
    hi = end32 - step * (steps - idx - 1).astype(np.float32)
    return np.where(idx < half, lo, hi).astype(np.float32)


def _torch_linspace_f64(start: float, end: float, steps: int) -> np.ndarray:
    step = (end - start) / (steps - 1)
    idx = np.arange(steps)
    half = steps // 2
    return np.where(idx < half, start + step * idx, end - step * (steps - idx - 1))


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The scheduler's `alphas_cumprod` (after SNR shift and zero-SNR rescale), in diffusers' dtype.

    float64 for "scaled_linear" (diffusers builds those betas in float64), float32 otherwise.
    """
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f64(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    else:  # squaredcos_cap_v2
        betas = _betas_for_alpha_bar(n)
    dtype = betas.dtype
    alphas = (1.0 - betas).astype(dtype)
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output.
    ac = np.cumprod(alphas.astype(np.float64)).astype(dtype)
    s = cfg.snr_shift_scale
    ac = (ac / (dtype.type(s) + dtype.type(1 - s) * ac)).astype(dtype)
    if cfg.rescale_betas_zero_snr:
        sq = np.sqrt(ac)
        sq0, sqT = sq[0].copy(), sq[-1].copy()
        sq = sq - sqT
        sq = sq * (sq0 / (sq0 - sqT))
        ac = (sq**2).astype(dtype)
    return ac


def _timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """diffusers' `set_timesteps(n)` result (int64)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        return ts + cfg.steps_offset
    ratio = T / n  # trailing
    return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sqrt_alpha", "sqrt_beta", "c_sample", "c_x0", "c_x0_new", "c_x0_old",
                 "c_noise", "dynamic_cfg_weight"],
    meta_fields=["kind", "prediction_type", "num_inference_steps", "noise_draws"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Timesteps and per-step coefficients; arrays have length num_inference_steps, indexed by i.

    x0 from (model_output, sample) by prediction_type, with sqrt_alpha[i] and sqrt_beta[i], then
      DDIM: prev = c_sample * sample + c_x0 * x0                          (diffusers' a_t, b_t)
      DPM:  d    = c_x0_new * x0 - c_x0_old * old_x0                      (mult3, mult4)
            prev = c_sample * sample - c_x0 * d + c_noise * noise         (mult1, mult2, mult_noise)
    First-order DPM steps have c_x0_new = 1, c_x0_old = 0. Unused fields are zeros.

    A pytree (arrays are leaves), so it can be closed over or passed into `jax.jit`.
    """

    kind: str  # "ddim" | "dpm"
    prediction_type: str
    num_inference_steps: int
    noise_draws: tuple[int, ...]  # randn draws diffusers makes inside step i (the last one is used)
    timesteps: np.ndarray  # int64, exactly diffusers' scheduler.timesteps after set_timesteps(n)
    sqrt_alpha: np.ndarray  # float32, alphas_cumprod[t] ** 0.5
    sqrt_beta: np.ndarray  # float32, (1 - alphas_cumprod[t]) ** 0.5
    c_sample: np.ndarray  # float32
    c_x0: np.ndarray  # float32
    c_x0_new: np.ndarray  # float32
    c_x0_old: np.ndarray  # float32
    c_noise: np.ndarray  # float32
    dynamic_cfg_weight: np.ndarray  # float64, (1 - cos(pi * ((n - t) / n) ** 5)) / 2 at t = timesteps[i]

    @property
    def needs_noise(self) -> bool:
        """Whether `step` needs standard normal noise (shape of the sample) at every step."""
        return self.kind == "dpm"

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def _dynamic_cfg_weight(t: int, n: int) -> float:
    """(1 - cos(pi * ((n - t) / n) ** 5)) / 2 in Python float64, exactly as diffusers' pipeline."""
    return (1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2


def make_schedule(cfg: SchedulerConfig, num_inference_steps: int) -> Schedule:
    """Host-side precomputation of timesteps and per-step coefficients (diffusers' `set_timesteps`)."""
    n = int(num_inference_steps)
    T = cfg.num_train_timesteps
    if n > T:
        raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    ac = alphas_cumprod(cfg)
    dt = ac.dtype  # the dtype diffusers computes the scalar coefficients in
    final = dt.type(1.0) if cfg.set_alpha_to_one else ac[0]
    ts = _timesteps(cfg, n)
    if ts.min() < 0 or ts.max() >= T:  # diffusers would fail later, indexing alphas_cumprod
        raise ValueError(f"timesteps {ts.min()}..{ts.max()} (steps_offset={cfg.steps_offset}) leave [0, {T})")
    prev = ts - T // n
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(dt)
    one = dt.type(1.0)
    zero = np.zeros(n, dt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if cfg.kind == "ddim":
            c_sample = ((one - a_prev) / (one - a_t)) ** 0.5
            c_x0 = a_prev**0.5 - a_t**0.5 * c_sample
            c_x0_new, c_x0_old, c_noise = one + zero, zero, zero
            noise_draws = (0,) * n
        else:
            def lam(x):  # log-SNR / 2, as diffusers' get_variables
                return np.log((x / (one - x)) ** 0.5)

            h = lam(a_prev) - lam(a_t)
            c_sample = ((one - a_prev) / (one - a_t)) ** 0.5 * np.exp(-h)  # mult1
            c_x0 = np.expm1(dt.type(-2) * h) * a_prev**0.5  # mult2
            c_noise = (one - a_prev) ** 0.5 * (one - np.exp(dt.type(-2) * h)) ** 0.5
            # The pipeline passes a previous x0 for i > 0; diffusers then goes second order
            # unless prev_timestep < 0.
            second = (np.arange(n) > 0) & (prev >= 0)
            back = ac[np.concatenate([ts[:1], ts[:-1]])]  # alphas_cumprod[timesteps[i - 1]]
            r = (lam(a_t) - lam(back)) / h
            c_x0_new = np.where(second, one + one / (dt.type(2) * r), one)
            c_x0_old = np.where(second, one / (dt.type(2) * r), zero)
            noise_draws = tuple(int(x) for x in np.where(second, 2, 1))
    coefs = {"c_sample": c_sample, "c_x0": c_x0, "c_x0_new": c_x0_new, "c_x0_old": c_x0_old, "c_noise": c_noise}
    for name, c in coefs.items():
        if not np.all(np.isfinite(c)):
            raise FloatingPointError(f"non-finite {name} for {cfg}, {n} steps: {c}")
    return Schedule(
        kind=cfg.kind,
        prediction_type=cfg.prediction_type,
        num_inference_steps=n,
        noise_draws=noise_draws,
        timesteps=ts,
        sqrt_alpha=(a_t**0.5).astype(np.float32),
        sqrt_beta=((one - a_t) ** 0.5).astype(np.float32),
        **{k: np.asarray(v).astype(np.float32) for k, v in coefs.items()},
        dynamic_cfg_weight=np.asarray([_dynamic_cfg_weight(int(t), n) for t in ts], np.float64),
    )


# ----------------------------------------------------------------------------------------------
# Pure step functions (jit-friendly; `i` may be a traced int).


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _at(arr, i):
    return jnp.asarray(arr)[i]


def _pred_x0(sched: Schedule, i, model_output, sample):
    """diffusers' pred_original_sample (float32 inputs)."""
    if sched.prediction_type == "v_prediction":
        return _at(sched.sqrt_alpha, i) * sample - _at(sched.sqrt_beta, i) * model_output
    if sched.prediction_type == "epsilon":
        return (sample - _at(sched.sqrt_beta, i) * model_output) / _at(sched.sqrt_alpha, i)
    return model_output  # "sample"


def ddim_step(sched: Schedule, i, model_output, sample):
    """`CogVideoXDDIMScheduler.step(model_output, timesteps[i], sample)[0]` (eta is unused there).

    Computed in float32, returned in sample's dtype.
    """
    s, m = _f32(sample), _f32(model_output)
    x0 = _pred_x0(sched, i, m, s)
    prev = _at(sched.c_sample, i) * s + _at(sched.c_x0, i) * x0
    return prev.astype(jnp.asarray(sample).dtype)


def dpm_step(sched: Schedule, i, model_output, sample, old_pred_original_sample, noise):
    """One `CogVideoXDPMScheduler.step` as the pipeline calls it at step index i.

    `old_pred_original_sample`: the x0 returned by step i-1 (at i = 0 anything finite, e.g.
    `init_state(sample)`; it is multiplied by 0 there). `noise`: the standard normal noise diffusers
    would use (the last of its `sched.noise_draws[i]` draws). Returns (prev_sample in sample's
    dtype, pred_original_sample in float32).
    """
    s, m = _f32(sample), _f32(model_output)
    old, z = _f32(old_pred_original_sample), _f32(noise)
    x0 = _pred_x0(sched, i, m, s)
    d = _at(sched.c_x0_new, i) * x0 - _at(sched.c_x0_old, i) * old
    prev = _at(sched.c_sample, i) * s - _at(sched.c_x0, i) * d + _at(sched.c_noise, i) * z
    return prev.astype(jnp.asarray(sample).dtype), x0


def init_state(sample):
    """The scheduler state before step 0 (DPM: a placeholder for old_pred_original_sample)."""
    return jnp.zeros(jnp.shape(sample), jnp.float32)


def step(sched: Schedule, i, model_output, sample, state, noise=None):
    """One scheduler step for either kind: returns (prev_sample, new_state).

    state: DPM's old_pred_original_sample (start with `init_state(sample)`); passed through for
    DDIM. noise: required when `sched.needs_noise`, ignored otherwise.
    """
    if sched.kind == "ddim":
        return ddim_step(sched, i, model_output, sample), state
    if noise is None:
        raise ValueError("the DPM scheduler needs noise (sched.needs_noise)")
    return dpm_step(sched, i, model_output, sample, state, noise)


# ----------------------------------------------------------------------------------------------
# Dynamic classifier-free guidance (CogVideoXPipeline, use_dynamic_cfg=True).


@functools.lru_cache(maxsize=32)
def _dynamic_cfg_table(num_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    return np.asarray(
        [_dynamic_cfg_weight(t, num_inference_steps) for t in range(num_train_timesteps)], np.float64
    )


def dynamic_guidance_scale(guidance_scale, t, num_inference_steps: int, num_train_timesteps: int = 1000):
    """diffusers' dynamic CFG scale at timestep value t (may be traced; num_inference_steps static):

        1 + guidance_scale * ((1 - cos(pi * ((num_inference_steps - t) / num_inference_steps) ** 5)) / 2)

    The argument of cos reaches ~1e7 for t near 1000, far beyond float32's precision, so the
    cosine term is tabulated on the host in float64 (as Python computes it) over t in
    [0, num_train_timesteps) and looked up. With a Python-number guidance_scale the whole value is
    computed in float64 and rounded once to float32 (bit-equal to what torch multiplies with).
    """
    w = _dynamic_cfg_table(int(num_inference_steps), int(num_train_timesteps))
    return _scale_from_weights(guidance_scale, w, t)


def _scale_from_weights(guidance_scale, w, idx):
    if isinstance(guidance_scale, (int, float)) and isinstance(w, np.ndarray):
        return _at((1 + guidance_scale * w.astype(np.float64)).astype(np.float32), idx)
    return 1 + _f32(guidance_scale) * _at(w, idx).astype(jnp.float32)


def guidance_scales(sched: Schedule, guidance_scale: float, use_dynamic_cfg: bool) -> np.ndarray:
    """Host-side float32 guidance scale per step index, bit-equal to the float32 value torch uses."""
    if not use_dynamic_cfg:
        return np.full(sched.num_inference_steps, guidance_scale, np.float32)
    return (1 + float(guidance_scale) * np.asarray(sched.dynamic_cfg_weight, np.float64)).astype(np.float32)


def guidance_scale_at(sched: Schedule, i, guidance_scale, use_dynamic_cfg: bool):
    """Guidance scale at step index i (traced ok), as CogVideoXPipeline computes it.

    Bit-exact when guidance_scale is a Python number and `sched` is a host (closed-over) schedule;
    when `sched` is a jit argument (its float64 weights become float32) or guidance_scale is
    traced, the combine is in float32 (within an ulp or two).
    """
    if not use_dynamic_cfg:
        return _f32(guidance_scale)
    return _scale_from_weights(guidance_scale, sched.dynamic_cfg_weight, i)
