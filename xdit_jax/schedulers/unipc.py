"""diffusers' `UniPCMultistepScheduler` (UniPC: unified predictor-corrector, B(h) variants) as pure functions.

This is the scheduler the Wan 2.1 text-to-video checkpoints ship with (flow_prediction,
use_flow_sigmas with flow_shift 3.0, or 5.0 for 720p; solver_order 2, bh2, predict_x0, final
sigma 0, lower_order_final). diffusers keeps a list of previous converted model outputs and the
previous sample and picks the orders per call with Python branches. Here everything that depends
only on the config and the step count is computed once on the host (`make_schedule`, numpy): the
timesteps, the sigmas and, per step index `i`, the scalar coefficients of the corrector and the
predictor. `step` only indexes those arrays with `i` (which may be traced) and does elementwise
float32 math, so it sits inside one jitted denoising step.

What diffusers' `step(model_output, t, sample)` does at step index i (begin index 0):

1. Convert the model output to m_i (x0 with predict_x0, else eps), at sigmas[i].
2. Corrector (UniC), if i > 0 and i - 1 is not in `disable_corrector`: the sample is *replaced*
   by a corrected version of the previous predictor's result, computed from the previous step's
   (corrected) sample `last`, the previous outputs m_{i-1}, ..., m_{i-p} and the new m_i, with
   p the order the previous predictor used (sigmas[i - 1] -> sigmas[i]). The current sample only
   enters where the corrector is off.
3. Predictor (UniP) of order p_i from the (corrected) sample, m_i and m_{i-1}, ..., m_{i-p_i+1}
   (sigmas[i] -> sigmas[i + 1]). The order is p_i = min(solver_order, i + 1, n - i), the
   `n - i` only with lower_order_final (unlike DPM-Solver, also for >= 15 steps; nothing else
   lowers it, so with solver_order > 1 the last step is first order exactly when lower_order_final
   is on).

Both are linear in the sample, the previous sample and the converted model outputs. With
d_k = m_{i-k} - m_i (differences, as diffusers' D1s are) we write them as

    corrected = cc_last * last + cc_m1 * m1 + sum_k cc_d[k-1] * (m_{1+k} - m1) + cc_t * (m0 - m1)
    x         = corrected if use_corrector[i] else sample
    prev      = pc_sample * x + pc_m0 * m0 + sum_k pc_d[k-1] * (m_k - m0)            (k >= 1)

with m0 = m_i and m_k = m_{i-k}, per-step coefficients zero where a term is unused (a first
order predictor has pc_d = 0, ...). The state carried between steps is (last, m1, ..., m_S):
the sample the last predictor started from and the last S converted outputs (S = solver_order).

How diffusers' WanPipeline drives it (and what `step` mirrors):

    scheduler.set_timesteps(num_inference_steps)        # -> make_schedule(cfg, n)
    scheduler.set_begin_index(0)                        # step index = loop index i
    latents = randn(...)                                # INIT_NOISE_SIGMA = 1, no scale_model_input
    for i, t in enumerate(scheduler.timesteps):         # int64: the transformer gets timestep=t
        noise_pred = transformer(latents, timestep=t.expand(batch), ...)   # then CFG
        latents = scheduler.step(noise_pred, t, latents)[0]   # -> step(sched, i, noise_pred, latents, state)

The schedule with use_flow_sigmas (Wan): s = linspace(1, 1/N, n + 1)[:-1] (float64), shifted
flow_shift s / (1 + (flow_shift - 1) s), stretched to `shift_terminal` if set, the first sigma
lowered by 1e-6 if it is within 1e-6 of 1 (so that log(alpha) stays finite: alpha = 1 - sigma);
timesteps = s * N *truncated* to int64 (999.999 -> 999); sigmas = float32 with the final sigma (0
for "zero", the last sigma again for "sigma_min", which makes the last step a no-op) appended.
`make_schedule(cfg, sigmas=...)` takes custom flow sigmas before the shift, as
`set_timesteps(sigmas=...)`. Without flow sigmas: the integer
timesteps of `timestep_spacing` and the VP sigmas sqrt((1 - alphas_cumprod) / alphas_cumprod)
interpolated there, as DPM-Solver (see dpmsolver.py, whose host helpers we reuse).

Precision. diffusers computes the per-step scalars (alpha_t, sigma_t, lambda, h, r_k, expm1,
the b vector, rhos by `torch.linalg.solve`) as float32 0-d torch tensors; we replay that in numpy
float32 (log / expm1 computed in float64 and rounded, i.e. correctly rounded float32; the
3x3 / 2x2 solves by LAPACK's float32 `gesv` as torch's), then combine the scalars into the
coefficients above in float64 and round once to float32. Flow-sigma schedules are bit-equal to
diffusers' (numpy float64 then float32 in both); VP sigmas may differ by an ulp (torch's float32
sqrt, see dpmsolver.py). The model output is converted exactly as diffusers does it
(sample - sigma * v etc.). diffusers converts in the promoted dtype of sample and model output
(float32 for Wan's float32 latents and bf16 noise prediction); we compute the whole step in
float32 and return the sample's dtype. Trajectories agree with diffusers' to float32 rounding
(see tests/test_unipc.py for the measured differences), not bit for bit.

Not supported (ValueError from `UniPCConfig`): thresholding, use_karras_sigmas,
use_exponential_sigmas, use_beta_sigmas, use_dynamic_shifting (set_timesteps(mu=...)), solver_p,
solver_order > 3, and the configs for which diffusers' own result is inf / NaN: final_sigmas_type
"zero" with solver_type "bh1", with predict_x0 false, or with lower_order_final false and
solver_order > 1 (the final step to sigma 0 then has h = inf). Also not: `add_noise` (img2img) and
the timestep lookup without `set_begin_index(0)`.
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
from xdit_jax.schedulers.dpmsolver import _log32, _train_sigmas, alphas_cumprod

__all__ = [
    "INIT_NOISE_SIGMA",
    "UniPCConfig",
    "UniPCSchedule",
    "init_state",
    "make_schedule",
    "step",
]

# Standard deviation of the initial noise: latents = randn * INIT_NOISE_SIGMA (diffusers'
# `scheduler.init_noise_sigma`, 1.0 for this scheduler; `scale_model_input` is the identity).
INIT_NOISE_SIGMA = 1.0

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_SIGMAS = ("zero", "sigma_min")
_SOLVER_TYPES = ("bh1", "bh2")
# diffusers silently maps these DPM-Solver names to "bh2" in __init__; so do we.
_SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
_MAX_ORDER = 3
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class UniPCConfig(FromConfigDict):
    """diffusers' `scheduler_config.json` for `UniPCMultistepScheduler` (defaults = diffusers')."""

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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: object | None = None  # another scheduler as predictor (unsupported)
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"  # only used with use_dynamic_shifting (unsupported)
    sigma_min: float | None = None  # only used by the karras / exponential / beta sigmas (unsupported)
    sigma_max: float | None = None  # idem
    shift_terminal: float | None = None

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        fix("solver_type", _SOLVER_TYPE_ALIASES.get(self.solver_type, self.solver_type))
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            fix("trained_betas", tuple(float(b) for b in self.trained_betas))
        if self.disable_corrector is None:
            fix("disable_corrector", ())
        if not isinstance(self.disable_corrector, tuple):
            fix("disable_corrector", tuple(self.disable_corrector))
        self._validate()

    def _validate(self):
        def bad(msg):
            raise ValueError(f"UniPCMultistepScheduler config: {msg}")

        if self.solver_type not in _SOLVER_TYPES:
            bad(f"solver_type {self.solver_type!r} is not one of {_SOLVER_TYPES} (or the aliases "
                f"{tuple(_SOLVER_TYPE_ALIASES)}, which diffusers maps to 'bh2')")
        if isinstance(self.solver_order, bool) or self.solver_order not in range(1, _MAX_ORDER + 1):
            bad(f"solver_order must be 1, 2 or 3 here, got {self.solver_order!r} (diffusers allows higher "
                "orders; they are not supported)")
        if self.prediction_type not in _PREDICTION_TYPES:
            bad(f"prediction_type {self.prediction_type!r} is not one of {_PREDICTION_TYPES}")
        if self.prediction_type == "flow_prediction" and not self.predict_x0:
            bad("prediction_type 'flow_prediction' needs predict_x0=True (diffusers raises in step otherwise)")
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            bad(f"beta_schedule {self.beta_schedule!r} is not one of {_BETA_SCHEDULES} (or pass trained_betas)")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            bad(f"trained_betas has {len(self.trained_betas)} entries, num_train_timesteps is "
                f"{self.num_train_timesteps}")
        if isinstance(self.num_train_timesteps, bool) or int(self.num_train_timesteps) != self.num_train_timesteps \
                or self.num_train_timesteps < 2:
            bad(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.timestep_spacing not in _SPACINGS:
            bad(f"timestep_spacing {self.timestep_spacing!r} is not one of {_SPACINGS}")
        if self.final_sigmas_type not in _FINAL_SIGMAS:
            bad(f"final_sigmas_type {self.final_sigmas_type!r} is not one of {_FINAL_SIGMAS}")
        if self.thresholding:
            bad("thresholding=True (dynamic thresholding) is not supported; only thresholding=False")
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            bad("only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used")
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if getattr(self, name):
                bad(f"{name}=True is not supported; supported sigma schedules: the default (VP sigmas at the "
                    "spaced timesteps) and use_flow_sigmas")
        if self.use_dynamic_shifting:
            bad("use_dynamic_shifting=True (set_timesteps(mu=...)) is not supported; set flow_shift instead")
        if self.solver_p is not None:
            bad("solver_p (another scheduler as the predictor) is not supported; only solver_p=None")
        if self.shift_terminal is not None and not self.use_flow_sigmas:
            bad("shift_terminal is only supported with use_flow_sigmas=True (as in diffusers)")
        if self.shift_terminal and not 0 < self.shift_terminal < 1:
            bad(f"shift_terminal must be in [0, 1) (0 or None: off), got {self.shift_terminal!r}")
        if self.use_flow_sigmas and not (math.isfinite(self.flow_shift) and self.flow_shift > 0):
            bad(f"flow_shift must be a finite number > 0, got {self.flow_shift!r}")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in self.disable_corrector):
            bad(f"disable_corrector must be a list of step indices (ints), got {list(self.disable_corrector)!r}")
        if self.final_sigmas_type == "zero":
            # diffusers' own result is NaN / inf here (the last step goes to sigma 0: lambda = inf)
            if self.solver_type == "bh1":
                bad("solver_type 'bh1' with final_sigmas_type 'zero' is not supported: diffusers' last step "
                    "returns NaN (B(h) = h = -inf times a zero residual); use 'bh2' or final_sigmas_type "
                    "'sigma_min'")
            if not self.predict_x0:
                bad("predict_x0=False with final_sigmas_type 'zero' is not supported: diffusers' last step "
                    "returns NaN (sigma_t * expm1(inf)); use predict_x0=True or final_sigmas_type 'sigma_min'")
            if not self.lower_order_final and self.solver_order > 1:
                bad("lower_order_final=False with final_sigmas_type 'zero' and solver_order > 1 is not supported: "
                    "diffusers' last (higher-order) step to sigma 0 returns inf / NaN; use lower_order_final=True "
                    "or final_sigmas_type 'sigma_min'")

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA


# ----------------------------------------------------------------------------------------------
# Host-side precomputation (numpy), replaying diffusers' torch arithmetic and dtypes.


def _expm1_32(x):
    with np.errstate(over="ignore"):
        return np.expm1(np.asarray(x, np.float64)).astype(np.float32)


def _spaced_timesteps(cfg: UniPCConfig, n: int) -> np.ndarray:
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
    ratio = T / n  # trailing
    return np.arange(T, 0, -ratio).round().astype(np.int64) - 1


def _flow_sigmas(cfg: UniPCConfig, n: int, sigmas) -> np.ndarray:
    """The n flow sigmas (float64, before the final one), as diffusers' set_timesteps."""
    s = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1] if sigmas is None else np.array(sigmas, np.float64)
    shift = cfg.flow_shift
    s = shift * s / (1 + (shift - 1) * s)
    if cfg.shift_terminal:
        one_minus = 1 - s
        scale = one_minus[-1] / (1 - cfg.shift_terminal)
        s = 1 - one_minus / scale
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6  # diffusers: keeps log(alpha) = log(1 - sigma) finite
    return s


def _schedule_sigmas(cfg: UniPCConfig, n: int, sigmas) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, sigmas float32 with the final sigma appended), as diffusers' set_timesteps."""
    T = cfg.num_train_timesteps
    if cfg.use_flow_sigmas:
        sig = _flow_sigmas(cfg, n, sigmas)
        ts = sig * T  # float64; torch's .to(int64) truncates
        last = sig[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
    else:
        ts = _spaced_timesteps(cfg, n)
        ac = alphas_cumprod(cfg)
        sig = np.interp(ts, np.arange(T), _train_sigmas(ac))
        last = np.sqrt((_F32(1) - ac[0]) / ac[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([np.asarray(sig, np.float64), [float(last)]]).astype(np.float32)
    return np.asarray(ts).astype(np.int64), sigmas


def _step_orders(cfg: UniPCConfig, n: int) -> tuple[int, ...]:
    """The predictor order diffusers uses at each step index (warm-up and lower_order_final)."""
    orders = []
    for i in range(n):
        order = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
        orders.append(min(order, i + 1))
    return tuple(orders)


def _alpha_sigma(cfg: UniPCConfig, sigma):
    """(alpha_t, sigma_t) of a float32 sigma, float32 arithmetic as diffusers."""
    sigma = _F32(sigma)
    if cfg.use_flow_sigmas:
        return _F32(1) - sigma, sigma
    alpha = _F32(1) / np.sqrt(sigma * sigma + _F32(1))
    return alpha, sigma * alpha


def _lambda(cfg: UniPCConfig, sigma):
    a, s = _alpha_sigma(cfg, sigma)
    return _log32(a) - _log32(s)


def _bh_update(cfg: UniPCConfig, sigmas: np.ndarray, t: int, s0: int, order: int, corrector: bool):
    """diffusers' float32 scalars of one UniP (corrector=False) or UniC update from sigmas[s0] to sigmas[t].

    The previous points are sigmas[s0 - k], k = 1..order-1. Returns (c_x, c_m0, c_d, c_t), float64
    from float32 factors: the update is c_x * x + c_m0 * m0 + sum_k c_d[k-1] * (m_k - m0)
    (+ c_t * (m_t - m0) for the corrector), m_k the converted output at sigmas[s0 - k].
    """
    one = _F32(1)
    a_t, s_t = _alpha_sigma(cfg, sigmas[t])
    a_0, s_0 = _alpha_sigma(cfg, sigmas[s0])
    lam_0 = _lambda(cfg, sigmas[s0])
    h = _lambda(cfg, sigmas[t]) - lam_0
    rks = [(_lambda(cfg, sigmas[s0 - k]) - lam_0) / h for k in range(1, order)] + [one]
    rks = np.asarray(rks, np.float32)
    hh = -h if cfg.predict_x0 else h
    h_phi_1 = _expm1_32(hh)
    h_phi_k = h_phi_1 / hh - one
    B_h = hh if cfg.solver_type == "bh1" else _expm1_32(hh)
    factorial = 1
    b = []
    for j in range(1, order + 1):
        b.append(h_phi_k * _F32(factorial) / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - _F32(1 / factorial)
    b = np.asarray(b, np.float32)
    R = np.stack([rks ** np.float32(j) for j in range(order)]).astype(np.float32)  # R[j, k] = rks[k]^j
    if corrector:
        rhos = np.asarray([0.5], np.float32) if order == 1 else np.linalg.solve(R, b).astype(np.float32)
    elif order == 1:
        rhos = np.zeros(0, np.float32)
    elif order == 2:
        rhos = np.asarray([0.5], np.float32)
    else:
        rhos = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)
    if cfg.predict_x0:
        c_x, c_m0, scale = s_t / s_0, -(a_t * h_phi_1), a_t * B_h
    else:
        c_x, c_m0, scale = a_t / a_0, -(s_t * h_phi_1), s_t * B_h
    scale = np.float64(scale)
    c_d = [-scale * np.float64(rhos[k]) / np.float64(rks[k]) for k in range(order - 1)]
    c_t = -scale * np.float64(rhos[-1]) if corrector else 0.0
    return np.float64(c_x), np.float64(c_m0), c_d, c_t


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "alpha_s", "sigma_s", "use_corrector", "cc_last", "cc_m1", "cc_d", "cc_t",
                 "pc_sample", "pc_m0", "pc_d"],
    meta_fields=["prediction_type", "predict_x0", "num_inference_steps", "orders", "corrector_orders",
                 "num_prev"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class UniPCSchedule:
    """Timesteps and per-step coefficients; per-step arrays have length num_inference_steps.

    Step i converts the model output with alpha_s[i], sigma_s[i] (or sigmas[i] for flow
    prediction) to m0 (x0 with predict_x0, else eps); with the state (last, m1, m2, ...), then

      corrected = cc_last * last + cc_m1 * m1 + sum_k cc_d[:, k-1] * (m_{1+k} - m1) + cc_t * (m0 - m1)
      x         = corrected if use_corrector[i] else sample
      prev      = pc_sample * x + pc_m0 * m0 + sum_k pc_d[:, k-1] * (m_k - m0)

    A pytree (arrays are leaves), so it can be closed over or passed into `jax.jit`.
    """

    prediction_type: str
    predict_x0: bool
    num_inference_steps: int
    orders: tuple[int, ...]  # the predictor (UniP) order diffusers uses at each step index
    corrector_orders: tuple[int, ...]  # the corrector (UniC) order at each step index, 0 where it is off
    num_prev: int  # previous converted model outputs the steps use (state = (last, m1, ..., m_num_prev))
    timesteps: np.ndarray  # int64: diffusers' scheduler.timesteps after set_timesteps (the model's t)
    sigmas: np.ndarray  # float32, length n + 1: diffusers' scheduler.sigmas (last = final sigma)
    alpha_s: np.ndarray  # float32: alpha_t at sigmas[i] (1 - sigma for flow sigmas, else 1 / sqrt(sigma^2 + 1))
    sigma_s: np.ndarray  # float32: sigma_t at sigmas[i] (sigma for flow sigmas, else sigma * alpha_t)
    use_corrector: np.ndarray  # bool
    cc_last: np.ndarray  # float32, corrector coefficients (zero where it is off)
    cc_m1: np.ndarray  # float32
    cc_d: np.ndarray  # float32 (n, max(solver_order - 1, 0))
    cc_t: np.ndarray  # float32
    pc_sample: np.ndarray  # float32, predictor coefficients
    pc_m0: np.ndarray  # float32
    pc_d: np.ndarray  # float32 (n, max(solver_order - 1, 0))

    @property
    def max_order(self) -> int:
        return max(self.orders)

    @property
    def state_size(self) -> int:
        """Arrays of state `step` needs: the last sample and `num_prev` previous model outputs."""
        return 1 + self.num_prev

    @property
    def init_noise_sigma(self) -> float:
        return INIT_NOISE_SIGMA

    def __len__(self) -> int:
        return self.num_inference_steps


def make_schedule(cfg: UniPCConfig, num_inference_steps: int | None = None, *,
                  sigmas: Sequence[float] | np.ndarray | None = None) -> UniPCSchedule:
    """Host-side precomputation, as diffusers' `set_timesteps(num_inference_steps)` (or `sigmas=`).

    sigmas: custom flow sigmas, one per step, before the shift (only with use_flow_sigmas, as
    diffusers; num_inference_steps may then be left out or must equal their count).
    """
    if sigmas is not None:
        if not cfg.use_flow_sigmas:
            raise ValueError("custom sigmas are only supported with use_flow_sigmas=True (as in diffusers)")
        sigmas = np.asarray(sigmas, np.float64)
        if sigmas.ndim != 1 or sigmas.size < 1 or not np.all(np.isfinite(sigmas)):
            raise ValueError(f"sigmas must be a non-empty 1-d sequence of finite numbers, got {sigmas.tolist()}")
        if num_inference_steps is not None and int(num_inference_steps) != len(sigmas):
            raise ValueError(f"sigmas has {len(sigmas)} entries but num_inference_steps is {num_inference_steps}")
        n = len(sigmas)
    else:
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if not cfg.use_flow_sigmas and n > cfg.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps="
                             f"{cfg.num_train_timesteps}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ts, sig = _schedule_sigmas(cfg, n, sigmas)
    if not np.all(np.isfinite(sig)):
        raise ValueError(f"non-finite sigmas {sig.tolist()} for {n} steps (a single step stretched to "
                         "shift_terminal divides 0 by 0, as in diffusers)")
    return _assemble(cfg, ts, sig)


def from_step(cfg: UniPCConfig, sched: UniPCSchedule, start: int) -> UniPCSchedule:
    """The schedule's steps from index ``start`` on, as diffusers' scheduler runs them when a pipeline starts at
    ``timesteps[start]`` (video-to-video: no history yet, so the warm-up orders start again, the corrector is off
    at the first step; the sigmas and the ``lower_order_final`` count as in the whole schedule)."""
    start = int(start)
    if not 0 <= start < sched.num_inference_steps:
        raise ValueError(f"No denoising step left: starting at step {start} of {sched.num_inference_steps} (raise "
                         "strength or num_inference_steps).")
    return _assemble(cfg, sched.timesteps[start:], sched.sigmas[start:], offset=start)


def _assemble(cfg: UniPCConfig, ts: np.ndarray, sig: np.ndarray, offset: int = 0) -> UniPCSchedule:
    """The schedule of timesteps ``ts`` and sigmas ``sig`` (one more: the final), the steps' coefficients computed;
    ``offset``: the index of its first step in diffusers' schedule (``disable_corrector`` counts from there)."""
    n = len(ts)
    orders = _step_orders(cfg, n)
    disabled = {int(k) - offset for k in cfg.disable_corrector}
    corr_orders = tuple(orders[i - 1] if i > 0 and i - 1 not in disabled else 0 for i in range(n))
    num_prev = max(max(p - 1 for p in orders), max(corr_orders))
    width = cfg.solver_order - 1
    cols = {k: np.zeros(n, np.float64) for k in ("cc_last", "cc_m1", "cc_t", "pc_sample", "pc_m0")}
    cc_d, pc_d = np.zeros((n, width), np.float64), np.zeros((n, width), np.float64)
    alpha_s, sigma_s = np.zeros(n, np.float32), np.zeros(n, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(n):
            alpha_s[i], sigma_s[i] = _alpha_sigma(cfg, sig[i])
            if corr_orders[i]:
                c_x, c_m0, c_d, c_t = _bh_update(cfg, sig, i, i - 1, corr_orders[i], corrector=True)
                cols["cc_last"][i], cols["cc_m1"][i], cols["cc_t"][i] = c_x, c_m0, c_t
                cc_d[i, :len(c_d)] = c_d
            c_x, c_m0, c_d, _ = _bh_update(cfg, sig, i + 1, i, orders[i], corrector=False)
            cols["pc_sample"][i], cols["pc_m0"][i] = c_x, c_m0
            pc_d[i, :len(c_d)] = c_d
    for name, c in list(cols.items()) + [("cc_d", cc_d), ("pc_d", pc_d)]:
        if not np.all(np.isfinite(c)):
            bad = sorted(set(np.nonzero(~np.isfinite(c))[0].tolist()))
            raise ValueError(
                f"non-finite {name} at step indices {bad} for {n} steps (timesteps {ts.tolist()}, sigmas "
                f"{sig.tolist()}): repeated or degenerate sigmas make UniPC's step ratios infinite (diffusers "
                "returns inf / NaN there); use fewer steps or another schedule"
            )
    f32 = {k: v.astype(np.float32) for k, v in cols.items()}
    return UniPCSchedule(
        prediction_type=cfg.prediction_type,
        predict_x0=bool(cfg.predict_x0),
        num_inference_steps=n,
        orders=orders,
        corrector_orders=corr_orders,
        num_prev=num_prev,
        timesteps=ts,
        sigmas=sig,
        alpha_s=alpha_s,
        sigma_s=sigma_s,
        use_corrector=np.asarray(corr_orders) > 0,
        cc_d=cc_d.astype(np.float32),
        pc_d=pc_d.astype(np.float32),
        **f32,
    )


# ----------------------------------------------------------------------------------------------
# Pure step function (jit-friendly; `i` may be a traced int).


def _at(arr, i):
    return jnp.asarray(arr)[i]


def _convert(sched: UniPCSchedule, i, m, s):
    """diffusers' convert_model_output: x0 (predict_x0) or eps, float32."""
    p = sched.prediction_type
    if sched.predict_x0:
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


def init_state(sample_shape, dtype=jnp.float32, solver_order: int = _MAX_ORDER):
    """The state before step 0: (last sample, m1, ..., m_solver_order), all zeros.

    The default (four arrays) suits every config; `solver_order=cfg.solver_order` carries only
    what that config needs. Longer states than a schedule needs are fine (kept, shifted).
    """
    if isinstance(solver_order, bool) or solver_order not in range(1, _MAX_ORDER + 1):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
    return tuple(jnp.zeros(tuple(sample_shape), dtype) for _ in range(solver_order + 1))


def step(sched: UniPCSchedule, i, model_output, sample, state, noise=None):
    """One `UniPCMultistepScheduler.step(model_output, timesteps[i], sample)` at step index i.

    model_output: the model's prediction (for Wan the flow velocity, after CFG) with the sample's
    shape. state: from `init_state` (step 0) or the previous step. noise: unused (UniPC is
    deterministic; accepted for a uniform API). Computed in float32; returns (prev_sample in the
    sample's dtype, new state).
    """
    del noise
    state = tuple(state)
    if len(state) < max(sched.state_size, 2):
        raise ValueError(f"this schedule needs a state of at least {max(sched.state_size, 2)} arrays (the last "
                         f"sample and {max(sched.num_prev, 1)} previous model outputs), got {len(state)}: use "
                         "init_state(shape, solver_order=cfg.solver_order)")
    s = jnp.asarray(sample).astype(jnp.float32)
    m0 = _convert(sched, i, jnp.asarray(model_output).astype(jnp.float32), s)
    prev_ms = [x.astype(jnp.float32) for x in state[1:1 + sched.num_prev]]
    width = sched.pc_d.shape[1]
    x = s
    if any(sched.corrector_orders):
        last, m1 = state[0].astype(jnp.float32), prev_ms[0]
        corr = _at(sched.cc_last, i) * last + _at(sched.cc_m1, i) * m1
        for k in range(1, min(width, len(prev_ms) - 1) + 1):
            corr = corr + _at(sched.cc_d, i)[k - 1] * (prev_ms[k] - m1)
        corr = corr + _at(sched.cc_t, i) * (m0 - m1)
        x = jnp.where(_at(sched.use_corrector, i), corr, s)
    prev = _at(sched.pc_sample, i) * x + _at(sched.pc_m0, i) * m0
    for k in range(1, min(width, len(prev_ms)) + 1):
        prev = prev + _at(sched.pc_d, i)[k - 1] * (prev_ms[k - 1] - m0)
    new = (x, m0) + tuple(state[1:-1])
    new_state = tuple(v.astype(old.dtype) for v, old in zip(new, state))
    return prev.astype(jnp.asarray(sample).dtype), new_state
