"""``Pipeline.from_config``: a pipeline of a folder of configs (diffusers' layout, no weights) with random weights
drawn on the device. Its modules must be the ones ``from_pretrained`` builds from a checkpoint of the same
configs — the same parameter tree, shapes, dtypes and placement on the mesh (PipeFusion's padded, staged stacks
included) — so that what a benchmark times is what a user's checkpoint runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xdit_jax import tiny
from xdit_jax.pipelines import pipeline_class
from xdit_jax.pipelines.denoise import pipeline_class_name
from xdit_jax.safetensors_io import CheckpointError

# family -> (mesh, transformer overrides): FLUX's two stacks (3 double- + 2 single-stream blocks: the first padded
# to 2 stages); SD3 (three text encoders; 3 stacked blocks + the last, padded) on 2 stages; HunyuanDiT (BERT + mT5)
# on one device; Wan (UMT5: a bias table per block) with 3 blocks on 2 stages; SANA (Gemma 2, DC-AE) on one device;
# Chroma (the approximator's layer list; 3 double- + 2 single-stream blocks) on 2 stages; Lumina 2 (Z-Image's
# stacks, Gemma 2, FLUX's VAE) on one device; FLUX.2 klein (Qwen3ForCausalLM, AutoencoderKLFlux2 with its batch-norm
# statistics and encoder) on 2 stages; LTX-Video (T5, its VAE with the encoder) with 3 blocks on 2 stages;
# HunyuanVideo-1.5 (Qwen2.5-VL + ByT5) on one device; ConsisID (the face branch, the VAE encoder) on one device;
# SkyReels-V2 DF (the fps embedding; PipeFusion refused) on one device; CogView3-Plus (CogVideoX's blocks, regrouped
# modulation linears) with 3 blocks on 2 stages; HunyuanImage-2.1 (Qwen2.5-VL + ByT5, two stacks) on 2 stages;
# Kandinsky 5.0 (Qwen2.5-VL + CLIP, the text stack beside the staged visual one) on 2 stages; SANA-Video (Gemma 2,
# the Wan VAE) on one device
CASES = {"flux": ("pipefusion=2", {"num_layers": 3}), "sd3": ("pipefusion=2", {"num_layers": 4}),
         "hunyuandit": (None, {}), "wan": ("pipefusion=2", {"num_layers": 3}), "sana": (None, {}),
         "chroma": ("pipefusion=2", {"num_layers": 3}), "lumina2": (None, {}),
         "flux2": ("pipefusion=2", {"num_layers": 3}), "ltx": ("pipefusion=2", {"num_layers": 3}),
         "hunyuan_video15": (None, {}), "consisid": (None, {}), "hunyuanimage": ("pipefusion=2", {}),
         "skyreels_v2": (None, {}), "cogview3": ("pipefusion=2", {"num_layers": 3}),
         "kandinsky5": ("pipefusion=2", {}), "sana-video": (None, {})}
# (the parts besides MODULES that conversion writes next to a component: built alike too)
EXTRA = {"flux2": ("vae_encoder",), "consisid": ("vae_encoder",)}
MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _layout(module):
    """{key path: (shape, dtype, sharding spec)} of a module's parameters."""
    state = nnx.state(module, nnx.Param)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        out[jax.tree_util.keystr(path)] = (tuple(leaf.shape), str(leaf.dtype), tuple(leaf.sharding.spec))
    return out


# One family in the default run (SD3: three text encoders, a padded stack on 2 stages); the others are slow-marked
# (the same code path per component kind; the default run stays under 20 minutes): `pytest -m slow` runs them.
@pytest.mark.parametrize("family", [f if f == "sd3" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(CASES)])
def test_random_pipeline_is_laid_out_as_a_checkpoint(family, tmp_path):
    mesh, transformer = CASES[family]
    ckpt = tiny.make_tiny_model(tmp_path / "ckpt", family=family, transformer=transformer)
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny.write_configs(configs, family, transformer)
    assert not list(configs.rglob("params"))  # configs only
    cls = pipeline_class(pipeline_class_name(configs))
    loaded = cls.from_pretrained(ckpt, mesh=mesh, dtype="bfloat16")
    random = cls.from_config(configs, mesh=mesh, dtype="bfloat16", seed=3)
    compared = 0
    for name in MODULES:
        a, b = getattr(loaded, name, None), getattr(random, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            assert _layout(b) == _layout(a), name
            compared += 1
    assert compared == {"flux": 4, "sd3": 5, "hunyuandit": 4, "wan": 3, "sana": 3, "chroma": 3, "lumina2": 3,
                        "flux2": 3, "ltx": 3, "hunyuan_video15": 4, "consisid": 3, "skyreels_v2": 3,
                        "cogview3": 3, "hunyuanimage": 4, "kandinsky5": 4, "sana-video": 3}[family]
    for name in EXTRA.get(family, ()):  # e.g. FLUX.2's reference images' VAE encoder
        assert _layout(getattr(random, name)) == _layout(getattr(loaded, name)), name
    if family == "flux2":  # the batch-norm variances drawn as ones (not noise)
        assert float(jnp.min(random.vae.bn.running_var[...].astype(jnp.float32))) == 1.0
    if mesh:  # the stacked blocks are split over the stages, as a checkpoint's
        specs = {v[2] for k, v in _layout(random.transformer).items() if "blocks" in k}
        assert ("pipefusion",) in specs
    # random, not zeros: the kernels are drawn, the step runs on them
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(random.transformer, nnx.Param))
               if "kernel" in jax.tree_util.keystr(p)]
    assert all(float(jnp.abs(k.astype(jnp.float32)).max()) > 0 for k in kernels)
    assert type(random.tokenizer).__name__ == type(loaded.tokenizer).__name__


def test_random_params_rule():
    """Norm scales one, biases zero, kernels / embeddings normal with std 1 / sqrt(fan-in), in the asked dtype;
    the same seed draws the same weights."""
    abstract = {"norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.float32)},
                "proj": {"kernel": jax.ShapeDtypeStruct((256, 512), jnp.float32),
                         "bias": jax.ShapeDtypeStruct((512,), jnp.float32)},
                "embed": {"embedding": jax.ShapeDtypeStruct((1000, 64), jnp.float32)},
                "step": jax.ShapeDtypeStruct((3,), jnp.int32)}
    p = tiny.random_params_on_device(abstract, seed=0, dtype=jnp.bfloat16)
    assert p["norm"]["scale"].dtype == jnp.bfloat16 and p["step"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"], np.float32), 1.0)
    np.testing.assert_array_equal(np.asarray(p["proj"]["bias"], np.float32), 0.0)
    k = np.asarray(p["proj"]["kernel"], np.float32)
    assert k.std() == pytest.approx(1 / np.sqrt(256), rel=0.02) and abs(k.mean()) < 1e-3
    e = np.asarray(p["embed"]["embedding"], np.float32)
    assert e.std() == pytest.approx(1 / np.sqrt(64), rel=0.02)
    again = tiny.random_params_on_device(abstract, seed=0, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(again["proj"]["kernel"], np.float32), k)
    other = tiny.random_params_on_device(abstract, seed=1, dtype=jnp.bfloat16)
    assert not np.array_equal(np.asarray(other["proj"]["kernel"], np.float32), k)


def test_from_config_needs_a_folder_of_configs(tmp_path):
    from xdit_jax.pipelines.flux import FluxPipeline

    with pytest.raises(CheckpointError, match="holds no model_index.json: from_config needs a folder of configs"):
        FluxPipeline.from_config(tmp_path)
    tiny.write_configs(tmp_path, "pixart")
    with pytest.raises(ValueError, match="holds a PixArtSigmaPipeline pipeline, not FluxPipeline"):
        FluxPipeline.from_config(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                         "transformer", "vae"]  # nothing written
