"""DDPMScheduler (HunyuanDiT's scheduler) as pure JAX: trajectory parity with diffusers.

Both sides start from the same float32 sample; at every step each side evaluates the same fake
"model" (numpy) on its own current sample and timestep and steps its scheduler; we compare the
samples after every step. diffusers is driven as HunyuanDiTPipeline drives it: `set_timesteps(n)`,
then `step(model_output, t, latents)` for t in `scheduler.timesteps`. diffusers draws its
`variance_noise` inside `step` with `randn_tensor(...)` (only where t > 0); we patch that function
in `diffusers.schedulers.scheduling_ddpm` to hand out the same array we pass as `noise` to ours,
and record at which steps it was called.

The fake model is a "denoiser" (as in tests/test_dpmsolver.py): it believes the clean sample is
x0(x, t) = 0.8 tanh(x) + TARGET cos(4 t / 1000) and returns the epsilon / v / x0 consistent with
that belief at the training alphas_cumprod of t. That keeps the update contracting (the posterior
mean is c_x0 x0(x) + c_sample x, with both coefficients < 1), so rounding differences are not
amplified along the trajectory. TARGET ~ N(0, 1), so x0 often exceeds 1 and clip_sample clips
a good share of the elements.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from xdit_jax.schedulers.ddpm import (
    INIT_NOISE_SIGMA,
    DDPMConfig,
    alphas_cumprod,
    init_state,
    make_schedule,
    predict_x0,
    step,
)

# HunyuanDiT's scheduler/scheduler_config.json (Tencent-Hunyuan/HunyuanDiT*-Diffusers): the values
# of HunyuanDiT's SAMPLER_FACTORY["ddpm"] plus diffusers' defaults, as diffusers saves them.
HUNYUAN = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "beta_end": 0.03,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "variance_type": "fixed_small",
}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
SHAPE = (2, 4, 6, 5)  # (batch, channels, height, width), as HunyuanDiT latents
TARGET = np.random.default_rng(123).standard_normal(SHAPE).astype(np.float32)

# Tolerance. Our per-step scalars replay diffusers' float32 0-d tensor arithmetic (same operations,
# same order) from bit-equal alphas_cumprod, so they are equal or 1 ulp apart (torch's MKL float32
# sqrt is not always correctly rounded; numpy's is). The step is the same float32 formula (x0
# conversion, clip, c_x0 * x0 + c_sample * x + std * noise); eager, it rounds like torch (most
# cases come out bit-equal); jitted, XLA fuses it (multiply-adds, division by a closed-over constant
# turned into a multiplication) and rounds differently by ~an ulp. Measured, as a fraction of
# max(1, max|x|) (the noise makes |x| up to ~4): up to 50 steps at most 3e-7 (2.5 ulps), so we
# allow TOL = 1e-6 (8 ulps), elementwise. Over many steps the per-step differences add up because
# the chain is only weakly contracting there (c_sample -> 1 as the steps get short): measured
# 6 ulps jitted over 100 steps, 2.9 ulps eager and up to 10.4 ulps (1.24e-6) jitted over 999 steps
# (two seeds), so past 50 steps we allow TOL_LONG = 4e-6 (34 ulps).
# One more factor, for epsilon prediction: x0 = (x - sqrt(1 - a) eps) / sqrt(a) cancels at low
# SNR, so half an ulp of rounding in sqrt(1 - a) * eps reaches the new sample multiplied by
# kappa = c_x0 / sqrt(a) (420 for the 2 "linspace" steps 999 -> 0 of HunyuanDiT's betas; < 2 in
# the other cases). There diffusers' own result is 336 u (u = 2^-24 of max|x|) from a float64
# evaluation of that step, our jitted one 2 u (XLA's fused multiply-add skips that rounding). So
# the tolerance at step i is multiplied by max(1, kappa_j for j <= i) (the error is carried on,
# the contracting chain does not enlarge it). A wrong coefficient or previous timestep, a wrong
# variance type or a missing clip changes the trajectory by >= 3e-2; a missing noise term at the
# last "leading" step (std 1e-10) is caught by counting diffusers' noise draws instead.
TOL = 1e-6
TOL_LONG = 4e-6
# (32 ulps). A wrong coefficient or previous timestep, a wrong variance type or a missing clip
# changes the trajectory by >= 3e-2; a missing noise term at the last "leading" step (std 1e-10)
# is caught by counting diffusers' noise draws instead.
TOL = 1e-6
TOL_LONG = 4e-6


def _fake_model(x, t, ac, prediction_type):
    """The same numpy "denoiser" on both sides (float64 inside, float32 out); t is an int."""
    x = np.asarray(x, np.float64)
    x0 = 0.8 * np.tanh(x) + TARGET * np.cos(4.0 * t / 1000)
    a, s = np.sqrt(ac[t]), np.sqrt(1.0 - ac[t])
    eps = (x - a * x0) / s
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    return out.astype(np.float32)


class _PatchedNoise:
    """Stands in for diffusers' randn_tensor: returns `self.next` (torch) and records the calls."""

    def __init__(self):
        self.next = None
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.next.shape) and dtype == torch.float32
        self.calls += 1
        return self.next.clone()


@pytest.fixture
def patched_noise(monkeypatch):
    fake = _PatchedNoise()
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake)
    return fake


def _diffusers(d, n, timesteps=None):
    sched = DDPMScheduler.from_config(d)
    if timesteps is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(timesteps=timesteps)
    return sched


def _compare(d, n, patched_noise, seed=0, timesteps=None, jit=False):
    """Run both schedulers over a whole trajectory; check timesteps and every sample.

    Returns our schedule and the worst difference seen, in units of max(1, max|x|) / kappa."""
    ref = _diffusers(d, n, timesteps)
    cfg = DDPMConfig.from_dict(d)
    sched = make_schedule(cfg, timesteps=timesteps) if timesteps is not None else make_schedule(cfg, n)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert sched.timesteps.dtype == np.int64 and len(sched) == len(ref.timesteps)

    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    pred = cfg.prediction_type
    rng = np.random.default_rng(seed)
    x_init = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(INIT_NOISE_SIGMA)
    noises = rng.standard_normal((len(sched),) + SHAPE).astype(np.float32)
    # a fresh function per call: jax.jit(step) objects share one compilation cache
    fn = jax.jit(lambda *a, **k: step(*a, **k)) if jit else step

    x_ref, x = torch.from_numpy(x_init.copy()), jnp.asarray(x_init)
    state = init_state(SHAPE)
    tol = TOL if len(sched) <= 50 else TOL_LONG
    kappa = sched.c_x0 / sched.sqrt_alpha_prod if pred == "epsilon" else np.ones(len(sched))
    kappa = np.maximum.accumulate(np.maximum(kappa, 1.0))
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        # diffusers draws (and adds) noise exactly where t > 0; our c_noise is 0 exactly at t == 0
        patched_noise.next, calls = torch.from_numpy(noises[i]), patched_noise.calls
        out_ref = torch.from_numpy(_fake_model(x_ref.numpy(), int(t), ac, pred))
        x_ref = ref.step(out_ref, t, x_ref, return_dict=False)[0]
        assert patched_noise.calls - calls == int(t > 0) == int(sched.c_noise[i] != 0), f"step {i} (t={int(t)})"
        out = _fake_model(np.asarray(x), int(sched.timesteps[i]), ac, pred)
        x, state = fn(sched, jnp.asarray(i, jnp.int32) if jit else i, out, x, state, noise=noises[i])
        want, got = x_ref.numpy(), np.asarray(x)
        assert got.dtype == np.float32 and got.shape == SHAPE and state == ()
        assert np.all(np.isfinite(want))
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=tol * kappa[i], atol=tol * kappa[i] * scale,
                                   err_msg=f"step {i} (t={int(t)})")
        worst = max(worst, float(np.abs(got - want).max()) / scale / kappa[i])
    if jit:
        assert fn._cache_size() == 1
    return sched, worst


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_hunyuandit_trajectory(n, patched_noise):
    sched, _ = _compare(HUNYUAN, n, patched_noise)
    # "leading" with steps_offset=1: timesteps k * (1000 // n) + 1, the last is 1 (> 0, so diffusers
    # adds noise there too, of std sqrt(1e-20) for fixed_small: the posterior variance is 0).
    assert sched.timesteps[-1] == 1 and sched.timesteps[0] == (n - 1) * (1000 // n) + 1
    assert sched.needs_noise and 0 < sched.c_noise[-1] < 1e-9
    assert sched.prev_timesteps[-1] == -1
    np.testing.assert_array_equal(sched.prev_timesteps[:-1], sched.timesteps[1:])


CASES = {
    # variance types (fixed_small is HunyuanDiT's)
    "fixed_small_log": (dict(variance_type="fixed_small_log"), 7),
    "fixed_large": (dict(variance_type="fixed_large"), 7),
    "fixed_large_50": (dict(variance_type="fixed_large"), 50),
    # prediction types
    "epsilon": (dict(prediction_type="epsilon"), 7),
    "sample": (dict(prediction_type="sample"), 7),
    # spacings (the last timestep is 0 for all of these: no noise at the last step)
    "leading_no_offset": (dict(steps_offset=0), 7),
    "trailing": (dict(timestep_spacing="trailing"), 7),
    "trailing_50": (dict(timestep_spacing="trailing", variance_type="fixed_large"), 50),
    "linspace": (dict(timestep_spacing="linspace"), 7),
    "linspace_1": (dict(timestep_spacing="linspace"), 1),
    "linspace_2_epsilon": (dict(timestep_spacing="linspace", prediction_type="epsilon"), 2),
    # clip_sample (diffusers' default) on each prediction type and a wider range
    "clip_v": (dict(clip_sample=True), 7),
    "clip_epsilon_large": (dict(clip_sample=True, prediction_type="epsilon", variance_type="fixed_large"), 7),
    "clip_sample_trailing": (dict(clip_sample=True, prediction_type="sample", timestep_spacing="trailing"), 7),
    "clip_range_2_log": (dict(clip_sample=True, clip_sample_range=2.0, variance_type="fixed_small_log"), 7),
    "clip_50": (dict(clip_sample=True), 50),
    # other beta schedules
    "linear_ddpm_defaults": (dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True,
                                  prediction_type="epsilon", steps_offset=0), 10),
    "cosine_epsilon": (dict(COSINE, prediction_type="epsilon", steps_offset=0), 10),
    "cosine_trailing_large": (dict(COSINE, timestep_spacing="trailing", variance_type="fixed_large"), 10),
    "trained_betas": (dict(trained_betas=np.linspace(1e-4, 0.025, 1000).tolist()), 8),
    "zero_snr_trailing_v": (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10),
    "small_T": (dict(num_train_timesteps=100, timestep_spacing="linspace", clip_sample=True), 100),
    # many steps: n close to num_train_timesteps
    "leading_999": (dict(steps_offset=1), 999),
    "trailing_1000": (dict(timestep_spacing="trailing", prediction_type="epsilon"), 1000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_other_configs(name, patched_noise):
    overrides, n = CASES[name]
    sched, _ = _compare(dict(HUNYUAN, **overrides), n, patched_noise, jit=n > 100)
    if name == "trailing_1000":
        np.testing.assert_array_equal(sched.timesteps, np.arange(999, -1, -1))


def test_custom_timesteps(patched_noise):
    # ends at t = 5 > 0: diffusers adds noise at the last step too (fixed_large: std sqrt(1 - ac[5]))
    ts = [999, 900, 750, 600, 420, 250, 120, 40, 5]
    sched, _ = _compare(dict(HUNYUAN, variance_type="fixed_large"), None, patched_noise, timesteps=ts)
    assert sched.c_noise[-1] > 0.05
    _compare(HUNYUAN, None, patched_noise, timesteps=[700, 300, 0])


@pytest.mark.parametrize("overrides, n", [
    (dict(clip_sample=True), 20),
    (dict(timestep_spacing="linspace", prediction_type="epsilon"), 2),  # kappa = 420 (see TOL)
    (dict(timestep_spacing="trailing", variance_type="fixed_large", prediction_type="sample"), 50),
])
def test_jit_traced_step_index_one_compile(overrides, n, patched_noise):
    # Schedule passed as a pytree argument, i traced: one compiled step for all step indices.
    _compare(dict(HUNYUAN, **overrides), n, patched_noise, jit=True)


def test_whole_loop_in_fori_loop(patched_noise):
    # The HunyuanDiT loop as one program: schedule closed over, i a fori_loop counter, model in jnp,
    # the noise of step i read from a stacked array.
    n = 25
    ref = _diffusers(HUNYUAN, n)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)
    sched = make_schedule(DDPMConfig.from_dict(HUNYUAN), n)
    rng = np.random.default_rng(2)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_init.copy())
    for i, t in enumerate(ref.timesteps):
        patched_noise.next = torch.from_numpy(noises[i])
        x_ref = ref.step(torch.from_numpy(_fake_model(x_ref.numpy(), int(t), ac, "v_prediction")), t, x_ref,
                         return_dict=False)[0]

    sqrt_a = jnp.asarray(np.sqrt(ac), jnp.float32)
    sqrt_s = jnp.asarray(np.sqrt(1.0 - ac), jnp.float32)
    target, noise_all = jnp.asarray(TARGET), jnp.asarray(noises)

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(sched.timesteps)[i]  # the value the transformer would get
        x0 = 0.8 * jnp.tanh(x) + target * jnp.cos(4.0 * t / 1000)  # = _fake_model, in float32
        v = sqrt_a[t] * ((x - sqrt_a[t] * x0) / sqrt_s[t]) - sqrt_s[t] * x0
        return step(sched, i, v, x, state, noise=noise_all[i])

    run = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, (x, init_state(SHAPE))))
    x, state = run(jnp.asarray(x_init))
    assert state == ()
    # the jnp model in float32 vs numpy's float64 model: a few ulps per step, same tolerance.
    want = x_ref.numpy()
    np.testing.assert_allclose(np.asarray(x), want, rtol=TOL, atol=TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
    """Every n in 1..1000: ours equal diffusers', or we raise where diffusers goes out of range."""
    d = dict(HUNYUAN, timestep_spacing=spacing, steps_offset=offset)
    cfg = DDPMConfig.from_dict(d)
    ref = DDPMScheduler.from_config(d)
    raised = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        want = ref.timesteps.numpy()
        if len(want) == n and 0 <= want.min() and want.max() < 1000:
            np.testing.assert_array_equal(make_schedule(cfg, n).timesteps, want, err_msg=f"n={n}")
        else:
            with pytest.raises(ValueError, match="use another num_inference_steps"):
                make_schedule(cfg, n)
            raised.append(n)
    if spacing == "leading":
        assert raised == ([1000] if offset else [])  # t = 1000 with steps_offset=1
    elif spacing == "trailing":
        assert 61 in raised and 0 < len(raised) < 300  # numpy arange overshoot: n + 1 steps ending in -1
    else:
        assert raised == []


def test_coefficients_match_diffusers_scalars():
    # The per-step scalars against diffusers' own 0-d float32 tensors, for every step of 50.
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large"):
        d = dict(HUNYUAN, variance_type=variance_type)
        ref = _diffusers(d, 50)
        sched = make_schedule(DDPMConfig.from_dict(d), 50)
        for i, t in enumerate(ref.timesteps):
            prev_t = ref.previous_timestep(t)
            assert int(prev_t) == sched.prev_timesteps[i]
            a_t = ref.alphas_cumprod[t]
            a_p = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.one
            c_x0 = (a_p**0.5 * (1 - a_t / a_p)) / (1 - a_t)
            c_s = (a_t / a_p) ** 0.5 * (1 - a_p) / (1 - a_t)
            var = ref._get_variance(t)
            std = var if variance_type == "fixed_small_log" else var**0.5
            got = [sched.c_x0[i], sched.c_sample[i], sched.c_noise[i], sched.sqrt_alpha_prod[i],
                   sched.sqrt_beta_prod[i]]
            want = [float(c_x0), float(c_s), float(std), float(a_t**0.5), float((1 - a_t) ** 0.5)]
            # equal up to torch's float32 sqrt / log / exp rounding: <= 2 ulp
            np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0, err_msg=f"{variance_type} step {i}")


def test_alphas_cumprod():
    for over in ({}, dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), COSINE):
        d = dict(HUNYUAN, **over)
        # bit-equal (torch.linspace's fused multiply-add emulated; cumprod accumulates in float64)
        np.testing.assert_array_equal(alphas_cumprod(DDPMConfig.from_dict(d)),
                                      DDPMScheduler.from_config(d).alphas_cumprod.numpy())
    d = dict(HUNYUAN, rescale_betas_zero_snr=True)
    ours, ref = alphas_cumprod(DDPMConfig.from_dict(d)), DDPMScheduler.from_config(d).alphas_cumprod.numpy()
    # the zero-SNR rescale takes torch's float32 sqrt, not correctly rounded on every CPU (1 ulp off in 19% of the
    # values on an AMD EPYC), and the 1000-factor cumulative product of neighbour ratios after it walks those ulps
    # up (seen: 2.1e-6 relative); a wrong rescale moves values by >= 1e-2.
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=0)
    assert ours[-1] == ref[-1] == 0  # DDPM keeps alphas_cumprod[-1] == 0 (unlike DPM-Solver)


def test_predict_x0_dtype_and_state():
    cfg = DDPMConfig.from_dict(dict(HUNYUAN, clip_sample=True, clip_sample_range=1.5))
    sched = make_schedule(cfg, 5)
    assert sched.init_noise_sigma == cfg.init_noise_sigma == INIT_NOISE_SIGMA == 1.0
    x = jnp.full(SHAPE, 3.0, jnp.bfloat16)
    prev, state = step(sched, 0, x, x, init_state(SHAPE, jnp.bfloat16), noise=jnp.zeros(SHAPE))
    assert prev.dtype == jnp.bfloat16 and state == ()
    assert float(jnp.abs(predict_x0(sched, 0, x, x)).max()) == 1.5  # clipped
    with pytest.raises(ValueError, match="pass noise"):
        step(sched, 0, x, x, ())
    # a schedule with t == 0 only adds no noise, so it needs none
    one = make_schedule(DDPMConfig.from_dict(dict(HUNYUAN, timestep_spacing="linspace")), 1)
    assert one.timesteps.tolist() == [0] and not one.needs_noise
    step(one, 0, x, x, ())


def test_config_from_dict():
    cfg = DDPMConfig.from_dict(HUNYUAN)
    assert (cfg.prediction_type, cfg.variance_type, cfg.timestep_spacing, cfg.steps_offset) == (
        "v_prediction", "fixed_small", "leading", 1)
    assert DDPMConfig.from_dict({"_class_name": "DDPMScheduler"}) == DDPMConfig()  # diffusers' defaults
    cfg = DDPMConfig.from_dict(dict(HUNYUAN, trained_betas=[0.01] * 1000))
    assert isinstance(cfg.trained_betas, tuple)
    hash(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(thresholding=True), "thresholding"),
        (dict(variance_type="learned"), "needs the model's predicted variance"),
        (dict(variance_type="learned_range"), "needs the model's predicted variance"),
        (dict(variance_type="fixed_large_log"), "NaN"),
        (dict(variance_type="fixed"), "variance_type 'fixed' is not one of"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
        (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid' is not supported"),
        (dict(beta_schedule="laplace"), "beta_schedule 'laplace' is not supported"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
        (dict(trained_betas=[0.01] * 10), "trained_betas has 10 entries"),
        (dict(clip_sample=True, clip_sample_range=0.0), "clip_sample_range"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        DDPMConfig.from_dict(dict(HUNYUAN, **overrides))


def test_fixed_large_log_is_nan_in_diffusers():
    # why we refuse it: diffusers' step takes (log beta_t) ** 0.5
    ref = _diffusers(dict(HUNYUAN, variance_type="fixed_large_log"), 5)
    x = torch.ones(SHAPE)
    assert torch.isnan(ref.step(x, ref.timesteps[0], x, return_dict=False)[0]).all()


def test_bad_step_counts_raise():
    cfg = DDPMConfig.from_dict(HUNYUAN)
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            make_schedule(cfg, n)
    with pytest.raises(ValueError, match="cannot be larger than num_train_timesteps"):
        make_schedule(cfg, 1001)
    with pytest.raises(ValueError, match="only one of"):
        make_schedule(cfg, 5, timesteps=[999, 500])
    with pytest.raises(ValueError, match="pass num_inference_steps or timesteps"):
        make_schedule(cfg)
    with pytest.raises(ValueError, match="strictly descending"):
        make_schedule(cfg, timesteps=[500, 500, 1])
    for bad in ([1000, 500], [500, -1]):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
            make_schedule(cfg, timesteps=bad)
    with pytest.raises(ValueError, match="zero-SNR"):  # epsilon at alphas_cumprod[t] == 0
        make_schedule(DDPMConfig.from_dict(dict(HUNYUAN, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                                prediction_type="epsilon")), 10)
    with pytest.raises(ValueError, match="non-finite"):  # beta_0 == 0: 1 - alphas_cumprod[0] == 0
        make_schedule(DDPMConfig.from_dict(dict(HUNYUAN, trained_betas=[0.0] + [0.01] * 999,
                                                timestep_spacing="linspace")), 10)
