"""diffusers' `DPMSolverMultistepScheduler` (DPM-Solver / DPM-Solver++ multistep) as pure functions.

This is the scheduler PixArt-alpha and PixArt-Sigma ship with (dpmsolver++, order 2, midpoint,
epsilon prediction, linear betas, "linspace" spacing, final sigma 0). diffusers keeps a list of
previous model outputs and picks the solver order per call with Python branches. Here everything
that depends only on the config and the step count is computed once on the host
(`make_schedule`, numpy): the timesteps, the sigmas and, per step index `i`, the scalar
coefficients of the update. `step` only indexes those arrays with `i` (which may be traced) and
does elementwise float32 math, so it sits inside one jitted denoising step.

Every update diffusers can take (first, second or third order; midpoint or heun; dpmsolver or
dpmsolver++; ODE or SDE) is linear in the sample, the current converted model output m0
(x0 for dpmsolver++, eps for dpmsolver), the previous two m1, m2 and the noise. We write it as

    prev = c_sample * sample + c_m0 * m0 + c_d01 * (m0 - m1) + c_d12 * (m1 - m2) + c_noise * noise

(differences of model outputs, as diffusers' D1 / D2 terms are), with the per-step coefficients
zero where a term is unused: a first-order step has c_d01 = c_d12 = 0, a second-order step
c_d12 = 0. The state carried between steps is (m1, m2).

How diffusers' PixArt pipelines drive it (and what `step` mirrors):

    scheduler.set_timesteps(num_inference_steps)       # -> make_schedule(cfg, n)
    scheduler.set_begin_index(0)                       # step index = loop index i
    for i, t in enumerate(scheduler.timesteps):        # the transformer gets timestep=t (int)
        noise_pred = transformer(latents, timestep=t, ...)   # then CFG, then drop the
        latents = scheduler.step(noise_pred, t, latents)[0] # learned-sigma channels

The order used at step index i is, as in diffusers with begin index 0:
    1 if solver_order == 1 or i == 0 or the last step lowers its order (lower_order_final with
      fewer than 15 steps, euler_at_final, or final_sigmas_type "zero"),
    2 if solver_order == 2 or i == 1 or it is the second-to-last step with lower_order_final and
      fewer than 15 steps,
    3 otherwise.

Precision. diffusers computes the per-step scalars (alpha_t, sigma_t, lambda, h, r, exp(-h) - 1,
...) as float32 0-d torch tensors; we replay that arithmetic in numpy float32 (log and exp are
computed in float64 and rounded, i.e. correctly rounded float32), then combine the scalars into
the coefficients above in float64 and round once to float32. The float32 betas are bit-equal to
torch's on x86 (torch.linspace's fused multiply-add is emulated, see `_linspace32`), and so is
`alphas_cumprod` for the linear / scaled_linear / cosine schedules. torch's float32 sqrt (MKL)
is not always correctly rounded (~0.6% of values are 1 ulp off), so a few of diffusers' sigmas
differ from ours by an ulp. The model output is converted to x0/eps exactly as diffusers does it
((sample - sigma_t * model_output) / alpha_t etc.). diffusers converts in the model's dtype and
upcasts only the sample; we compute the whole step in float32 and return the sample's dtype.
Trajectories agree with diffusers' to float32 rounding (~1e-7 to 2e-6 of max|sample|; the upper
end at a final third-order step to sigma_min, whose D1/D2 coefficients are ~8 and cancel),
not bit for bit.

Not supported (ValueError from `DPMSolverConfig`): thresholding, use_beta_sigmas,
use_dynamic_shifting, variance_type "learned"/"learned_range" (drop the variance channels before
`step`, as the PixArt pipelines do), third-order "sde-dpmsolver" (diffusers has no such update).
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
    "DPMSchedule",
    "DPMSolverConfig",
    "alphas_cumprod",
    "init_state",
    "make_schedule",
    "step",
]

# Standard deviation of the initial noise: latents = randn * INIT_NOISE_SIGMA (diffusers'
# `scheduler.init_noise_sigma`, 1.0 for this scheduler; `scale_model_input` is the identity).
INIT_NOISE_SIGMA = 1.0

_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
_SOLVER_TYPES = ("midpoint", "heun")
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_SIGMAS = ("zero", "sigma_min")
# diffusers silently maps these to supported values in __init__; so do we.
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `DPMSolverMultistepScheduler` (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # only used with thresholding (unsupported)
    sample_max_value: float = 1.0  # only used with thresholding (unsupported)
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"  # only used with use_dynamic_shifting (unsupported)

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        if self.algorithm_type in _ALGORITHM_ALIASES and self.final_sigmas_type == "zero":
            # diffusers checks the name before mapping it, so "deis" needs final_sigmas_type "sigma_min"
            raise ValueError(f"DPMSolverMultistepScheduler config: final_sigmas_type 'zero' is not supported for "
                             f"algorithm_type {self.algorithm_type!r} (as in diffusers); use 'sigma_min'")
        fix("algorithm_type", _ALGORITHM_ALIASES.get(self.algorithm_type, self.algorithm_type))
        fix("solver_type", _SOLVER_TYPE_ALIASES.get(self.solver_type, self.solver_type))
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            fix("trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.lambda_min_clipped is None:
            fix("lambda_min_clipped", -math.inf)
        fix("lambda_min_clipped", float(self.lambda_min_clipped))
        self._validate()

    def _validate(self):
        def bad(msg):
            raise ValueError(f"DPMSolverMultistepScheduler config: {msg}")

        if self.algorithm_type not in _ALGORITHMS:
            bad(f"algorithm_type {self.algorithm_type!r} is not one of {_ALGORITHMS}")
        if self.solver_type not in _SOLVER_TYPES:
            bad(f"solver_type {self.solver_type!r} is not one of {_SOLVER_TYPES}")
        if self.solver_order not in (1, 2, 3):
            bad(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            bad("solver_order 3 is not available for algorithm_type 'sde-dpmsolver' (diffusers has no "
                "third-order sde-dpmsolver update); use solver_order 1 or 2, or 'sde-dpmsolver++'")
        if self.prediction_type not in _PREDICTION_TYPES:
            bad(f"prediction_type {self.prediction_type!r} is not one of {_PREDICTION_TYPES}")
        if self.prediction_type == "flow_prediction" and self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            bad(f"prediction_type 'flow_prediction' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++', "
                f"got {self.algorithm_type!r}")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            bad(f"beta_schedule {self.beta_schedule!r} is not one of {_BETA_SCHEDULES} (or pass trained_betas)")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            bad(f"trained_betas has {len(self.trained_betas)} entries, num_train_timesteps is "
                f"{self.num_train_timesteps}")
        if self.timestep_spacing not in _SPACINGS:
            bad(f"timestep_spacing {self.timestep_spacing!r} is not one of {_SPACINGS}")
        if self.final_sigmas_type not in _FINAL_SIGMAS:
            bad(f"final_sigmas_type {self.final_sigmas_type!r} is not one of {_FINAL_SIGMAS}")
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            bad(f"final_sigmas_type 'zero' is not supported for algorithm_type {self.algorithm_type!r} "
                "(as in diffusers); use final_sigmas_type 'sigma_min'")
        if self.thresholding:
            bad("thresholding=True (dynamic thresholding) is not supported; only thresholding=False")
        if self.use_beta_sigmas:
            bad("use_beta_sigmas=True is not supported; supported sigma schedules: the default, "
                "use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas, use_flow_sigmas")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            bad("only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used")
        if self.use_dynamic_shifting:
            bad("use_dynamic_shifting=True (set_timesteps(mu=...)) is not supported; set flow_shift instead")
        if self.variance_type is not None:
            bad(f"variance_type {self.variance_type!r} is not supported, only None: diffusers would slice "
                "model_output[:, :3] itself; drop the learned-variance channels before calling step "
                "(as the PixArt pipelines do) and use variance_type None")
        if self.num_train_timesteps < 2:
            bad(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


# ----------------------------------------------------------------------------------------------
# Host-side precomputation (numpy), replaying diffusers' torch arithmetic and dtypes.

_F32 = np.float32


def _log32(x):
    """float32 log of float32 x, correctly rounded (log(0) = -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _exp32(x):
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) as torch computes it on x86 CPUs.

    float32 start, end and step = (end - start) / (steps - 1); entry i is start + step * i below
    the halfway point and end - step * (steps - 1 - i) above it, each a fused multiply-add (one
    rounding) in torch's AVX2 / AVX512 kernels. Emulated exactly: the float32 product is exact
    in float64, so only the sum is rounded (twice, float64 then float32, which differs from one
    rounding only on exact float32 ties, not seen in practice). torch builds without SIMD
    (ATEN_CPU_CAPABILITY=default) round the product separately and differ by an ulp at places.
    """
    start32, end32 = _F32(start), _F32(end)
    delta = np.float64((end32 - start32) / _F32(steps - 1))
    idx = np.arange(steps)
    lo = (np.float64(start32) + delta * idx).astype(np.float32)
    hi = (np.float64(end32) - delta * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, lo, hi)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's "squaredcos_cap_v2" betas, in Python float64, stored as float32 (as diffusers)."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                      np.float64).astype(np.float32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod of float32 accumulates in float64 and rounds each output.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas(cfg: DPMSolverConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _linspace32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        root = _linspace32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        betas = root * root
    else:
        betas = _cosine_betas(n)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32."""
    root = np.sqrt(_cumprod32(_F32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    ac = root * root
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return (_F32(1) - alphas).astype(np.float32)


def alphas_cumprod(cfg: DPMSolverConfig) -> np.ndarray:
    """The scheduler's float32 `alphas_cumprod` (diffusers' `scheduler.alphas_cumprod`)."""
    ac = _cumprod32(_F32(1) - _betas(cfg))
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24  # diffusers: close to 0 so that the first sigma stays finite
    return ac


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    """((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 over all training timesteps, float32."""
    return np.sqrt((_F32(1) - ac) / ac).astype(np.float32)


def _spaced_timesteps(cfg: DPMSolverConfig, n: int, ac: np.ndarray) -> np.ndarray:
    T = cfg.num_train_timesteps
    # Drop the training timesteps whose log-SNR / 2 is below lambda_min_clipped (from the top).
    lam = _log32(np.sqrt(ac)) - _log32(np.sqrt(_F32(1) - ac))  # decreasing in t
    clipped = int(np.searchsorted(lam[::-1].astype(np.float64), cfg.lambda_min_clipped, side="left"))
    last = T - clipped
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    ratio = T / n  # trailing
    return np.arange(last, 0, -ratio).round().astype(np.int64) - 1


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma (float64)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    T = log_train_sigmas.shape[0]
    below = log_sigma[None, :] >= log_train_sigmas[:, None]  # (T, k)
    # The last training index whose log sigma is <= log_sigma (0 if none), at most T - 2.
    low = np.where(below.any(axis=0), T - 1 - np.argmax(below[::-1], axis=0), 0)
    low = np.minimum(low, T - 2)
    high = low + 1
    lo, hi = log_train_sigmas[low], log_train_sigmas[high]  # float32
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)  # (lo - hi) in float32, as diffusers
    return (1 - w) * low + w * high


def _schedule_sigmas(cfg: DPMSolverConfig, n: int | None, ac: np.ndarray, custom_timesteps):
    """(timesteps int64, sigmas float32 with the final sigma appended), as diffusers' set_timesteps."""
    T = cfg.num_train_timesteps
    train_sigmas = _train_sigmas(ac)
    log_train_sigmas = np.log(train_sigmas)  # float32, numpy's log as in diffusers
    if custom_timesteps is not None:
        ts = np.asarray(custom_timesteps).astype(np.int64)
        sig = np.interp(ts, np.arange(T), train_sigmas)
    else:
        ts = _spaced_timesteps(cfg, n, ac)
        round_ts = cfg.beta_schedule != "squaredcos_cap_v2"
        smax, smin = float(train_sigmas[-1]), float(train_sigmas[0])
        if cfg.use_karras_sigmas:
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            hi, lo = smax ** (1 / rho), smin ** (1 / rho)
            sig = (hi + ramp * (lo - hi)) ** rho
            ts = _sigma_to_t(sig, log_train_sigmas)
            ts = ts.round() if round_ts else ts
        elif cfg.use_lu_lambdas:
            lam_hi, lam_lo = float(log_train_sigmas[-1]), float(log_train_sigmas[0])
            sig = np.exp(lam_hi + np.linspace(0, 1, n) * (lam_lo - lam_hi))
            ts = _sigma_to_t(sig, log_train_sigmas)
            ts = ts.round() if round_ts else ts
        elif cfg.use_exponential_sigmas:
            sig = np.exp(np.linspace(math.log(smax), math.log(smin), n))
            ts = _sigma_to_t(sig, log_train_sigmas)
        elif cfg.use_flow_sigmas:
            s = 1.0 - np.linspace(1, 1 / T, n + 1)
            shift = cfg.flow_shift
            sig = (shift * s / (1 + (shift - 1) * s))[::-1][:-1].copy()
            ts = sig * T
        else:
            sig = np.interp(ts, np.arange(T), train_sigmas)
    if cfg.final_sigmas_type == "sigma_min":
        last = np.sqrt((_F32(1) - ac[0]) / ac[0])
    else:
        last = 0.0
    sigmas = np.concatenate([np.asarray(sig, np.float64), [float(last)]]).astype(np.float32)
    return np.asarray(ts).astype(np.int64), sigmas


def _step_orders(cfg: DPMSolverConfig, n: int) -> tuple[int, ...]:
    orders = []
    for i in range(n):
        few = cfg.lower_order_final and n < 15
        lower_final = i == n - 1 and (cfg.euler_at_final or few or cfg.final_sigmas_type == "zero")
        lower_second = i == n - 2 and few
        if cfg.solver_order == 1 or i < 1 or lower_final:
            orders.append(1)
        elif cfg.solver_order == 2 or i < 2 or lower_second:
            orders.append(2)
        else:
            orders.append(3)
    return tuple(orders)


def _alpha_sigma(cfg: DPMSolverConfig, sigma):
    """(alpha_t, sigma_t) of a float32 sigma, float32 arithmetic as diffusers."""
    sigma = _F32(sigma)
    if cfg.use_flow_sigmas:
        return _F32(1) - sigma, sigma
    alpha = _F32(1) / np.sqrt(sigma * sigma + _F32(1))
    return alpha, sigma * alpha


def _update_scalars(cfg: DPMSolverConfig, order: int, sigmas: np.ndarray, i: int):
    """diffusers' float32 scalar factors for step i: (c_sample, [cD0, cD1, cD2], c_noise, 1/r0, 1/r1, w, v).

    The update is c_sample * sample + cD0 * D0 + cD1 * D1 + cD2 * D2 + c_noise * noise with
    D0 = m0; second order D1 = (m0 - m1) / r0; third order D1_0 = (m0 - m1) / r0,
    D1_1 = (m1 - m2) / r1, D1 = D1_0 + w (D1_0 - D1_1), D2 = v (D1_0 - D1_1).
    """
    one, half, two = _F32(1), _F32(0.5), _F32(2)
    a_t, s_t = _alpha_sigma(cfg, sigmas[i + 1])
    a_0, s_0 = _alpha_sigma(cfg, sigmas[i])
    lam_t = _log32(a_t) - _log32(s_t)
    lam_0 = _log32(a_0) - _log32(s_0)
    h = lam_t - lam_0
    inv_r0 = inv_r1 = w = v = _F32(0)
    if order >= 2:
        a_1, s_1 = _alpha_sigma(cfg, sigmas[i - 1])
        lam_1 = _log32(a_1) - _log32(s_1)
        r0 = (lam_0 - lam_1) / h
        inv_r0 = one / r0
        if order == 3:
            a_2, s_2 = _alpha_sigma(cfg, sigmas[i - 2])
            lam_2 = _log32(a_2) - _log32(s_2)
            r1 = (lam_1 - lam_2) / h
            inv_r1 = one / r1
            w = r0 / (r0 + r1)
            v = one / (r0 + r1)
    algo, heun = cfg.algorithm_type, cfg.solver_type == "heun"
    c_noise = _F32(0)
    c1 = c2 = _F32(0)
    if algo == "dpmsolver++":
        em = _exp32(-h) - one  # exp(-h) - 1
        c_sample = s_t / s_0
        c0 = -(a_t * em)
        if order == 2:
            c1 = a_t * (em / h + one) if heun else -(half * (a_t * em))
        elif order == 3:
            c1 = a_t * (em / h + one)
            c2 = -(a_t * ((em + h) / (h * h) - half))
    elif algo == "dpmsolver":
        ep = _exp32(h) - one  # exp(h) - 1
        c_sample = a_t / a_0
        c0 = -(s_t * ep)
        if order == 2:
            c1 = -(s_t * (ep / h - one)) if heun else -(half * (s_t * ep))
        elif order == 3:
            c1 = -(s_t * (ep / h - one))
            c2 = -(s_t * ((ep - h) / (h * h) - half))
    elif algo == "sde-dpmsolver++":
        q = one - _exp32(-two * h)  # 1 - exp(-2h)
        c_sample = s_t / s_0 * _exp32(-h)
        c0 = a_t * q
        if order == 2:
            c1 = a_t * (q / (-two * h) + one) if heun else half * (a_t * q)
        elif order == 3:
            c1 = a_t * (q / (-two * h) + one)
            c2 = a_t * ((q - two * h) / ((two * h) * (two * h)) - half)
        c_noise = s_t * np.sqrt(one - _exp32(-two * h))
    else:  # sde-dpmsolver (orders 1 and 2)
        ep = _exp32(h) - one
        c_sample = a_t / a_0
        c0 = -(two * (s_t * ep))
        if order == 2:
            c1 = -(two * (s_t * (ep / h - one))) if heun else -(s_t * ep)
        c_noise = s_t * np.sqrt(_exp32(two * h) - one)
    return c_sample, (c0, c1, c2), c_noise, inv_r0, inv_r1, w, v


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "alpha_s", "sigma_s", "c_sample", "c_m0", "c_d01", "c_d12", "c_noise"],
    meta_fields=["algorithm_type", "prediction_type", "num_inference_steps", "orders"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class DPMSchedule:
    """Timesteps and per-step coefficients; per-step arrays have length num_inference_steps.

    Step i converts the model output with alpha_s[i], sigma_s[i] (or sigmas[i] for flow
    prediction) to m0 (x0 for dpmsolver++ / sde-dpmsolver++, eps otherwise), then

      prev = c_sample * sample + c_m0 * m0 + c_d01 * (m0 - m1) + c_d12 * (m1 - m2) + c_noise * noise

    A pytree (arrays are leaves), so it can be closed over or passed into `jax.jit`.
    """

    algorithm_type: str
    prediction_type: str
    num_inference_steps: int
    orders: tuple[int, ...]  # the solver order diffusers uses at each step index
    timesteps: np.ndarray  # int64: diffusers' scheduler.timesteps after set_timesteps (the model's t)
    sigmas: np.ndarray  # float32, length n + 1: diffusers' scheduler.sigmas (last = final sigma)
    alpha_s: np.ndarray  # float32: alpha_t at sigmas[i] (1 / sqrt(sigma^2 + 1))
    sigma_s: np.ndarray  # float32: sigma_t at sigmas[i] (sigma * alpha_t)
    c_sample: np.ndarray  # float32
    c_m0: np.ndarray  # float32
    c_d01: np.ndarray  # float32
    c_d12: np.ndarray  # float32
    c_noise: np.ndarray  # float32 (zeros for the ODE solvers)

    @property
    def max_order(self) -> int:
        return max(self.orders)

    @property
    def needs_noise(self) -> bool:
        """Whether `step` needs standard normal noise (shape of the sample) at every step (SDE)."""
        return self.algorithm_type.startswith("sde-")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def make_schedule(cfg: DPMSolverConfig, num_inference_steps: int | None = None, *,
                  timesteps: Sequence[int] | None = None) -> DPMSchedule:
    """Host-side precomputation, as diffusers' `set_timesteps(num_inference_steps)`.

    `timesteps`: custom timesteps instead of num_inference_steps, as `set_timesteps(timesteps=...)`.
    Note: for "trailing" spacing with lambda_min_clipped cutting the schedule, diffusers can end up
    with fewer timesteps than requested; the schedule then has that many steps (as diffusers).
    """
    T = cfg.num_train_timesteps
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        if cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas or cfg.use_flow_sigmas:
            raise ValueError("custom timesteps cannot be combined with use_karras_sigmas, use_lu_lambdas, "
                             "use_exponential_sigmas or use_flow_sigmas")
        if len(timesteps) < 1:
            raise ValueError("timesteps must not be empty")
        n = None
    else:
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or timesteps")
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if n > T:
            raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
    ac = alphas_cumprod(cfg)
    ts, sigmas = _schedule_sigmas(cfg, n, ac, timesteps)
    n = len(ts)
    if n < 1:
        raise ValueError(f"the {cfg.timestep_spacing!r} spacing with lambda_min_clipped="
                         f"{cfg.lambda_min_clipped} leaves no timesteps")
    orders = _step_orders(cfg, n)
    cols = {k: np.zeros(n, np.float64) for k in ("c_sample", "c_m0", "c_d01", "c_d12", "c_noise")}
    alpha_s, sigma_s = np.zeros(n, np.float32), np.zeros(n, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, order in enumerate(orders):
            alpha_s[i], sigma_s[i] = _alpha_sigma(cfg, sigmas[i])
            c_sample, (c0, c1, c2), c_noise, inv_r0, inv_r1, w, v = _update_scalars(cfg, order, sigmas, i)
            # Combine diffusers' float32 factors in float64; rounded once to float32 below.
            c1, c2, inv_r0, inv_r1, w, v = map(np.float64, (c1, c2, inv_r0, inv_r1, w, v))
            cols["c_sample"][i] = c_sample
            cols["c_m0"][i] = c0
            cols["c_noise"][i] = c_noise
            if order == 2:
                cols["c_d01"][i] = c1 * inv_r0
            elif order == 3:
                cols["c_d01"][i] = (c1 * (1 + w) + c2 * v) * inv_r0
                cols["c_d12"][i] = -(c1 * w + c2 * v) * inv_r1
    for name, c in cols.items():
        if not np.all(np.isfinite(c)):
            bad = np.nonzero(~np.isfinite(c))[0].tolist()
            raise ValueError(
                f"non-finite {name} at step indices {bad} for {n} steps (timesteps {ts.tolist()}, sigmas "
                f"{sigmas.tolist()}): repeated sigmas make DPM-Solver's step ratio infinite; use fewer "
                "steps or another timestep_spacing"
            )
    return DPMSchedule(
        algorithm_type=cfg.algorithm_type,
        prediction_type=cfg.prediction_type,
        num_inference_steps=n,
        orders=orders,
        timesteps=ts,
        sigmas=sigmas,
        alpha_s=alpha_s,
        sigma_s=sigma_s,
        **{k: v.astype(np.float32) for k, v in cols.items()},
    )


# ----------------------------------------------------------------------------------------------
# Pure step function (jit-friendly; `i` may be a traced int).


def _at(arr, i):
    return jnp.asarray(arr)[i]


def _convert(sched: DPMSchedule, i, m, s):
    """diffusers' convert_model_output: x0 (dpmsolver++) or eps (dpmsolver), float32."""
    p = sched.prediction_type
    if sched.algorithm_type.endswith("++"):
        if p == "epsilon":
            return (s - _at(sched.sigma_s, i) * m) / _at(sched.alpha_s, i)
        if p == "v_prediction":
            return _at(sched.alpha_s, i) * s - _at(sched.sigma_s, i) * m
        if p == "flow_prediction":
            return s - _at(sched.sigmas, i) * m
        return m  # "sample"
    if p == "epsilon":
        return m
    if p == "v_prediction":
        return _at(sched.alpha_s, i) * m + _at(sched.sigma_s, i) * s
    return (s - _at(sched.alpha_s, i) * m) / _at(sched.sigma_s, i)  # "sample"


def init_state(sample_shape, dtype=jnp.float32, solver_order: int = 3):
    """The state before step 0: the previous `solver_order - 1` converted model outputs (zeros).

    The default (two arrays) suits every config; `solver_order=cfg.solver_order` carries only what
    that config needs (none for order 1, one for order 2).
    """
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
    return tuple(jnp.zeros(tuple(sample_shape), dtype) for _ in range(solver_order - 1))


def step(sched: DPMSchedule, i, model_output, sample, state, noise=None):
    """One `DPMSolverMultistepScheduler.step(model_output, timesteps[i], sample)` at step index i.

    model_output: the model's prediction with the sample's shape (learned-variance channels
    already dropped). state: from `init_state` (step 0) or the previous step. noise: standard
    normal noise of the sample's shape, required for the SDE algorithms (diffusers'
    `variance_noise`), ignored otherwise. Computed in float32; returns (prev_sample in sample's
    dtype, new state).
    """
    state = tuple(state)
    k = sched.max_order - 1  # previous outputs this schedule uses
    if len(state) < k:
        raise ValueError(f"this schedule uses up to order {sched.max_order} and needs a state of {k} previous "
                         f"model outputs, got {len(state)}: use init_state(shape, solver_order={sched.max_order})")
    s = jnp.asarray(sample).astype(jnp.float32)
    m = jnp.asarray(model_output).astype(jnp.float32)
    m0 = _convert(sched, i, m, s)
    prev = _at(sched.c_sample, i) * s + _at(sched.c_m0, i) * m0
    if k >= 1:
        m1 = state[0].astype(jnp.float32)
        prev = prev + _at(sched.c_d01, i) * (m0 - m1)
    if k >= 2:
        prev = prev + _at(sched.c_d12, i) * (m1 - state[1].astype(jnp.float32))
    if sched.needs_noise:
        if noise is None:
            raise ValueError(f"algorithm_type {sched.algorithm_type!r} needs noise at every step")
        prev = prev + _at(sched.c_noise, i) * jnp.asarray(noise).astype(jnp.float32)
    new_state = tuple(x.astype(old.dtype) for x, old in zip((m0,) + state[:-1], state))
    return prev.astype(jnp.asarray(sample).dtype), new_state
