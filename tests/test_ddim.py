"""xdit_jax.schedulers.ddim == diffusers' DDIMScheduler (timesteps, and trajectories of step())."""

import itertools

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from xdit_jax.schedulers import ddim, scheduler_from_config

CONFIGS = [
    dict(),  # diffusers' defaults (clip_sample True, leading, set_alpha_to_one)
    dict(clip_sample=False, beta_schedule="linear"),  # Latte-1's
    dict(timestep_spacing="trailing", set_alpha_to_one=False, prediction_type="v_prediction", clip_sample=False),
    dict(timestep_spacing="linspace", prediction_type="sample", beta_schedule="scaled_linear", beta_start=0.00085,
         beta_end=0.012),
    dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, beta_schedule="squaredcos_cap_v2",
         clip_sample=False),
    dict(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True, clip_sample=False,
         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
]


def _trajectories(cfg_kw, n, eta, seed=0):
    """(ours, diffusers') samples after each of ``n`` steps from the same inputs and noise."""
    ref = DDIMScheduler(**cfg_kw)
    ref.set_timesteps(n)
    cfg = ddim.DDIMConfig.from_dict(dict(ref.config))
    sched = ddim.make_schedule(cfg, n, eta=eta)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    xt, ours, theirs = torch.from_numpy(x), x, []
    step = jax.jit(lambda s, i, m, x, z: ddim.step(s, i, m, x, (), z)[0])
    for i, t in enumerate(ref.timesteps):
        m = (0.7 * rng.standard_normal(x.shape)).astype(np.float32)
        z = rng.standard_normal(x.shape).astype(np.float32)
        xt = ref.step(torch.from_numpy(m), t, xt, eta=eta, variance_noise=torch.from_numpy(z) if eta else None
                      ).prev_sample
        ours = np.asarray(step(sched, i, m, ours, z if eta else None))
        theirs.append((ours, xt.numpy()))
    return theirs


@pytest.mark.parametrize("cfg_kw,n,eta", [(c, n, e) for c, (n, e) in
                                          itertools.product(CONFIGS, [(4, 0.0), (7, 0.0), (5, 0.5)])])
def test_matches_diffusers(cfg_kw, n, eta):
    for ours, ref in _trajectories(cfg_kw, n, eta):
        # float32 on both sides, the same operations: a few ulps of the sample's size per step (the sample
        # prediction divides by sqrt(1 - a), which grows the rounding at the last steps).
        np.testing.assert_allclose(ours, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=str(cfg_kw))


def test_registry_and_errors():
    mod, cfg = scheduler_from_config({"_class_name": "DDIMScheduler", "clip_sample": False, "variance_type": "x"})
    assert mod is ddim and cfg.clip_sample is False
    with pytest.raises(ValueError, match="thresholding"):
        ddim.DDIMConfig(thresholding=True)
    with pytest.raises(ValueError, match="timestep_spacing"):
        ddim.DDIMConfig(timestep_spacing="karras")
    with pytest.raises(ValueError, match="larger than"):
        ddim.make_schedule(ddim.DDIMConfig(), 1001)
    with pytest.raises(ValueError, match="eta"):
        ddim.make_schedule(ddim.DDIMConfig(), 10, eta=-1)
    with pytest.raises(ValueError, match="outside"):  # leading + steps_offset 1 at n = T reaches t = T
        ddim.make_schedule(ddim.DDIMConfig(steps_offset=1, num_train_timesteps=10), 10)
    sched = ddim.make_schedule(ddim.DDIMConfig(), 3, eta=1.0)
    with pytest.raises(ValueError, match="noise"):
        ddim.step(sched, 0, np.zeros(2, np.float32), np.zeros(2, np.float32))
