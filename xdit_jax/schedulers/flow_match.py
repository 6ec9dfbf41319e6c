"""diffusers' `FlowMatchEulerDiscreteScheduler` (rectified-flow Euler) as pure functions.

This is the scheduler of the flow-matching DiTs (Mochi, SD3, Flux, LTX-Video, ...). A sample is
x_sigma = (1 - sigma) x0 + sigma noise; the model predicts a velocity v and one Euler step moves
the sample from sigma to the next sigma::

    prev = sample + (sigmas[i + 1] - sigmas[i]) * model_output            # plain Euler (default)

    x0   = sample - sigmas[i] * model_output                              # stochastic_sampling
    prev = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise

Everything that depends only on the config and the step count is computed once on the host
(`make_schedule`, numpy): the timesteps the transformer gets, the sigmas and the per-step
factors (dt = sigmas[i + 1] - sigmas[i], 1 - sigmas[i + 1]). `step` only indexes those arrays
with the step index `i` (which may be traced) and does elementwise float32 math, so it sits
inside the one jitted denoising step. The scheduler keeps no state between steps (`init_state`
returns ()).

The schedule (`make_schedule(cfg, n, sigmas=, mu=, timesteps=)`, diffusers' `set_timesteps`):

1. sigmas: given, or timesteps / num_train_timesteps for given timesteps, or by default n values
   evenly spaced from sigma_max to sigma_min, the first and last training sigma of the scheduler
   as diffusers' `__init__` builds them: s = k / num_train_timesteps (k = 1..N) shifted by `shift`
   (unless use_dynamic_shifting) in float32. So with shift != 1 the default schedule is shifted
   twice (sigma_min is a shifted value and the linspace is shifted again): diffusers' behaviour,
   kept.
2. shift: with use_dynamic_shifting, the resolution-dependent time shift with `mu`
   ("exponential": e^mu / (e^mu + 1/s - 1), "linear": mu / (mu + 1/s - 1)); else
   shift s / (1 + (shift - 1) s).
3. shift_terminal (if set, non-zero): stretch so that the last sigma is shift_terminal
   (LTX-Video's `stretch_shift_to_terminal`).
4. use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas: replace the sigmas by n values of
   that schedule between the first and last sigma of step 3 (beta: scipy's Beta(0.6, 0.6) ppf).
5. float32; timesteps = sigmas * num_train_timesteps (unless timesteps were given).
6. invert_sigmas (Mochi): sigmas = 1 - sigmas and timesteps = sigmas * num_train_timesteps; the
   final sigma is 1. Otherwise the final sigma is 0.

The arithmetic is diffusers' (float64 or float32 numpy where diffusers uses numpy, float32 where
diffusers uses torch float32 tensors), so timesteps and sigmas are bit-equal to diffusers'.

How a pipeline drives it (Mochi; Flux / SD3 pass `mu` or nothing instead of `sigmas`)::

    sigmas = linear_quadratic_schedule(n, 0.025)             # pipeline_mochi.py
    sched = make_schedule(cfg, n, sigmas=sigmas)             # scheduler.set_timesteps(sigmas=...)
    latents = randn(...) * INIT_NOISE_SIGMA                  # 1.0
    for i in range(len(sched)):                              # scheduler.set_begin_index(0)
        t = sched.timesteps[i]                               # float32; the transformer's timestep
        v = transformer(latents, timestep=t, ...)            # then CFG
        latents, state = step(sched, i, v, latents, state)   # scheduler.step(v, t, latents)

Step index. `step` uses the loop index `i` as diffusers' step index, i.e. as after
`set_begin_index(0)` (which Mochi, Flux and SD3 call). Without a begin index diffusers finds the
first step's index from the timestep value and takes the *second* match if timesteps[0] occurs
twice in the schedule; only such (degenerate) schedules would differ.

Precision. diffusers computes `sample + dt * model_output` with the sample upcast to float32 and
`dt` a float32 scalar, then casts to the model output's dtype. We compute in float32 too (also a
bf16 model output is upcast first; diffusers would form dt * model_output in bf16 there) and
return the *sample's* dtype (as the other schedulers here; the pipelines keep float32 latents, as
Mochi's does). Trajectories agree with diffusers' to float32 rounding (XLA may fuse the multiply
and add into one FMA).

Not supported: `per_token_timesteps` (per-token sigmas), `s_churn` / `s_tmin` / `s_tmax` /
`s_noise` (accepted and ignored by diffusers' step), `set_shift` (build a config with another
`shift`), `scale_noise` (img2img) and the timestep-lookup `index_for_timestep`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xdit_jax.config_util import FromConfigDict

__all__ = [
    "INIT_NOISE_SIGMA",
    "FlowMatchEulerConfig",
    "FlowMatchSchedule",
    "calculate_shift",
    "init_state",
    "linear_quadratic_schedule",
    "make_schedule",
    "step",
]

# Standard deviation of the initial noise: latents = randn * INIT_NOISE_SIGMA (the pipelines'
# `prepare_latents`; this scheduler has no `scale_model_input`).
INIT_NOISE_SIGMA = 1.0

_TIME_SHIFT_TYPES = ("exponential", "linear")
_F32 = np.float32


def _scipy_beta_ppf():
    try:
        from scipy.stats import beta
    except ImportError as e:  # scipy is an optional dependency, needed only for use_beta_sigmas
        raise ImportError("FlowMatchEulerDiscreteScheduler config: use_beta_sigmas=True needs scipy "
                          "(scipy.stats.beta.ppf); install scipy or use another sigma schedule") from e
    return beta.ppf


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `FlowMatchEulerDiscreteScheduler` (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    # base/max shift and image sequence lengths: what pipelines feed `calculate_shift` to get `mu`
    # for use_dynamic_shifting (see `FlowMatchEulerConfig.mu`); the scheduler itself never reads them.
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler config: {msg}")

        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            bad("only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used")
        if self.time_shift_type not in _TIME_SHIFT_TYPES:
            bad(f"time_shift_type {self.time_shift_type!r} is not one of {_TIME_SHIFT_TYPES}")
        if isinstance(self.num_train_timesteps, bool) or int(self.num_train_timesteps) != self.num_train_timesteps \
                or self.num_train_timesteps < 1:
            bad(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")
        if not self.use_dynamic_shifting and not (math.isfinite(self.shift) and self.shift > 0):
            bad(f"shift must be a finite number > 0 (it is used unless use_dynamic_shifting), got {self.shift!r}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            bad(f"shift_terminal must be in [0, 1) (0 or None: off), got {self.shift_terminal!r}")
        if self.use_beta_sigmas:
            _scipy_beta_ppf()  # diffusers also refuses at construction without scipy

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def mu(self, image_seq_len: int) -> float:
        """`mu` for use_dynamic_shifting: `calculate_shift` with this config's base/max fields."""
        if self.base_shift is None or self.max_shift is None:
            raise ValueError("FlowMatchEulerDiscreteScheduler config: base_shift and max_shift must be set to "
                             "compute mu from the image sequence length")
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                               self.max_shift)


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The resolution-dependent `mu` of Flux / SD3-style pipelines (diffusers' `calculate_shift`):
    linear in the image token count, base_shift at base_seq_len and max_shift at max_seq_len."""
    if max_seq_len == base_seq_len:
        raise ValueError(f"calculate_shift: max_seq_len and base_seq_len must differ, both are {base_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def linear_quadratic_schedule(num_steps: int, threshold_noise: float = 0.025,
                              linear_steps: int | None = None) -> np.ndarray:
    """Mochi's sigma schedule (diffusers' `pipeline_mochi.linear_quadratic_schedule`), float64.

    The noise level 1 - sigma rises linearly from 0 to threshold_noise over the first
    `linear_steps` (default num_steps // 2) steps, then quadratically towards 1 (reached one step
    after the last); returned as sigmas (starting at 1.0), for `make_schedule(cfg, sigmas=...)`
    with Mochi's `invert_sigmas=True` config. Same float64 operations as diffusers' Python floats.
    """
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"linear_quadratic_schedule: num_steps must be >= 1, got {num_steps}")
    lin = num_steps // 2 if linear_steps is None else int(linear_steps)
    quad = num_steps - lin
    if lin < 1 or quad < 1:
        raise ValueError(f"linear_quadratic_schedule: needs 1 <= linear_steps < num_steps (linear_steps defaults to "
                         f"num_steps // 2, so num_steps >= 2); got num_steps={num_steps}, linear_steps={lin} "
                         "(diffusers divides by zero here)")
    step_diff = lin - threshold_noise * num_steps
    quad_coef = step_diff / (lin * quad**2)
    lin_coef = threshold_noise / lin - 2 * step_diff / (quad**2)
    const = quad_coef * (lin**2)
    i_lin = np.arange(lin, dtype=np.int64)
    i_quad = np.arange(lin, num_steps, dtype=np.int64)
    noise = np.concatenate([i_lin * threshold_noise / lin, quad_coef * (i_quad**2) + lin_coef * i_quad + const])
    return 1.0 - noise


# ----------------------------------------------------------------------------------------------
# Host-side precomputation (numpy), replaying diffusers' arithmetic and dtypes.


def _train_sigma_range(cfg: FlowMatchEulerConfig) -> tuple[float, float]:
    """(sigma_min, sigma_max): the last and first training sigma of diffusers' `__init__` (torch
    float32: k / N for k = 1 and N, shifted by `shift` unless use_dynamic_shifting), as Python floats."""
    n_train = cfg.num_train_timesteps
    ends = np.asarray([1, n_train], np.float32) / _F32(n_train)
    if not cfg.use_dynamic_shifting:
        ends = _F32(cfg.shift) * ends / (_F32(1) + _F32(cfg.shift - 1) * ends)
    return float(ends[0]), float(ends[1])


def _time_shift(cfg: FlowMatchEulerConfig, mu: float, s: np.ndarray) -> np.ndarray:
    """The dynamic (resolution-dependent) shift of sigmas `s` (numpy, in s's dtype as diffusers)."""
    with np.errstate(divide="ignore"):  # s == 0 -> 1/s - 1 = inf -> shifted sigma 0
        odds = (1 / s - 1) ** 1.0  # diffusers' time_shift(mu, sigma=1.0, t)
    if cfg.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    return mu / (mu + odds)


def _stretch_to_terminal(s: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch `s` so that it ends at `terminal` (1 - s scaled by a common factor)."""
    one_minus = 1 - s
    scale = one_minus[-1] / (1 - terminal)
    return 1 - (one_minus / scale)


def _retarget(cfg: FlowMatchEulerConfig, s: np.ndarray, n: int) -> np.ndarray:
    """Karras / exponential / beta sigmas between the first and last of `s` (float64, as diffusers)."""
    hi, lo = float(s[0]), float(s[-1])
    if cfg.use_karras_sigmas:
        if lo < 0 or hi < 0:
            raise ValueError(f"use_karras_sigmas needs non-negative sigmas, got first {hi} and last {lo}")
        rho = 7.0
        lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
        return (hi_r + np.linspace(0, 1, n) * (lo_r - hi_r)) ** rho
    if cfg.use_exponential_sigmas:
        if lo <= 0 or hi <= 0:
            raise ValueError(f"use_exponential_sigmas needs positive sigmas (it interpolates log sigma), got first "
                             f"{hi} and last {lo}")
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    ppf = _scipy_beta_ppf()(1 - np.linspace(0, 1, n), 0.6, 0.6)
    return lo + ppf * (hi - lo)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "dt", "c_x0"],
    meta_fields=["num_inference_steps", "num_train_timesteps", "stochastic_sampling"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchSchedule:
    """Timesteps, sigmas and per-step factors; per-step arrays have length num_inference_steps.

    A pytree (arrays are leaves), so it can be closed over or passed into `jax.jit`.
    """

    num_inference_steps: int
    num_train_timesteps: int
    stochastic_sampling: bool  # whether `step` needs noise (config stochastic_sampling)
    timesteps: np.ndarray  # float32: diffusers' scheduler.timesteps (the transformer's timestep, in [0, N])
    sigmas: np.ndarray  # float32, length n + 1: diffusers' scheduler.sigmas (final sigma 0, or 1 if inverted)
    dt: np.ndarray  # float32: sigmas[i + 1] - sigmas[i]
    c_x0: np.ndarray  # float32: 1 - sigmas[i + 1] (stochastic sampling)

    @property
    def needs_noise(self) -> bool:
        """Whether `step` needs standard normal noise (the sample's shape) at every step."""
        return self.stochastic_sampling

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d sequence of numbers, got shape {arr.shape}")
    if arr.size < 1:
        raise ValueError(f"{name} must not be empty")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def make_schedule(cfg: FlowMatchEulerConfig, num_inference_steps: int | None = None, *,
                  sigmas: Sequence[float] | np.ndarray | None = None, mu: float | None = None,
                  timesteps: Sequence[float] | np.ndarray | None = None) -> FlowMatchSchedule:
    """Host-side precomputation, as diffusers' `set_timesteps(num_inference_steps, sigmas=, mu=, timesteps=)`.

    num_inference_steps: the step count (may be omitted when `sigmas` or `timesteps` are given; if
    given too, it must equal their length). sigmas: custom sigmas, one per step (before shifting;
    e.g. `linear_quadratic_schedule` for Mochi). timesteps: custom timesteps, one per step, handed
    to the transformer as given (their sigmas, timesteps / N, still go through the shift; with
    `sigmas` too, both are used as given, sigmas shifted). mu: required with use_dynamic_shifting
    (see `FlowMatchEulerConfig.mu`), ignored otherwise (as diffusers).
    """
    n_train = cfg.num_train_timesteps
    if sigmas is not None:
        sigmas = _as_1d("sigmas", sigmas)
    if timesteps is not None:
        timesteps = _as_1d("timesteps", timesteps)
    if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
        raise ValueError(f"sigmas and timesteps must have the same length, got {len(sigmas)} and {len(timesteps)}")
    custom = sigmas if sigmas is not None else timesteps
    if num_inference_steps is None:
        if custom is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        n = len(custom)
    else:
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if custom is not None and len(custom) != n:
            which = "sigmas" if sigmas is not None else "timesteps"
            raise ValueError(f"{which} has {len(custom)} entries but num_inference_steps is {n}; they must match "
                             "(or leave num_inference_steps out)")
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu (e.g. cfg.mu(image_seq_len))")
        mu = float(mu)
        if not math.isfinite(mu) or (cfg.time_shift_type == "exponential" and mu > 700):
            raise ValueError(f"mu must be a finite number (<= 700 for the exponential time shift), got {mu!r}")

    # 1. sigmas before shifting (float64 for the default schedule, float32 for custom values)
    if timesteps is not None:
        timesteps = timesteps.astype(np.float32)
    if sigmas is not None:
        s = sigmas.astype(np.float32)
    elif timesteps is not None:
        s = timesteps / n_train
    else:
        lo, hi = _train_sigma_range(cfg)
        s = np.linspace(hi * n_train, lo * n_train, n) / n_train

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # 2. shift
        if cfg.use_dynamic_shifting:
            s = _time_shift(cfg, mu, s)
        else:
            s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
        # 3. stretch to the terminal value
        if cfg.shift_terminal:
            s = _stretch_to_terminal(s, cfg.shift_terminal)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"the shifted sigmas are not finite: {np.asarray(s).tolist()} (sigmas outside [0, 1], or "
                             "a last sigma of 1 with shift_terminal?)")
        # 4. another sigma schedule between the ends
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            s = _retarget(cfg, s, n)
    # 5. float32 (torch) from here on
    s32 = np.asarray(s).astype(np.float32)
    if cfg.invert_sigmas:
        # 6. Mochi: inverted sigmas, timesteps from them (custom timesteps are overridden), final sigma 1
        s32 = _F32(1) - s32
        ts = s32 * _F32(n_train)
        final = _F32(1)
    else:
        ts = timesteps if timesteps is not None else s32 * _F32(n_train)
        final = _F32(0)
    sig = np.concatenate([s32, [final]]).astype(np.float32)
    if not np.all(np.isfinite(sig)):
        raise ValueError(f"non-finite sigmas {sig.tolist()}")
    return FlowMatchSchedule(
        num_inference_steps=n,
        num_train_timesteps=n_train,
        stochastic_sampling=bool(cfg.stochastic_sampling),
        timesteps=np.asarray(ts, np.float32),
        sigmas=sig,
        dt=(sig[1:] - sig[:-1]).astype(np.float32),
        c_x0=(_F32(1) - sig[1:]).astype(np.float32),
    )


def strength_start(num_inference_steps: int, strength: float) -> int:
    """The first step an image-to-image run takes (diffusers' img2img ``get_timesteps``): the last
    ``min(n * strength, n)`` steps of the ``n`` run, so ``strength`` 1 starts from pure noise and 0 runs none."""
    if isinstance(strength, bool) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}.")
    n = int(num_inference_steps)
    return int(max(n - min(n * float(strength), n), 0))


def video_strength_start(num_inference_steps: int, strength: float) -> int:
    """The first step a video-to-video run takes (diffusers' ``WanVideoToVideoPipeline.get_timesteps``, AnimateDiff's
    rule): the last ``int(n * strength)`` steps, rounded down before the subtraction (image-to-image's
    :func:`strength_start` rounds after it: n=4, strength 0.6 runs 2 steps here, 3 there)."""
    if isinstance(strength, bool) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}.")
    n = int(num_inference_steps)
    return max(n - min(int(n * float(strength)), n), 0)


def from_step(sched: FlowMatchSchedule, start: int) -> FlowMatchSchedule:
    """The schedule's steps from index ``start`` on (diffusers' ``set_begin_index(start)`` with the timesteps
    sliced as img2img pipelines do); at least one step must remain."""
    start = int(start)
    if not 0 <= start < sched.num_inference_steps:
        raise ValueError(f"No denoising step left: starting at step {start} of {sched.num_inference_steps} (raise "
                         "strength or num_inference_steps).")
    return dataclasses.replace(sched, num_inference_steps=sched.num_inference_steps - start,
                               timesteps=sched.timesteps[start:], sigmas=sched.sigmas[start:], dt=sched.dt[start:],
                               c_x0=sched.c_x0[start:])


def scale_noise(sched: FlowMatchSchedule, sample, noise):
    """diffusers' ``scale_noise`` at the schedule's first step: ``sigma * noise + (1 - sigma) * sample`` (float32),
    the clean ``sample`` (an image's latents) noised to where a :func:`from_step` schedule starts."""
    sigma = jnp.float32(sched.sigmas[0])
    return sigma * jnp.asarray(noise, jnp.float32) + (1.0 - sigma) * jnp.asarray(sample, jnp.float32)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["image", "noise", "mask"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KeptRegion:
    """Inpainting's kept region (diffusers' inpaint pipelines of the flow-matching families): the image's clean
    latents, the noise they were noised with and the mask (1: repaint, 0: keep), each of the latents' shape. It rides
    at the end of a jitted step's text inputs (:func:`split_kept`); after each update :meth:`apply` sets the kept
    region to the image noised to the next sigma (the clean image after the last step)."""

    image: jax.Array
    noise: jax.Array
    mask: jax.Array

    def apply(self, sched: FlowMatchSchedule, i, latents):
        s = _at(sched.sigmas, i + 1)
        kept = s * self.noise + (1.0 - s) * self.image
        return ((1.0 - self.mask) * kept + self.mask * latents.astype(jnp.float32)).astype(latents.dtype)


def split_kept(texts):
    """(a step's text inputs, their trailing :class:`KeptRegion` or None)."""
    if isinstance(texts, tuple) and texts and isinstance(texts[-1], KeptRegion):
        return texts[:-1], texts[-1]
    return texts, None


# ----------------------------------------------------------------------------------------------
# Pure step function (jit-friendly; `i` may be a traced int).


def _at(arr, i):
    return jnp.asarray(arr)[i]


def init_state(sample_shape=None, dtype=jnp.float32):
    """The flow-matching Euler step carries nothing between steps: the empty tuple (uniform API)."""
    del sample_shape, dtype
    return ()


def step(sched: FlowMatchSchedule, i, model_output, sample, state=(), noise=None):
    """One `FlowMatchEulerDiscreteScheduler.step(model_output, timesteps[i], sample)` at step index i.

    model_output: the model's velocity prediction with the sample's shape. state: from
    `init_state` (unused, returned unchanged). noise: standard normal noise of the sample's shape,
    required with stochastic_sampling (what diffusers draws inside step), ignored otherwise.
    Computed in float32; returns (prev_sample in the sample's dtype, state).
    """
    s = jnp.asarray(sample).astype(jnp.float32)
    m = jnp.asarray(model_output).astype(jnp.float32)
    if sched.stochastic_sampling:
        if noise is None:
            raise ValueError("this schedule uses stochastic_sampling: pass noise (standard normal, the sample's shape)")
        x0 = s - _at(sched.sigmas, i) * m
        prev = _at(sched.c_x0, i) * x0 + _at(sched.sigmas, i + 1) * jnp.asarray(noise).astype(jnp.float32)
    else:
        prev = s + _at(sched.dt, i) * m
    return prev.astype(jnp.asarray(sample).dtype), state
