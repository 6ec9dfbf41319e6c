"""UniPCMultistepScheduler (Wan 2.1's scheduler) as pure JAX: parity with diffusers.

Schedules: timesteps (int64) and sigmas are compared with diffusers' `set_timesteps` for many
step counts and flow shifts (flow sigmas: bit for bit; VP sigmas: to an ulp, see dpmsolver.py).

Trajectories: both sides start from the same float32 sample; at every step each side evaluates
the same fake "model" (numpy) on its own current sample and timestep and steps its scheduler; we
compare the samples after every step, and the predictor order diffusers used with ours. diffusers
is driven as WanPipeline drives it: `set_timesteps(n)`, `set_begin_index(0)`,
`step(model_output, t, latents)` for t in `scheduler.timesteps`.

The fake model is a "denoiser": it believes the clean sample is
x0(x, t) = 0.8 tanh(x) + TARGET cos(4 t / 1000) and returns the flow velocity (x - x0) / sigma
(sigma = t / 1000) or the epsilon / v / x0 consistent with that belief at the training
alpha/sigma of t. Such a model makes the sampling ODE contracting, as a real model does, so
float32 rounding differences are not blown up from step to step and the tolerance can stay tight.
The belief moves with t so that the multistep and corrector terms (m_i - m_{i-1}, ...) are
O(0.1..1): dropping the corrector, running bh1 as bh2 or a second-order config at first order
changes the trajectory by >= 1e-3 (test_tolerance_catches_wrong_solvers), far above the tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from xdit_jax.schedulers import SCHEDULERS, scheduler_from_config, unipc
from xdit_jax.schedulers.unipc import INIT_NOISE_SIGMA, UniPCConfig, init_state, make_schedule, step

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers (and -14B) scheduler/scheduler_config.json; 720p uses flow_shift 5.0.
WAN = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
# A VP (non-flow) config: diffusers' defaults, epsilon prediction.
VP = dict(WAN, use_flow_sigmas=False, prediction_type="epsilon", flow_shift=1.0)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (1, 4, 2, 3, 5)  # (batch, channels, frames, height, width), as Wan latents
TARGET = np.random.default_rng(123).standard_normal(SHAPE).astype(np.float32)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers+numpy 2

# Tolerance. Our per-step scalars replay diffusers' float32 arithmetic (flow sigmas bit-equal;
# VP sigmas from torch's float32 sqrt, ~1 ulp off at places), but we fold diffusers' factors
# (alpha_t * B(h), rhos from a float32 LAPACK solve, 1 / r_k) into one coefficient per term (one
# float32 rounding where diffusers rounds several intermediates: D1s = (m_k - m0) / r_k, the
# einsum, ...), and XLA may fuse multiply-adds. Over contracting trajectories (|x| <= ~4) the
# measured worst difference is 0..6e-7 of max(1, max|x|) for the data-prediction (predict_x0)
# configs, Wan's included, and up to 2.4e-6 for noise prediction (predict_x0=False, whose update
# is a difference of terms ~3x larger than the sample; see _compare's share_sigmas). We allow
# 1e-5 of max(1, max|x|), elementwise; a wrong coefficient, order, corrector or sigma shows up as
# >= 1e-3 (test_tolerance_catches_wrong_solvers).
TOL = 1e-5


def _fake_model(x, t, ac, prediction_type):
    """The same numpy "denoiser" on both sides (float64 inside, float32 out); t is an int."""
    x = np.asarray(x, np.float64)
    x0 = 0.8 * np.tanh(x) + TARGET * np.cos(4.0 * t / 1000)
    if prediction_type == "flow_prediction":
        sigma = max(t / 1000, 1e-3)
        out = (x - x0) / sigma  # eps - x0 with eps = (x - (1 - sigma) x0) / sigma
    else:
        a = math.sqrt(ac[min(int(t), len(ac) - 1)])
        s = math.sqrt(1.0 - ac[min(int(t), len(ac) - 1)])
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    return out.astype(np.float32)


def _diffusers(d, n=None, sigmas=None):
    sched = UniPCMultistepScheduler.from_config(d)
    sched.set_timesteps(n, sigmas=sigmas)
    sched.set_begin_index(0)  # as WanPipeline does
    return sched


def _reference_run(d, n, x_init, sigmas=None, use_sigmas=None):
    """diffusers' trajectory: every sample and the predictor order it used at each step.

    use_sigmas: replace diffusers' `scheduler.sigmas` after set_timesteps (see _compare).
    """
    ref = _diffusers(d, n, sigmas)
    if use_sigmas is not None:
        ref.sigmas = torch.from_numpy(np.array(use_sigmas, np.float32))
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    x, samples, orders = torch.from_numpy(x_init.copy()), [], []
    for t in ref.timesteps:
        x = ref.step(torch.from_numpy(_fake_model(x.numpy(), int(t), ac, d["prediction_type"])), t, x,
                     return_dict=False)[0]
        samples.append(x.numpy().copy())
        orders.append(ref.this_order)
    return ref, ac, samples, orders


def _compare(d, n, seed=0, sigmas=None, step_fn=step, share_sigmas=False):
    """Run both schedulers over a whole trajectory; check timesteps, sigmas, orders and every sample.

    share_sigmas: after checking that the sigmas agree (to an ulp), run diffusers with ours. For the
    VP noise-prediction (predict_x0=False) configs: there the update is a difference of terms ~3x
    larger than the sample (2.6 x - 1.6 eps at the first step), so the ~16% of torch's float32 VP
    sigmas that are an ulp off (MKL's sqrt; ours are correctly rounded) move diffusers' own
    trajectory by up to 2e-5 of max|x| (diffusers' own float32 trajectory is that far from a
    float64 evaluation of its update, too). Sharing the sigmas checks our arithmetic at TOL.
    """
    rng = np.random.default_rng(seed)
    x_init = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(INIT_NOISE_SIGMA)
    cfg = UniPCConfig.from_dict(d)
    sched = make_schedule(cfg, n, sigmas=sigmas)
    ref, ac, want, ref_orders = _reference_run(d, n, x_init, sigmas)
    if share_sigmas:
        _, ac, want, ref_orders = _reference_run(d, n, x_init, sigmas, use_sigmas=sched.sigmas)
    assert sched.timesteps.dtype == np.int64 and sched.sigmas.dtype == np.float32
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert len(sched) == sched.num_inference_steps == len(ref.timesteps)
    if cfg.use_flow_sigmas:
        np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    else:  # torch's float32 sqrt: ~1 ulp; 4 ulp of slack (the zero-SNR rescale takes more sqrts: 16)
        rtol = 2e-6 if cfg.rescale_betas_zero_snr else 5e-7
        np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=rtol, atol=0)
    assert sched.orders == tuple(ref_orders)

    x, state = jnp.asarray(x_init), init_state(SHAPE, solver_order=cfg.solver_order)
    worst = 0.0
    for i in range(len(sched)):
        out = _fake_model(np.asarray(x), int(sched.timesteps[i]), ac, cfg.prediction_type)
        x, state = step_fn(sched, i, out, x, state)
        got = np.asarray(x)
        assert got.dtype == np.float32 and got.shape == SHAPE
        scale = max(1.0, float(np.abs(want[i]).max()))
        np.testing.assert_allclose(got, want[i], rtol=TOL, atol=TOL * scale, err_msg=f"step {i}")
        worst = max(worst, float(np.abs(got - want[i]).max()) / scale)
    return sched, worst


# ----------------------------------------------------------------------------------------------
# Schedules (host side)


@pytest.mark.parametrize("shift", [3.0, 5.0, 1.0, 0.5, 7.3, 12])
def test_flow_schedule_matches_diffusers(shift):
    d = dict(WAN, flow_shift=shift)
    cfg = UniPCConfig.from_dict(d)
    ref = UniPCMultistepScheduler.from_config(d)
    for n in (1, 2, 3, 4, 5, 7, 10, 20, 30, 40, 50, 64, 100, 1000):
        ref.set_timesteps(n)
        sched = make_schedule(cfg, n)
        # int64, truncated (999.999 -> 999), as the transformer gets them in WanPipeline
        assert sched.timesteps.dtype == np.int64
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy(), err_msg=f"n={n}")
        np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy(), err_msg=f"n={n}")
        assert sched.sigmas.shape == (n + 1,) and sched.sigmas[-1] == 0 and sched.sigmas[0] < 1
        assert len(sched.orders) == n and sched.orders[0] == 1 and sched.orders[-1] == 1


def test_wan_schedule_values():
    s = make_schedule(UniPCConfig.from_dict(WAN), 5)
    assert s.timesteps.tolist() == [999, 923, 818, 667, 429]
    assert s.sigmas[0] == np.float32(1 - 1e-6) and s.sigmas[-1] == 0
    assert s.orders == (1, 2, 2, 2, 1) and s.corrector_orders == (0, 1, 2, 2, 2)
    assert s.num_prev == 2 and s.state_size == 3 and s.max_order == 2
    assert s.init_noise_sigma == INIT_NOISE_SIGMA == 1.0
    assert make_schedule(UniPCConfig.from_dict(WAN), 1).timesteps.tolist() == [999]


@pytest.mark.parametrize("overrides", [{}, SD, {"beta_schedule": "squaredcos_cap_v2"},
                                       {"timestep_spacing": "trailing"},
                                       {"timestep_spacing": "leading", "steps_offset": 1},
                                       {"final_sigmas_type": "sigma_min"}])
def test_vp_schedule_matches_diffusers(overrides):
    d = dict(VP, **overrides)
    cfg = UniPCConfig.from_dict(d)
    ref = UniPCMultistepScheduler.from_config(d)
    for n in (1, 2, 3, 5, 10, 25, 50, 100):
        ref.set_timesteps(n)
        sched = make_schedule(cfg, n)
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy(), err_msg=f"n={n}")
        np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=5e-7, atol=0, err_msg=f"n={n}")


# ----------------------------------------------------------------------------------------------
# Trajectories


@pytest.mark.parametrize("n, shift", [(1, 3.0), (2, 3.0), (3, 3.0), (5, 3.0), (10, 3.0), (50, 3.0), (4, 5.0),
                                      (30, 5.0), (8, 1.0)])
def test_wan_trajectory(n, shift):
    sched, _ = _compare(dict(WAN, flow_shift=shift), n)
    # first order at the first and (lower_order_final) the last step, second order in between;
    # the corrector at every step but the first, of the previous predictor's order
    assert sched.orders == (1,) + (2,) * (n - 2) + (1,) * (n > 1)
    assert sched.corrector_orders == (0,) + sched.orders[:-1]


CASES = {
    "order1": (dict(WAN, solver_order=1), 7),
    "order3": (dict(WAN, solver_order=3), 12),
    "order3_short": (dict(WAN, solver_order=3), 4),
    "flow_sigma_min": (dict(WAN, final_sigmas_type="sigma_min"), 9),  # the last step is a no-op
    "bh1_sigma_min": (dict(WAN, solver_type="bh1", final_sigmas_type="sigma_min"), 9),
    "bh1_order3_sigma_min": (dict(WAN, solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min",
                                  use_flow_sigmas=False, prediction_type="epsilon"), 10),
    "no_lower_order_final": (dict(WAN, lower_order_final=False, final_sigmas_type="sigma_min"), 8),
    "disable_corrector": (dict(WAN, disable_corrector=[0, 2, 3, 7]), 10),
    "disable_all_correctors": (dict(WAN, disable_corrector=list(range(6))), 6),
    "shift_terminal": (dict(WAN, flow_shift=5.0, shift_terminal=0.1), 10),
    "flow_epsilon": (dict(WAN, prediction_type="epsilon"), 6),  # flow alphas/sigmas, epsilon output
    "midpoint_alias": (dict(WAN, solver_type="midpoint"), 6),
    "vp_epsilon": (VP, 10),
    "vp_v_prediction_sd_order3": (dict(VP, **SD, prediction_type="v_prediction", solver_order=3), 12),
    "vp_sample": (dict(VP, prediction_type="sample"), 8),
    "vp_trailing": (dict(VP, timestep_spacing="trailing"), 10),
    "vp_leading_offset": (dict(VP, timestep_spacing="leading", steps_offset=1), 10),
    "vp_cosine": (dict(VP, beta_schedule="squaredcos_cap_v2"), 10),
    "vp_zero_snr_trailing_v": (dict(VP, **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    prediction_type="v_prediction"), 10),
    "vp_predict_eps": (dict(VP, predict_x0=False, final_sigmas_type="sigma_min"), 10),
    "vp_predict_eps_v_order3": (dict(VP, predict_x0=False, final_sigmas_type="sigma_min", solver_order=3,
                                     prediction_type="v_prediction"), 10),
    "vp_predict_eps_sample_bh1": (dict(VP, predict_x0=False, final_sigmas_type="sigma_min", solver_type="bh1",
                                       prediction_type="sample"), 10),
    "vp_order3_no_lower_order_final": (dict(VP, solver_order=3, lower_order_final=False,
                                            final_sigmas_type="sigma_min"), 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_other_configs(name):
    d, n = CASES[name]
    _compare(d, n, share_sigmas=not d["use_flow_sigmas"] and not d["predict_x0"])


def test_custom_flow_sigmas():
    sigmas = np.array([1.0, 0.9, 0.75, 0.6, 0.4, 0.25, 0.1, 0.03])
    sched, _ = _compare(WAN, None, sigmas=sigmas)
    assert len(sched) == 8
    # num_inference_steps may be given too when it matches
    np.testing.assert_array_equal(make_schedule(UniPCConfig.from_dict(WAN), 8, sigmas=list(sigmas)).sigmas,
                                  sched.sigmas)


def test_jit_traced_step_index_one_compile():
    # Schedule passed as a pytree argument, i traced: one compiled step for all step indices.
    jstep = jax.jit(step)
    _compare(dict(WAN, flow_shift=5.0), 12, seed=1,
             step_fn=lambda sched, i, out, x, state: jstep(sched, jnp.asarray(i, jnp.int32), out, x, state))
    assert jstep._cache_size() == 1


def test_whole_loop_in_fori_loop():
    # The Wan loop as one program: schedule closed over, i a fori_loop counter, model in jnp.
    n = 20
    x_init = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    _, _, want, _ = _reference_run(WAN, n, x_init)
    sched = make_schedule(UniPCConfig.from_dict(WAN), n)
    target = jnp.asarray(TARGET)

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(sched.timesteps)[i]  # the value the transformer would get (int32 under jit)
        x0 = 0.8 * jnp.tanh(x) + target * jnp.cos(4.0 * t / 1000)  # = _fake_model, in float32
        v = (x - x0) / jnp.maximum(t / 1000, 1e-3)
        return step(sched, i, v, x, state)

    run = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, (x, init_state(SHAPE, solver_order=2))))
    x, _ = run(jnp.asarray(x_init))
    # the jnp model in float32 vs numpy's float64 model: a few ulps per step, same tolerance.
    np.testing.assert_allclose(np.asarray(x), want[-1], rtol=TOL, atol=TOL * max(1.0, np.abs(want[-1]).max()))


def test_tolerance_catches_wrong_solvers():
    # The fake model exercises every term: plausible mistakes move the final sample by >> TOL.
    n = 10
    x_init = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    _, ac, want, _ = _reference_run(WAN, n, x_init)
    scale = max(1.0, float(np.abs(want[-1]).max()))
    for wrong in (dict(disable_corrector=list(range(n))), dict(solver_order=1), dict(solver_type="bh1",
                  final_sigmas_type="sigma_min"), dict(solver_order=3), dict(flow_shift=3.01)):
        sched = make_schedule(UniPCConfig.from_dict(dict(WAN, **wrong)), n)
        x, state = jnp.asarray(x_init), init_state(SHAPE)
        for i in range(n):
            x, state = step(sched, i, _fake_model(np.asarray(x), int(sched.timesteps[i]), ac, "flow_prediction"),
                            x, state)
        assert float(np.abs(np.asarray(x) - want[-1]).max()) / scale > 100 * TOL, wrong


# ----------------------------------------------------------------------------------------------
# API, state, configs


def test_dtype_and_state_handling():
    sched = make_schedule(UniPCConfig.from_dict(WAN), 5)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    prev, state = step(sched, 0, x, x, init_state(SHAPE, jnp.float32, solver_order=2))
    assert prev.dtype == jnp.bfloat16 and len(state) == 3 and all(s.dtype == jnp.float32 for s in state)
    assert len(init_state(SHAPE)) == 4 and len(init_state(SHAPE, solver_order=1)) == 2
    # a longer state than needed is kept (shifted) at its length
    _, st4 = step(sched, 0, x, x, init_state(SHAPE))
    assert len(st4) == 4
    with pytest.raises(ValueError, match="needs a state of at least 3"):
        step(sched, 0, x, x, init_state(SHAPE, solver_order=1))
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        init_state(SHAPE, solver_order=4)
    # order 1: (last sample, m1) suffices
    s1 = make_schedule(UniPCConfig.from_dict(dict(WAN, solver_order=1)), 5)
    assert s1.state_size == 2
    _, st = step(s1, 0, x, x, init_state(SHAPE, solver_order=1))
    assert len(st) == 2


def test_config_from_dict_and_registry():
    cfg = UniPCConfig.from_dict(WAN)
    assert cfg.disable_corrector == () and cfg.flow_shift == 3.0 and cfg.use_flow_sigmas
    assert cfg.init_noise_sigma == 1.0
    hash(cfg)
    assert UniPCConfig.from_dict({}) == UniPCConfig()
    assert UniPCConfig.from_dict(dict(WAN, solver_type="heun")).solver_type == "bh2"  # diffusers' mapping
    assert UniPCConfig.from_dict(dict(WAN, disable_corrector=[1, 2])).disable_corrector == (1, 2)
    assert SCHEDULERS["UniPCMultistepScheduler"] == (unipc, "UniPCConfig")
    module, cfg2 = scheduler_from_config(WAN)
    assert module is unipc and cfg2 == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(thresholding=True), "thresholding"),
        (dict(solver_type="euler"), "solver_type 'euler'"),
        (dict(solver_order=4), "solver_order must be 1, 2 or 3"),
        (dict(solver_order=0), "solver_order must be 1, 2 or 3"),
        (dict(prediction_type="x0"), "prediction_type 'x0'"),
        (dict(predict_x0=False, final_sigmas_type="sigma_min"), "flow_prediction' needs predict_x0"),
        (dict(use_karras_sigmas=True), "use_karras_sigmas"),
        (dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
        (dict(use_beta_sigmas=True), "use_beta_sigmas"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "only one of"),
        (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
        (dict(solver_p="DPMSolverMultistepScheduler"), "solver_p"),
        (dict(beta_schedule="sigmoid", use_flow_sigmas=False), "beta_schedule"),
        (dict(trained_betas=[0.01] * 10), "trained_betas"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(flow_shift=0.0), "flow_shift"),
        (dict(flow_shift=math.inf), "flow_shift"),
        (dict(shift_terminal=1.0), "shift_terminal"),
        (dict(VP, shift_terminal=0.1), "only supported with use_flow_sigmas"),
        (dict(disable_corrector=["0"]), "disable_corrector"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        # diffusers returns NaN / inf for these
        (dict(solver_type="bh1"), "'bh1' with final_sigmas_type 'zero'"),
        (dict(VP, predict_x0=False), "predict_x0=False with final_sigmas_type 'zero'"),
        (dict(lower_order_final=False), "lower_order_final=False with final_sigmas_type 'zero'"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        UniPCConfig.from_dict(dict(WAN, **overrides))


def test_bad_schedule_raises():
    cfg = UniPCConfig.from_dict(WAN)
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            make_schedule(cfg, n)
    with pytest.raises(ValueError, match="must be an integer"):
        make_schedule(cfg, 2.5)
    with pytest.raises(ValueError, match="pass num_inference_steps or sigmas"):
        make_schedule(cfg)
    with pytest.raises(ValueError, match="only supported with use_flow_sigmas"):
        make_schedule(UniPCConfig.from_dict(VP), sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="sigmas has 2 entries"):
        make_schedule(cfg, 3, sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="non-finite sigmas"):
        make_schedule(UniPCConfig.from_dict(dict(WAN, shift_terminal=0.1)), 1)
    with pytest.raises(ValueError, match="cannot be larger than num_train_timesteps"):
        make_schedule(UniPCConfig.from_dict(VP), 1001)
    # 1000 "linspace" VP steps repeat timesteps (hence sigmas): diffusers' r_k becomes inf / nan.
    with pytest.raises(ValueError, match="repeated or degenerate sigmas"):
        make_schedule(UniPCConfig.from_dict(VP), 1000)
    # flow sigma_min repeats the last sigma; a third-order last step there is NaN in diffusers too
    with pytest.raises(ValueError, match="non-finite pc_d at step indices \\[7\\]"):
        make_schedule(UniPCConfig.from_dict(dict(WAN, solver_order=3, lower_order_final=False,
                                                 final_sigmas_type="sigma_min")), 8)


@pytest.mark.parametrize("n,start,kw", [(8, 3, {}), (6, 1, dict(solver_order=3)), (5, 4, {}),
                                        (7, 2, dict(disable_corrector=[3]))])
def test_from_step_matches_diffusers_started_late(n, start, kw):
    """from_step == diffusers' scheduler run from timesteps[start] without set_begin_index (Wan video-to-video: its
    step index found from the timestep, no history yet): timesteps, orders and every sample."""
    from xdit_jax.schedulers.unipc import from_step

    d = dict(WAN, **kw)
    ref = UniPCMultistepScheduler.from_config(d)
    ref.set_timesteps(n)
    x_init = np.random.default_rng(start).standard_normal(SHAPE).astype(np.float32)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    x, want, orders = torch.from_numpy(x_init.copy()), [], []
    for t in ref.timesteps[start:]:
        x = ref.step(torch.from_numpy(_fake_model(x.numpy(), int(t), ac, d["prediction_type"])), t, x,
                     return_dict=False)[0]
        want.append(x.numpy().copy())
        orders.append(ref.this_order)
    cfg = UniPCConfig.from_dict(d)
    sched = from_step(cfg, make_schedule(cfg, n), start)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy()[start:])
    assert sched.orders == tuple(orders) and len(sched) == n - start
    x, state = jnp.asarray(x_init), init_state(SHAPE, solver_order=cfg.solver_order)
    for i in range(len(sched)):
        x, state = step(sched, i, _fake_model(np.asarray(x), int(sched.timesteps[i]), ac, cfg.prediction_type), x,
                        state)
        np.testing.assert_allclose(np.asarray(x), want[i], rtol=TOL, atol=TOL * max(1.0, np.abs(want[i]).max()),
                                   err_msg=f"step {i}")
    with pytest.raises(ValueError, match="No denoising step left"):
        from_step(cfg, sched, len(sched))
