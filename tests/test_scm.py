"""SCMScheduler (Sana Sprint) == diffusers' on its timesteps and step outputs (prev_sample and the predicted x0),
diffusers' step noise replaced by the noise handed to ours; its set_timesteps checks."""

import jax
import numpy as np
import pytest
import torch
from diffusers import SCMScheduler
from diffusers.schedulers import scheduling_scm

from xdit_jax.schedulers import module_of, scheduler_from_config, scm

SHAPE = (2, 4, 6, 5)
CONFIG = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
          "sigma_data": 0.5}


def _fake_model(sample, s):
    return np.tanh(sample) * np.cos(s) + 0.3 * sample


CASES = [dict(n=2), dict(n=1, intermediate_timesteps=None), dict(n=4, intermediate_timesteps=None),
         dict(n=7, intermediate_timesteps=None, max_timesteps=1.4),
         dict(n=3, timesteps=[1.5, 1.1, 0.4, 0.2], max_timesteps=None, intermediate_timesteps=None)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_steps_match_diffusers(case, monkeypatch):
    case = dict(case)
    n = case.pop("n")
    module, cfg = scheduler_from_config(dict(CONFIG, sigma_data=0.6))
    assert module is scm and module_of(cfg) is scm
    ts = SCMScheduler(num_train_timesteps=1000, sigma_data=0.6)
    ts.set_timesteps(n, **case)
    ts.set_begin_index(0)
    sched = scm.make_schedule(cfg, n, **case)
    np.testing.assert_array_equal(sched.timesteps, ts.timesteps.numpy())
    rng = np.random.default_rng(0)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]
    it = iter(noises)
    monkeypatch.setattr(scheduling_scm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(it)))
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    ours, state = sample, scm.init_state(SHAPE)
    jstep = jax.jit(scm.step)
    for i in range(n):
        s = float(ts.timesteps[i])
        ref_prev, ref_x0 = ts.step(torch.from_numpy(_fake_model(sample, s)), ts.timesteps[i],
                                   torch.from_numpy(sample), return_dict=False)
        ours, state = jstep(sched, i, _fake_model(np.asarray(ours), s), ours, state, noises[i])
        # float32 both sides, the same operations: cos / sin 1 ulp apart at most (torch's vs numpy's); samples O(1)
        np.testing.assert_allclose(np.asarray(state), ref_x0.numpy(), atol=2e-6, rtol=0, err_msg=f"x0 step {i}")
        np.testing.assert_allclose(np.asarray(ours), ref_prev.numpy(), atol=2e-6, rtol=0, err_msg=f"prev {i}")
        sample = ref_prev.numpy()


def test_set_timesteps_errors():
    cfg = scm.SCMConfig()
    for kw, needle in [(dict(), "Intermediate"), (dict(timesteps=[1.0, 0.0]), "length"),
                       (dict(timesteps=[1.0, 0.5, 0.2, 0.0], intermediate_timesteps=None), "max_timesteps"),
                       (dict(max_timesteps=None, intermediate_timesteps=None), "either")]:
        with pytest.raises(ValueError, match=needle):
            scm.make_schedule(cfg, 3, **kw)
    with pytest.raises(ValueError, match="trigflow"):
        scm.SCMConfig(prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        scm.make_schedule(scm.SCMConfig(num_train_timesteps=4), 5, intermediate_timesteps=None)
