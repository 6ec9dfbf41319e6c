"""DPMSolverMultistepScheduler (PixArt's scheduler) as pure JAX: trajectory parity with diffusers.

Both sides start from the same float32 sample; at every step each side evaluates the same fake
"model" (numpy) on its own current sample and timestep and steps its scheduler; we compare the
samples after every step. diffusers is driven as PixArt's pipelines drive it: `set_timesteps(n)`,
`set_begin_index(0)`, `step(model_output, t, latents)` for t in `scheduler.timesteps`. The SDE
variants get the same noise on both sides (diffusers' `variance_noise`).

The fake model is a "denoiser": it believes the clean sample is
x0(x, t) = 0.8 tanh(x) + TARGET cos(4 t / 1000) and returns the epsilon / v / x0 (/ flow velocity)
consistent with that belief at the training alpha/sigma of t. Such a model makes the sampling ODE
contracting, as a real model does, so float32 rounding differences are not blown up from step to
step and the tolerance can stay tight (a model like `0.7 x + sin x` makes x0 = (x - sigma eps) /
alpha of order 1/alpha and doubles any 1-ulp difference every step). The belief moves with t so
that the multistep terms (m0 - m1, m1 - m2) are O(0.1..1): running a second-order config at
first order, a third-order one at second order, or heun as midpoint changes the trajectory by
3e-3..2e-2, far above the tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from xdit_jax.schedulers.dpmsolver import (
    INIT_NOISE_SIGMA,
    DPMSolverConfig,
    alphas_cumprod,
    init_state,
    make_schedule,
    step,
)

# scheduler/scheduler_config.json of PixArt-alpha (PixArt-Sigma ships the same values).
PIXART = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -math.inf,  # "-Infinity" in the JSON
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
SHAPE = (2, 4, 6, 5)  # (batch, channels, height, width), as PixArt latents
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers+numpy 2
TARGET = np.random.default_rng(123).standard_normal(SHAPE).astype(np.float32)

# Tolerance. Our per-step scalars replay diffusers' float32 arithmetic from bit-equal betas, but
# torch's float32 sqrt (MKL) is not always correctly rounded, so a few sigmas / alpha_t differ by
# an ulp (1.2e-7 relative), and we combine diffusers' D1 / D2 factors into one coefficient per
# term (one float32 rounding where diffusers rounds several intermediates). Over a contracting
# trajectory (|x| <= ~4) the measured worst difference is 0.2..7e-7 of max|x|, the largest at a
# final third-order step to sigma_min (coefficients ~8 on m0 - m1 and m1 - m2 that cancel; with
# another fake model we saw 2.2e-6 there, ours and diffusers' result being equally far, 8e-7,
# from a float64 evaluation of that step). We allow 1e-5 of max(1, max|x|), elementwise. A wrong
# coefficient, order switch or sigma shows up as >= 3e-3.
TOL = 1e-5


def _fake_model(x, t, ac, prediction_type, num_train_timesteps=1000):
    """The same numpy "denoiser" on both sides (float64 inside, float32 out); t is an int."""
    x = np.asarray(x, np.float64)
    x0 = 0.8 * np.tanh(x) + TARGET * np.cos(4.0 * t / num_train_timesteps)
    if prediction_type == "flow_prediction":
        sigma = max(t / num_train_timesteps, 1e-3)
        out = (x - x0) / sigma  # eps - x0 with eps = (x - (1 - sigma) x0) / sigma
    else:
        a = math.sqrt(ac[min(int(t), len(ac) - 1)])
        s = math.sqrt(1.0 - ac[min(int(t), len(ac) - 1)])
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    return out.astype(np.float32)


# The zero-SNR rescale square-roots the 1000 alphas_cumprod with torch's float32 sqrt, which is not correctly
# rounded on every CPU (1 ulp off in 19% of the values on an AMD EPYC, 0.6% on the Intel hosts), and diffusers then
# takes ratios of neighbours and multiplies 1000 of them again: those 1-ulp differences walk through the cumulative
# product (seen: up to 3.8e-6 relative, ~30 ulps, late in the schedule). A wrong rescale moves values by >= 1e-2.
ZERO_SNR_RTOL = 2e-5


def _diffusers(d, n, timesteps=None):
    sched = DPMSolverMultistepScheduler.from_config(d)
    if timesteps is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(timesteps=timesteps)
    sched.set_begin_index(0)  # as PixArtAlphaPipeline / PixArtSigmaPipeline do
    return sched


def _compare(d, n, seed=0, timesteps=None):
    """Run both schedulers over a whole trajectory; check timesteps, sigmas and every sample."""
    ref = _diffusers(d, n, timesteps)
    cfg = DPMSolverConfig.from_dict(d)
    sched = make_schedule(cfg, n, timesteps=timesteps) if timesteps is not None else make_schedule(cfg, n)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert sched.timesteps.dtype == np.int64
    assert sched.num_inference_steps == len(ref.timesteps)
    # sigmas agree to ~1 ulp (see TOL); 4 ulp of slack. Zero-SNR rescaled betas: see ZERO_SNR_RTOL.
    np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), atol=0,
                               rtol=ZERO_SNR_RTOL if d.get("rescale_betas_zero_snr") else 5e-7)

    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    pred = cfg.prediction_type
    rng = np.random.default_rng(seed)
    x_init = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(INIT_NOISE_SIGMA)
    sde = cfg.algorithm_type.startswith("sde-")
    noises = rng.standard_normal((len(sched.timesteps),) + SHAPE).astype(np.float32)

    x_ref, x = torch.from_numpy(x_init.copy()), jnp.asarray(x_init)
    state = init_state(SHAPE)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        kw = {"variance_noise": torch.from_numpy(noises[i])} if sde else {}
        out_ref = torch.from_numpy(_fake_model(x_ref.numpy(), int(t), ac, pred))
        x_ref = ref.step(out_ref, t, x_ref, return_dict=False, **kw)[0]
        out = _fake_model(np.asarray(x), int(sched.timesteps[i]), ac, pred)
        x, state = step(sched, i, out, x, state, noise=noises[i] if sde else None)
        want, got = x_ref.numpy(), np.asarray(x)
        assert got.dtype == np.float32 and got.shape == SHAPE
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * scale, err_msg=f"step {i} (t={int(t)})")
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    return sched, worst


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_pixart_trajectory(n):
    sched, _ = _compare(PIXART, n)
    # first order at the first step and (final sigma 0) at the last; second order in between
    assert sched.orders == (1,) + (2,) * (n - 2) + (1,) * (n > 1)


CASES = {
    "order1": (dict(solver_order=1), 7),
    "order3": (dict(solver_order=3), 7),
    "order3_20": (dict(solver_order=3), 20),
    "heun": (dict(solver_type="heun"), 7),
    "heun_order3_sigma_min": (dict(solver_type="heun", solver_order=3, final_sigmas_type="sigma_min"), 16),
    "v_prediction": (dict(prediction_type="v_prediction"), 7),
    "sample_prediction": (dict(prediction_type="sample"), 7),
    "trailing": (dict(timestep_spacing="trailing"), 7),
    "leading_offset": (dict(timestep_spacing="leading", steps_offset=1), 7),
    "sigma_min_7": (dict(final_sigmas_type="sigma_min"), 7),
    # >= 15 steps: no lower_order_final, so the last step is second order with sigma_min
    "sigma_min_20": (dict(final_sigmas_type="sigma_min"), 20),
    "euler_at_final": (dict(final_sigmas_type="sigma_min", euler_at_final=True), 20),
    "no_lower_order_final": (dict(lower_order_final=False, solver_order=3), 8),
    "dpmsolver": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 10),
    "dpmsolver_heun": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), 10),
    "dpmsolver_order3": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), 10),
    "dpmsolver_v": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"), 8),
    "dpmsolver_sample": (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample"), 8),
    "sde++": (dict(algorithm_type="sde-dpmsolver++"), 10),
    "sde++_heun": (dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), 10),
    "sde++_order3": (dict(algorithm_type="sde-dpmsolver++", solver_order=3), 10),
    "sde": (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), 10),
    "sde_heun": (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), 10),
    "scaled_linear": (SD, 10),
    "cosine_clipped": (dict(COSINE, lambda_min_clipped=-5.1), 10),
    "cosine_clipped_trailing": (dict(COSINE, lambda_min_clipped=-5.1, timestep_spacing="trailing"), 10),
    # trailing + heavy clipping: diffusers ends up with fewer timesteps than asked for
    "clipped_trailing_fewer_steps": (dict(lambda_min_clipped=-2.0, timestep_spacing="trailing"), 10),
    "karras": (dict(SD, use_karras_sigmas=True), 15),
    "karras_cosine": (dict(COSINE, use_karras_sigmas=True, lambda_min_clipped=-5.1), 12),
    "lu_lambdas": (dict(use_lu_lambdas=True), 12),
    # cosine betas: torch and we build them identically, so the (truncated, not rounded) sigma->t
    # timesteps agree exactly; with torch.linspace betas an ulp can move a timestep by one.
    "exponential": (dict(COSINE, use_exponential_sigmas=True), 12),
    "zero_snr_trailing_v": (dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                 prediction_type="v_prediction"), 10),
    "trained_betas": (dict(trained_betas=np.linspace(1e-4, 0.025, 1000).tolist()), 8),
    "flow": (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 10),
    "deis_alias": (dict(algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min"), 7),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates "dpmsolver" / "sde-dpmsolver"
@pytest.mark.parametrize("name", list(CASES))
def test_other_configs(name):
    overrides, n = CASES[name]
    sched, _ = _compare(dict(PIXART, **overrides), n)
    if name == "clipped_trailing_fewer_steps":
        assert sched.num_inference_steps == len(sched.timesteps) < n


def test_custom_timesteps():
    _compare(PIXART, None, timesteps=[999, 900, 750, 600, 420, 250, 120, 40, 5])


def test_alphas_cumprod_and_schedule_shape():
    for d in (PIXART, dict(PIXART, **SD), dict(PIXART, **COSINE)):
        # bit-equal (torch.linspace's fused multiply-add emulated; cumprod accumulates in float64)
        ref = DPMSolverMultistepScheduler.from_config(d)
        np.testing.assert_array_equal(alphas_cumprod(DPMSolverConfig.from_dict(d)), ref.alphas_cumprod.numpy())
    d = dict(PIXART, **SD, rescale_betas_zero_snr=True)
    ref = DPMSolverMultistepScheduler.from_config(d)
    # the zero-SNR rescale takes torch's sqrt, 1 ulp off at places (see ZERO_SNR_RTOL)
    np.testing.assert_allclose(alphas_cumprod(DPMSolverConfig.from_dict(d)), ref.alphas_cumprod.numpy(),
                               rtol=ZERO_SNR_RTOL, atol=0)
    sched = make_schedule(DPMSolverConfig.from_dict(PIXART), 20)
    assert len(sched) == 20 and sched.sigmas.shape == (21,) and sched.sigmas[-1] == 0
    assert sched.init_noise_sigma == INIT_NOISE_SIGMA == 1.0
    assert not sched.needs_noise and sched.max_order == 2


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_match_diffusers(spacing):
    d = dict(PIXART, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    cfg = DPMSolverConfig.from_dict(d)
    for n in list(range(1, 51)) + [64, 100, 250, 500]:
        ref = _diffusers(d, n)
        np.testing.assert_array_equal(make_schedule(cfg, n).timesteps, ref.timesteps.numpy(), err_msg=f"n={n}")


def test_jit_traced_step_index_one_compile():
    # Schedule passed as a pytree argument, i traced: one compiled step for all step indices.
    n = 12
    d = dict(PIXART, solver_order=3)
    ref = _diffusers(d, n)
    sched = make_schedule(DPMSolverConfig.from_dict(d), n)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    jstep = jax.jit(step)
    x_init = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_ref, x, state = torch.from_numpy(x_init.copy()), jnp.asarray(x_init), init_state(SHAPE)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(_fake_model(x_ref.numpy(), int(t), ac, "epsilon")), t, x_ref,
                         return_dict=False)[0]
        out = _fake_model(np.asarray(x), int(t), ac, "epsilon")
        x, state = jstep(sched, jnp.asarray(i, jnp.int32), out, x, state)
        want = x_ref.numpy()
        np.testing.assert_allclose(np.asarray(x), want, rtol=TOL, atol=TOL * max(1.0, np.abs(want).max()))
    assert jstep._cache_size() == 1


def test_whole_loop_in_fori_loop():
    # The PixArt loop as one program: schedule closed over, i a fori_loop counter, model in jnp.
    n = 20
    ref = _diffusers(PIXART, n)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    sched = make_schedule(DPMSolverConfig.from_dict(PIXART), n)
    x_init = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_init.copy())
    for t in ref.timesteps:
        x_ref = ref.step(torch.from_numpy(_fake_model(x_ref.numpy(), int(t), ac, "epsilon")), t, x_ref,
                         return_dict=False)[0]

    sqrt_a = jnp.asarray(np.sqrt(ac), jnp.float32)
    sqrt_s = jnp.asarray(np.sqrt(1.0 - ac), jnp.float32)
    target = jnp.asarray(TARGET)

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(sched.timesteps)[i]  # the value the transformer would get
        x0 = 0.8 * jnp.tanh(x) + target * jnp.cos(4.0 * t / 1000)  # = _fake_model, in float32
        eps = (x - sqrt_a[t] * x0) / sqrt_s[t]
        return step(sched, i, eps, x, state)

    run = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, (x, init_state(SHAPE, solver_order=2))))
    x, _ = run(jnp.asarray(x_init))
    # the jnp model in float32 vs numpy's float64 model: a few ulps per step, same tolerance.
    want = x_ref.numpy()
    np.testing.assert_allclose(np.asarray(x), want, rtol=TOL, atol=TOL * max(1.0, np.abs(want).max()))


def test_dtype_and_state_handling():
    cfg = DPMSolverConfig.from_dict(PIXART)
    sched = make_schedule(cfg, 5)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    prev, state = step(sched, 0, x, x, init_state(SHAPE, jnp.float32, solver_order=2))
    assert prev.dtype == jnp.bfloat16 and len(state) == 1 and state[0].dtype == jnp.float32
    assert init_state(SHAPE, solver_order=1) == ()
    assert len(init_state(SHAPE)) == 2
    with pytest.raises(ValueError, match="needs a state of 1 previous"):
        step(sched, 0, x, x, init_state(SHAPE, solver_order=1))
    # order 1 needs no state
    prev1, st1 = step(make_schedule(DPMSolverConfig.from_dict(dict(PIXART, solver_order=1)), 5), 0, x, x, ())
    assert st1 == ()
    sde = make_schedule(DPMSolverConfig.from_dict(dict(PIXART, algorithm_type="sde-dpmsolver++")), 5)
    assert sde.needs_noise
    with pytest.raises(ValueError, match="needs noise"):
        step(sde, 0, x, x, init_state(SHAPE))


def test_config_from_dict():
    cfg = DPMSolverConfig.from_dict(PIXART)
    assert cfg == DPMSolverConfig()  # PixArt ships diffusers' defaults
    assert cfg.lambda_min_clipped == -math.inf and cfg.init_noise_sigma == 1.0
    alias = DPMSolverConfig.from_dict(
        {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"})
    assert (alias.algorithm_type, alias.solver_type) == ("dpmsolver++", "midpoint")  # diffusers' mapping
    cfg = DPMSolverConfig.from_dict(dict(PIXART, trained_betas=[0.01] * 1000))
    assert isinstance(cfg.trained_betas, tuple)
    hash(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(thresholding=True), "thresholding"),
        (dict(algorithm_type="unipc"), "algorithm_type 'unipc' is not one of"),
        (dict(solver_type="euler"), "solver_type"),
        (dict(solver_order=4), "solver_order must be 1, 2 or 3"),
        (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3), "third-order"),
        (dict(algorithm_type="dpmsolver"), "use final_sigmas_type 'sigma_min'"),
        (dict(algorithm_type="deis"), "use 'sigma_min'"),  # diffusers raises here too
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="flow_prediction"),
         "flow_prediction"),
        (dict(beta_schedule="sigmoid"), "beta_schedule"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(variance_type="learned_range"), "drop the learned-variance channels"),
        (dict(use_beta_sigmas=True), "use_beta_sigmas"),
        (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one of"),
        (dict(use_dynamic_shifting=True), "use_dynamic_shifting"),
        (dict(trained_betas=[0.01] * 10), "trained_betas"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        DPMSolverConfig.from_dict(dict(PIXART, **overrides))


def test_bad_step_counts_raise():
    cfg = DPMSolverConfig.from_dict(PIXART)
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            make_schedule(cfg, n)
    with pytest.raises(ValueError, match="cannot be larger than num_train_timesteps"):
        make_schedule(cfg, 1001)
    # 1000 "linspace" steps repeat timesteps (hence sigmas): diffusers' step ratio becomes inf/nan.
    with pytest.raises(ValueError, match="repeated sigmas"):
        make_schedule(cfg, 1000)
    with pytest.raises(ValueError, match="custom timesteps cannot"):
        make_schedule(DPMSolverConfig.from_dict(dict(PIXART, use_karras_sigmas=True)), timesteps=[999, 500])
    with pytest.raises(ValueError, match="only one of"):
        make_schedule(cfg, 5, timesteps=[999, 500])
