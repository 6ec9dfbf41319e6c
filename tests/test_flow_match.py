"""FlowMatchEulerDiscreteScheduler (Mochi / SD3 / Flux / LTX) as pure JAX: parity with diffusers.

Schedules: timesteps and sigmas are compared bit for bit with diffusers' `set_timesteps` (we
replay its numpy float64 / float32 and torch float32 arithmetic) over many configs and step
counts, with default, custom (Mochi's `linear_quadratic_schedule`) and timestep inputs.

Trajectories: both sides start from the same float32 sample; at every step each side evaluates
the same fake "model" (numpy) on its own current sample and timestep and steps its scheduler
(ours jitted once per shape, the step index traced); we compare the samples after every step.
diffusers is driven as Mochi's pipeline drives it: `set_timesteps(...)`, `set_begin_index(0)`,
`step(model_output, t, latents)` for t in `scheduler.timesteps`. With stochastic_sampling
diffusers draws its noise inside `step` with `randn_tensor`; we patch that to hand out the array
we pass as `noise` to ours.

The fake model is a flow-matching "denoiser": it believes the clean sample is
x0(x, t) = 0.8 tanh(x) + TARGET cos(4 t / N) and returns the velocity consistent with that at
the noise level of t (t / N; 1 - t / N for inverted sigmas), so each Euler step moves the sample
towards x0: the ODE is contracting, as with a real model, and rounding differences are not blown
up from step to step.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import (
    calculate_shift as calculate_shift_ref,
)
from diffusers.pipelines.mochi.pipeline_mochi import (
    linear_quadratic_schedule as linear_quadratic_ref,
)
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm_ref
from diffusers.utils import logging as diffusers_logging

from xdit_jax.schedulers import SCHEDULERS, scheduler_from_config
from xdit_jax.schedulers import flow_match as fm
from xdit_jax.schedulers.flow_match import (
    INIT_NOISE_SIGMA,
    FlowMatchEulerConfig,
    calculate_shift,
    init_state,
    linear_quadratic_schedule,
    make_schedule,
    step,
)

# genmo/mochi-1-preview scheduler/scheduler_config.json
MOCHI = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.32.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": True,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
LTX = {"base_image_seq_len": 1024, "base_shift": 0.95, "max_image_seq_len": 4096, "max_shift": 2.05,
       "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.1, "use_dynamic_shifting": True}

# Schedule configs: (diffusers config, mu values to try (None: no dynamic shifting)).
CONFIGS = {
    "default": ({}, [None]),
    "sd3_shift3": (SD3, [None]),
    "shift_1.7": ({"shift": 1.7}, [None]),
    "shift_7.3": ({"shift": 7.3}, [None]),
    "shift_0.37": ({"shift": 0.37}, [None]),
    "shift_int": ({"shift": 5}, [None]),  # a JSON integer
    "train_777": ({"num_train_timesteps": 777, "shift": 2.9}, [None]),
    "flux_dynamic": (FLUX, [0.5, 1.15, 2.3]),
    "dynamic_linear": (dict(FLUX, time_shift_type="linear"), [0.7, 1.15, 3.0]),
    "ltx_terminal": (LTX, [0.95, 2.05]),
    "shift_terminal": (dict(SD3, shift_terminal=0.05), [None]),
    "karras": (dict(SD3, use_karras_sigmas=True), [None]),
    "karras_terminal": ({"use_karras_sigmas": True, "shift_terminal": 0.2}, [None]),
    "exponential": (dict(SD3, use_exponential_sigmas=True), [None]),
    "exponential_dynamic": (dict(FLUX, use_exponential_sigmas=True), [1.1]),
    "beta": (dict(SD3, use_beta_sigmas=True), [None]),
    "mochi_invert": (MOCHI, [None]),
    "invert_shift3": (dict(SD3, invert_sigmas=True), [None]),
}
STEP_COUNTS = [1, 2, 3, 4, 7, 20, 28, 50, 64, 100]
SHAPE = (2, 3, 4, 5)
TARGET = np.random.default_rng(123).standard_normal(SHAPE).astype(np.float32)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers+numpy 2

# Tolerance. Schedules are bit-equal and each side evaluates the same numpy model, so the only
# difference is the rounding of `sample + dt * v` (XLA may fuse it into one FMA, one rounding
# where torch rounds twice): <= ~1 ulp of the sample per step, and the contracting ODE does not
# amplify it (the fake model then sees inputs an ulp apart, changing v by ~1 ulp too). Measured
# on this CPU: worst 1e-7 of max(1, max|x|) over 70-step trajectories. We allow 2e-6 of
# max(1, max|x|) elementwise; a wrong sigma, dt or off-by-one step index moves the sample by
# >= 1e-3.
TOL = 2e-6


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    # diffusers logs a warning for timesteps without sigmas on every set_timesteps call
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def _ref(d, n=None, **kw):
    sched = FlowMatchEulerDiscreteScheduler.from_config(d)
    sched.set_timesteps(n, **kw)
    sched.set_begin_index(0)  # as MochiPipeline / FluxPipeline / StableDiffusion3Pipeline do
    return sched


def _assert_schedule_equal(ours, ref, msg=""):
    want_t, want_s = ref.timesteps.numpy(), ref.sigmas.numpy()
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, want_t, err_msg=f"timesteps {msg}")
    np.testing.assert_array_equal(ours.sigmas, want_s, err_msg=f"sigmas {msg}")
    assert len(ours) == ours.num_inference_steps == len(want_t) and ours.sigmas.shape == (len(want_t) + 1,)
    np.testing.assert_array_equal(ours.dt, (want_s[1:] - want_s[:-1]))


# ----------------------------------------------------------------------------------------------
# Schedules (host side)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_schedule_matches_diffusers(name):
    d, mus = CONFIGS[name]
    cfg = FlowMatchEulerConfig.from_dict(d)
    ref = FlowMatchEulerDiscreteScheduler.from_config(d)
    # the training sigma range diffusers builds in __init__ (float32 torch), the default's ends
    assert fm._train_sigma_range(cfg) == (ref.sigma_min, ref.sigma_max)
    for mu in mus:
        for n in STEP_COUNTS:
            if cfg.shift_terminal and n == 1:
                continue  # a single sigma of 1 stretched to the terminal: 0 / 0 (see test_refusals)
            ref.set_timesteps(n, mu=mu)
            _assert_schedule_equal(make_schedule(cfg, n, mu=mu), ref, f"{name} n={n} mu={mu}")


@pytest.mark.parametrize("name", ["mochi_invert", "default", "sd3_shift3", "flux_dynamic", "ltx_terminal", "karras",
                                  "exponential", "beta"])
def test_custom_sigmas_match_diffusers(name):
    d, mus = CONFIGS[name]
    cfg = FlowMatchEulerConfig.from_dict(d)
    ref = FlowMatchEulerDiscreteScheduler.from_config(d)
    mu = mus[-1]
    for n in range(2, 71):
        sigmas = linear_quadratic_schedule(n, 0.025)
        ref.set_timesteps(sigmas=sigmas, mu=mu)  # as MochiPipeline (via retrieve_timesteps)
        _assert_schedule_equal(make_schedule(cfg, sigmas=sigmas, mu=mu), ref, f"{name} n={n}")
        # num_inference_steps may be given too (of the same length); a list works as well
        _assert_schedule_equal(make_schedule(cfg, n, sigmas=list(sigmas), mu=mu), ref, f"{name} n={n}")


def test_mochi_schedule_shape():
    # Mochi: inverted sigmas rise from 0 to ~1, final sigma 1; timesteps = 1000 sigma, rising.
    for n in (2, 3, 28, 64):
        s = make_schedule(FlowMatchEulerConfig.from_dict(MOCHI), sigmas=linear_quadratic_schedule(n))
        assert s.sigmas[0] == 0 and s.sigmas[-1] == 1 and np.all(np.diff(s.sigmas) > 0)
        np.testing.assert_array_equal(s.timesteps, s.sigmas[:-1] * np.float32(1000))


@pytest.mark.parametrize("name", ["default", "sd3_shift3", "flux_dynamic", "mochi_invert", "karras"])
def test_custom_timesteps_match_diffusers(name):
    d, mus = CONFIGS[name]
    cfg = FlowMatchEulerConfig.from_dict(d)
    mu = mus[-1]
    for ts in ([999.0, 800.5, 500, 250, 60, 3], [1000, 10], np.linspace(1000, 1, 33), [500]):
        _assert_schedule_equal(make_schedule(cfg, timesteps=ts, mu=mu), _ref(d, timesteps=ts, mu=mu), f"{name} {ts}")
    # both given: timesteps as given (unless inverted), sigmas shifted
    sig, ts = linear_quadratic_schedule(12), np.linspace(990, 30, 12)
    _assert_schedule_equal(make_schedule(cfg, 12, sigmas=sig, timesteps=ts, mu=mu),
                           _ref(d, 12, sigmas=sig, timesteps=ts, mu=mu), name)


def test_linear_quadratic_schedule_matches_diffusers():
    for n in range(2, 71):
        for thr in (0.025, 0.1):
            ours = linear_quadratic_schedule(n, thr)
            assert ours.dtype == np.float64 and ours.shape == (n,)
            np.testing.assert_array_equal(ours, np.asarray(linear_quadratic_ref(n, thr)), err_msg=f"n={n}")
    for n, lin in ((10, 3), (10, 9), (2, 1), (70, 1)):
        np.testing.assert_array_equal(linear_quadratic_schedule(n, 0.025, lin), linear_quadratic_ref(n, 0.025, lin))
    # one step: diffusers divides by zero (linear_steps = 0); we refuse clearly
    with pytest.raises(ZeroDivisionError):
        linear_quadratic_ref(1, 0.025)
    for args in ((1,), (0,), (10, 0.025, 0), (10, 0.025, 10)):
        with pytest.raises(ValueError, match="linear_quadratic_schedule"):
            linear_quadratic_schedule(*args)


def test_calculate_shift_matches_diffusers():
    for seq in (256, 1024, 4096, 4224, 77):
        assert calculate_shift(seq) == calculate_shift_ref(seq)
        assert calculate_shift(seq, 1024, 4096, 0.95, 2.05) == calculate_shift_ref(seq, 1024, 4096, 0.95, 2.05)
    assert FlowMatchEulerConfig.from_dict(LTX).mu(2000) == calculate_shift_ref(2000, 1024, 4096, 0.95, 2.05)
    with pytest.raises(ValueError, match="base_shift and max_shift"):
        FlowMatchEulerConfig(base_shift=None).mu(1000)


def test_config_and_registry():
    cfg = FlowMatchEulerConfig.from_dict(MOCHI)  # _class_name / _diffusers_version ignored
    assert cfg.invert_sigmas and cfg.shift == 1.0 and cfg.shift_terminal is None
    assert cfg.init_noise_sigma == INIT_NOISE_SIGMA == 1.0
    module, cfg2 = scheduler_from_config(MOCHI)
    assert module is fm and cfg2 == cfg
    assert SCHEDULERS["FlowMatchEulerDiscreteScheduler"] == (fm, "FlowMatchEulerConfig")
    with pytest.raises(ValueError, match="not supported"):
        scheduler_from_config({"_class_name": "EulerDiscreteScheduler"})
    s = make_schedule(cfg, sigmas=linear_quadratic_schedule(10))
    assert s.init_noise_sigma == 1.0 and not s.needs_noise and init_state(SHAPE) == ()


@pytest.mark.parametrize("overrides, match", [
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
    ({"use_beta_sigmas": True, "use_karras_sigmas": True}, "only one of"),
    ({"time_shift_type": "cubic"}, "time_shift_type"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10.5}, "num_train_timesteps"),
    ({"shift": 0.0}, "shift must be"),
    ({"shift": float("nan")}, "shift must be"),
    ({"shift_terminal": 1.0}, "shift_terminal"),
    ({"shift_terminal": -0.1}, "shift_terminal"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchEulerConfig.from_dict(overrides)


def test_beta_sigmas_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(ImportError, match="use_beta_sigmas=True needs scipy"):
        FlowMatchEulerConfig(use_beta_sigmas=True)
    FlowMatchEulerConfig(use_karras_sigmas=True)  # the others need no scipy


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # diffusers' 0 / 0
def test_refusals():
    cfg = FlowMatchEulerConfig.from_dict(SD3)
    bad = [
        ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
        ({"num_inference_steps": -3}, "num_inference_steps must be >= 1"),
        ({"num_inference_steps": 2.5}, "must be an integer"),
        ({}, "pass num_inference_steps, sigmas or timesteps"),
        ({"num_inference_steps": 5, "sigmas": [1.0, 0.5]}, "sigmas has 2 entries but num_inference_steps is 5"),
        ({"num_inference_steps": 5, "timesteps": [900, 500]}, "timesteps has 2 entries"),
        ({"sigmas": [1.0, 0.5], "timesteps": [900, 500, 100]}, "same length"),
        ({"sigmas": []}, "must not be empty"),
        ({"sigmas": [[1.0, 0.5]]}, "1-d"),
        ({"sigmas": [1.0, float("nan")]}, "finite"),
        ({"timesteps": [float("inf"), 3]}, "finite"),
        ({"sigmas": ["a", "b"]}, "real numbers"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            make_schedule(cfg, **kw)
    # diffusers agrees on the length checks
    with pytest.raises(ValueError):
        _ref(SD3, 5, sigmas=[1.0, 0.5])
    # dynamic shifting needs mu (diffusers raises too)
    flux = FlowMatchEulerConfig.from_dict(FLUX)
    with pytest.raises(ValueError, match="needs mu"):
        make_schedule(flux, 10)
    with pytest.raises(ValueError, match="mu"):
        _ref(FLUX, 10)
    with pytest.raises(ValueError, match="mu must be a finite"):
        make_schedule(flux, 10, mu=float("nan"))
    # shift_terminal with one default step: 1 - sigma_max = 0 stretched -> 0 / 0; diffusers gives nan
    ltx = FlowMatchEulerConfig.from_dict(LTX)
    with pytest.raises(ValueError, match="not finite"):
        make_schedule(ltx, 1, mu=1.0)
    assert np.isnan(_ref(LTX, 1, mu=1.0).sigmas.numpy()[0])
    # exponential sigmas need positive ends (diffusers: math domain error); karras non-negative ones
    with pytest.raises(ValueError, match="positive sigmas"):
        make_schedule(FlowMatchEulerConfig(use_exponential_sigmas=True), sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="math domain"):
        _ref({"use_exponential_sigmas": True}, sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        make_schedule(FlowMatchEulerConfig(use_karras_sigmas=True), sigmas=[1.0, 0.5, -0.1])


# ----------------------------------------------------------------------------------------------
# Trajectories (jitted step, traced step index)

_jstep = jax.jit(step)  # compiled once per (step count, sample shape, stochastic)


def _fake_model(x, t, invert, n_train=1000):
    """The same numpy velocity "model" on both sides (float64 inside, float32 out); t a float."""
    x = np.asarray(x, np.float64)
    t = float(t)
    x0 = 0.8 * np.tanh(x) + TARGET * np.cos(4.0 * t / n_train)
    noise_level = 1.0 - t / n_train if invert else t / n_train
    v = (x - x0) / max(noise_level, 1e-3)
    return (-v if invert else v).astype(np.float32)


class _Noise:
    """Stands in for diffusers' randn_tensor inside step: hands out `self.next` (torch)."""

    def __init__(self):
        self.next, self.calls = None, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **kw):
        assert tuple(shape) == SHAPE and dtype == torch.float32
        self.calls += 1
        return torch.from_numpy(self.next.copy())


def _compare_trajectory(d, n=None, monkeypatch=None, seed=0, **kw):
    ref = _ref(d, n, **kw)
    cfg = FlowMatchEulerConfig.from_dict(d)
    sched = make_schedule(cfg, n, **kw)
    _assert_schedule_equal(sched, ref)
    stochastic = cfg.stochastic_sampling
    rng = np.random.default_rng(seed)
    x_init = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(INIT_NOISE_SIGMA)
    noises = rng.standard_normal((len(sched),) + SHAPE).astype(np.float32)
    fake = _Noise()
    if stochastic:
        monkeypatch.setattr(fm_ref, "randn_tensor", fake)
    x_ref, x, state = torch.from_numpy(x_init.copy()), jnp.asarray(x_init), init_state(SHAPE)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        fake.next = noises[i]
        out_ref = torch.from_numpy(_fake_model(x_ref.numpy(), t.item(), cfg.invert_sigmas))
        x_ref = ref.step(out_ref, t, x_ref, return_dict=False)[0]
        out = _fake_model(np.asarray(x), sched.timesteps[i], cfg.invert_sigmas)
        x, state = _jstep(sched, jnp.asarray(i, jnp.int32), out, x, state,
                          noise=jnp.asarray(noises[i]) if stochastic else None)
        want, got = x_ref.numpy(), np.asarray(x)
        assert got.dtype == np.float32 and got.shape == SHAPE and state == ()
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * scale, err_msg=f"step {i} (t={t.item()})")
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    assert fake.calls == (len(sched) if stochastic else 0)
    return sched, x, worst


TRAJECTORIES = {
    "sd3_28": (SD3, 28, {}),
    "flux_dynamic_20": (FLUX, 20, {"mu": calculate_shift(4096)}),
    "ltx_terminal_20": (LTX, 20, {"mu": 1.5}),
    "karras_20": (dict(SD3, use_karras_sigmas=True), 20, {}),
    "exponential_20": (dict(SD3, use_exponential_sigmas=True), 20, {}),
    "default_1": ({}, 1, {}),
    "stochastic_20": (dict(SD3, stochastic_sampling=True), 20, {}),
    "stochastic_mochi_20": (dict(MOCHI, stochastic_sampling=True), None, {"sigmas": linear_quadratic_schedule(20)}),
}


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_trajectory_matches_diffusers(name, monkeypatch):
    d, n, kw = TRAJECTORIES[name]
    _, _, worst = _compare_trajectory(d, n, monkeypatch, **kw)
    print(f"{name}: worst |ours - diffusers| / max(1, max|x|) = {worst:.2e}")


@pytest.mark.parametrize("n", [2, 7, 28, 64, 70])
def test_mochi_trajectory(n):
    # Mochi's pipeline: set_timesteps(sigmas=linear_quadratic_schedule(n, 0.025)) on its inverted config
    sched, _, worst = _compare_trajectory(MOCHI, sigmas=linear_quadratic_schedule(n, 0.025))
    print(f"mochi n={n}: worst |ours - diffusers| / max(1, max|x|) = {worst:.2e}")
    assert sched.sigmas[0] == 0 and sched.sigmas[-1] == 1


def test_one_compile_per_shape():
    # the schedule is a pytree argument and i is traced: one compile for all steps and for every
    # schedule with the same step count (other configs, custom sigmas)
    n = 13
    scheds = [make_schedule(FlowMatchEulerConfig.from_dict(SD3), n),
              make_schedule(FlowMatchEulerConfig.from_dict(MOCHI), sigmas=linear_quadratic_schedule(n)),
              make_schedule(FlowMatchEulerConfig.from_dict(FLUX), n, mu=0.9)]
    fn = jax.jit(lambda *a: step(*a))  # a fresh function: jit's cache is shared by jit(step) wrappers
    x = jnp.zeros(SHAPE)
    for sched in scheds:
        for i in range(n):
            x, _ = fn(sched, jnp.asarray(i, jnp.int32), jnp.ones(SHAPE), x, ())
    assert fn._cache_size() == 1


def test_whole_loop_in_fori_loop():
    # the loop as one program: schedule closed over, i a fori_loop counter, the model in jnp
    n = 30
    sched = make_schedule(FlowMatchEulerConfig.from_dict(SD3), n)
    ref = _ref(SD3, n)
    x_init = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    x_ref = torch.from_numpy(x_init.copy())
    for t in ref.timesteps:
        x_ref = ref.step(x_ref * torch.tensor(0.5) + float(t) / 1000, t, x_ref, return_dict=False)[0]

    def body(i, x):
        v = x * jnp.float32(0.5) + jnp.asarray(sched.timesteps)[i] / jnp.float32(1000)
        return step(sched, i, v, x)[0]

    x = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x))(jnp.asarray(x_init))
    want = x_ref.numpy()
    np.testing.assert_allclose(np.asarray(x), want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))


def test_dtypes_and_noise():
    sched = make_schedule(FlowMatchEulerConfig.from_dict(SD3), 5)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    out, _ = step(sched, 0, jnp.ones(SHAPE, jnp.bfloat16), x)
    assert out.dtype == jnp.bfloat16  # the sample's dtype; computed in float32
    want = np.float32(1) + sched.dt[0]
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.float32(jnp.bfloat16(want)))
    st = make_schedule(FlowMatchEulerConfig.from_dict(dict(SD3, stochastic_sampling=True)), 5)
    assert st.needs_noise
    with pytest.raises(ValueError, match="pass noise"):
        step(st, 0, jnp.ones(SHAPE), jnp.ones(SHAPE))


@pytest.mark.parametrize("n,strength", [(4, 0.6), (28, 0.6), (50, 0.75), (3, 1.0), (10, 0.05), (7, 0.33)])
def test_image_to_image_start_matches_diffusers(n, strength):
    """strength_start / from_step / scale_noise == diffusers' img2img get_timesteps (FluxImg2ImgPipeline's, shared
    by the SD3 one), set_begin_index and scale_noise at the first remaining timestep."""
    from types import SimpleNamespace

    from diffusers import FluxImg2ImgPipeline

    cfg = dict(shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(n)
    timesteps, left = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), n, strength, "cpu")
    sched = fm.from_step(fm.make_schedule(FlowMatchEulerConfig.from_dict(cfg), n), fm.strength_start(n, strength))
    assert sched.num_inference_steps == left == len(sched.timesteps)
    np.testing.assert_array_equal(sched.timesteps, timesteps.numpy())
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas[n - left:].numpy())
    x, noise = (np.random.default_rng(i).standard_normal((2, 4, 3, 5)).astype(np.float32) for i in (0, 1))
    want = ref.scale_noise(torch.from_numpy(x), timesteps[:1].repeat(2), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(np.asarray(fm.scale_noise(sched, x, noise)), want, atol=1e-6, rtol=0)
    if left == n:  # the whole schedule: a start at 0
        assert fm.strength_start(n, strength) == 0


def test_image_to_image_start_refusals():
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        fm.strength_start(10, 1.2)
    with pytest.raises(ValueError, match="No denoising step left"):
        fm.from_step(fm.make_schedule(FlowMatchEulerConfig(), 4), 4)
