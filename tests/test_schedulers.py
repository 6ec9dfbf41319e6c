"""CogVideoX DDIM / DPM schedulers and dynamic CFG: parity with diffusers over whole trajectories.

The fake "model" is a numpy function of (sample, t) used by both sides, so that the only
difference between the trajectories is the scheduler arithmetic. diffusers' DPM scheduler draws
its noise inside `step` (randn_tensor); we replace that function with one that hands out a fixed
noise sequence and records the draws, and feed the used draw to our step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox

from xdit_jax.schedulers import (
    INIT_NOISE_SIGMA,
    SchedulerConfig,
    dynamic_guidance_scale,
    guidance_scale_at,
    guidance_scales,
    init_state,
    make_schedule,
    step,
)

# scheduler_config.json as the CogVideoX-2b / -5b checkpoints ship it (5b: snr_shift_scale 1.0);
# the DPM variant is the same with "_class_name": "CogVideoXDPMScheduler".
SHIPPED = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
CLASSES = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
CLASS_NAMES = {"ddim": "CogVideoXDDIMScheduler", "dpm": "CogVideoXDPMScheduler"}
SHAPE = (2, 3, 4, 6, 5)  # (batch, frames, channels, height, width), as CogVideoX latents


def _config(kind, **overrides):
    d = dict(SHIPPED, _class_name=CLASS_NAMES[kind], **overrides)
    return d, SchedulerConfig.from_dict(d)


def _fake_model(sample, t):
    """A smooth nonlinear, timestep-dependent 'noise prediction', float32, numpy on both sides."""
    s = np.asarray(sample, np.float32)
    c = np.float32(1.0 + t / 1000.0)
    return (np.tanh(s * c) * np.float32(0.9) + np.float32(0.1) * np.sin(np.float32(3.0) * s)).astype(np.float32)


@jax.jit
def _jitted_step(sched, i, model_output, sample, state, noise):
    # sched is a pytree argument and i a traced int: no Python branching on either.
    return step(sched, i, model_output, sample, state, noise)


def _run_diffusers(d, n, x_init, noises):
    sched = CLASSES["dpm" if "DPM" in d["_class_name"] else "ddim"].from_config(d)
    sched.set_timesteps(n)
    draws, used = [], []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = noises[len(draws)]
        draws.append(z)
        return torch.from_numpy(z).to(dtype)

    latents = torch.from_numpy(x_init) * sched.init_noise_sigma
    samples, draws_per_step, old = [], [], None
    timesteps = sched.timesteps
    for i, t in enumerate(timesteps):
        noise_pred = torch.from_numpy(_fake_model(latents.numpy(), int(t)))
        before = len(draws)
        if isinstance(sched, CogVideoXDPMScheduler):
            scheduling_dpm_cogvideox.randn_tensor, orig = fake_randn, scheduling_dpm_cogvideox.randn_tensor
            try:
                latents, old = sched.step(
                    noise_pred, old, t, timesteps[i - 1] if i > 0 else None, latents, return_dict=False
                )
            finally:
                scheduling_dpm_cogvideox.randn_tensor = orig
        else:
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        draws_per_step.append(len(draws) - before)
        used.append(draws[-1] if len(draws) > before else np.zeros_like(x_init))
        samples.append(latents.numpy().copy())
    return timesteps.numpy(), samples, draws_per_step, used


# Tolerances: both sides compute the update in float32 with the same float64-derived scalar
# coefficients rounded to float32, and the model function is the same numpy code, so single steps
# agree to a few float32 ulps; over 50 steps (values O(1)) the rounding differences are carried
# along and slightly amplified, so we allow 2e-5 absolute / 1e-5 relative. A wrong coefficient,
# a wrong order switch or a wrong noise draw shows up as >1e-2.
RTOL, ATOL = 1e-5, 2e-5


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("n", [8, 50, 7])
@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0])  # CogVideoX-2b, CogVideoX-5b
def test_trajectory_matches_diffusers(kind, n, snr_shift_scale):
    d, cfg = _config(kind, snr_shift_scale=snr_shift_scale)
    rng = np.random.default_rng(0)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((2 * n,) + SHAPE).astype(np.float32)
    ref_ts, ref_samples, ref_draws, ref_noise = _run_diffusers(d, n, x_init, noises)

    sched = make_schedule(cfg, n)
    np.testing.assert_array_equal(sched.timesteps, ref_ts)
    assert sched.timesteps.dtype == ref_ts.dtype
    assert sched.init_noise_sigma == INIT_NOISE_SIGMA == 1.0
    assert sched.needs_noise == (kind == "dpm")
    if kind == "dpm":
        assert list(sched.noise_draws) == ref_draws

    x = jnp.asarray(x_init) * sched.init_noise_sigma
    state = init_state(x)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        model_out = jnp.asarray(_fake_model(np.asarray(x), int(t)))
        x, state = _jitted_step(sched, jnp.int32(i), model_out, x, state, jnp.asarray(ref_noise[i]))
        np.testing.assert_allclose(np.asarray(x), ref_samples[i], rtol=RTOL, atol=ATOL, err_msg=f"step {i}")
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - ref_samples[i]))))
    assert x.dtype == jnp.float32
    print(f"{kind} n={n} shift={snr_shift_scale}: max |diff| over steps {worst:.2e}")


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize(
    "overrides",
    [
        # other branches: epsilon / "sample" prediction, leading & linspace spacing, other betas
        dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=False,
             set_alpha_to_one=False),
        dict(prediction_type="sample", timestep_spacing="linspace", beta_schedule="linear"),
        dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=False),
    ],
)
def test_other_configs_match_diffusers(kind, overrides):
    d, cfg = _config(kind, **overrides)
    n = 10
    rng = np.random.default_rng(1)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((2 * n,) + SHAPE).astype(np.float32)
    ref_ts, ref_samples, _, ref_noise = _run_diffusers(d, n, x_init, noises)
    sched = make_schedule(cfg, n)
    np.testing.assert_array_equal(sched.timesteps, ref_ts)
    x, state = jnp.asarray(x_init), init_state(x_init)
    for i, t in enumerate(sched.timesteps):
        model_out = jnp.asarray(_fake_model(np.asarray(x), int(t)))
        x, state = _jitted_step(sched, jnp.int32(i), model_out, x, state, jnp.asarray(ref_noise[i]))
        # float32 alphas_cumprod (linear / cosine betas) may differ from torch's by an ulp (torch's
        # vectorised linspace/sqrt); relative 1e-5 still catches any real error.
        np.testing.assert_allclose(np.asarray(x), ref_samples[i], rtol=RTOL, atol=ATOL, err_msg=f"step {i}")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_match_diffusers(spacing):
    for n in [1, 3, 7, 8, 49, 50, 999]:
        ref = CogVideoXDDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(n)
        cfg = SchedulerConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        np.testing.assert_array_equal(make_schedule(cfg, n).timesteps, ref.timesteps.numpy(), err_msg=str(n))


def test_bf16_sample_round_trip():
    # The pipeline keeps latents in the model dtype; the step computes in float32 and casts back.
    _, cfg = _config("ddim")
    sched = make_schedule(cfg, 8)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    out, _ = step(sched, 0, jnp.zeros(SHAPE, jnp.float32), x, init_state(x))
    assert out.dtype == jnp.bfloat16


def test_config_from_dict():
    d, cfg = _config("dpm", snr_shift_scale=1.0)
    assert cfg.kind == "dpm" and cfg.snr_shift_scale == 1.0 and cfg.prediction_type == "v_prediction"
    assert SchedulerConfig.from_dict(dict(CogVideoXDDIMScheduler().config), kind="ddim") == SchedulerConfig()
    with pytest.raises(ValueError):
        SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError):
        make_schedule(cfg, 1001)


@pytest.mark.parametrize("n", [8, 50])
def test_dynamic_guidance_scale(n):
    ref = CogVideoXDDIMScheduler.from_config(SHIPPED)
    ref.set_timesteps(n)
    sched = make_schedule(SchedulerConfig.from_dict(SHIPPED), n)
    g = 6.0
    dyn = jax.jit(lambda t: dynamic_guidance_scale(g, t, n))  # traced timestep value
    at = jax.jit(lambda i: guidance_scale_at(sched, i, g, True))  # host schedule closed over
    at_arg = jax.jit(lambda s, i, gg: guidance_scale_at(s, i, gg, True))  # schedule and g traced
    table = guidance_scales(sched, g, True)
    for i, t in enumerate(ref.timesteps):
        # exactly the pipeline's expression (Python float64), then what torch multiplies with: float32
        want = np.float32(1 + g * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2))
        assert np.float32(dyn(jnp.int32(t.item()))) == want
        assert np.float32(at(jnp.int32(i))) == want
        assert table[i] == want
        # float32 combine of float32-rounded weights: within 2 ulp (ulp/value <= 1.2e-7)
        np.testing.assert_allclose(np.float32(at_arg(sched, jnp.int32(i), jnp.float32(g))), want, rtol=2.5e-7)
    assert np.float32(guidance_scale_at(sched, 3, g, False)) == np.float32(g)
    np.testing.assert_array_equal(guidance_scales(sched, g, False), np.full(n, g, np.float32))


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_whole_loop_in_fori_loop(kind):
    # The host schedule closed over, the step index a fori_loop counter: one compiled program.
    d, cfg = _config(kind)
    n = 8
    rng = np.random.default_rng(2)
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((2 * n,) + SHAPE).astype(np.float32)
    _, ref_samples, _, ref_noise = _run_diffusers(d, n, x_init, noises)
    sched = make_schedule(cfg, n)
    noise = jnp.asarray(np.stack(ref_noise))

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(sched.timesteps)[i].astype(jnp.float32)
        model_out = jnp.tanh(x * (1.0 + t / 1000.0)) * 0.9 + 0.1 * jnp.sin(3.0 * x)  # = _fake_model
        return step(sched, i, model_out, x, state, noise[i])

    x0 = jnp.asarray(x_init)
    x, _ = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, (x, init_state(x))))(x0)
    # jnp.tanh/sin vs numpy's differ by ulps in the model output; same tolerance as above.
    np.testing.assert_allclose(np.asarray(x), ref_samples[-1], rtol=RTOL, atol=ATOL)
