"""Conversion: diffusers folder -> converted folder -> load == diffusers; bad checkpoints refused cleanly."""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.fixtures import make_torch_pipeline, save_torch_pipeline
from xdit_jax import CogVideoXPipeline, tiny
from xdit_jax.conversion import convert_pipeline, is_converted
from xdit_jax.hub import resolve_model
from xdit_jax.safetensors_io import CheckpointError, read_safetensors, write_safetensors

H, W, FRAMES, STEPS = 32, 48, 1, 2


def torch_latents(tp, lat):
    with torch.no_grad():
        return tp(prompt="A red car at night.", height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                  latents=torch.from_numpy(lat), guidance_scale=3.0, max_sequence_length=tiny.MAX_SEQUENCE_LENGTH,
                  output_type="latent").frames.numpy()


def our_latents(folder, lat, **kw):
    pipe = CogVideoXPipeline.from_pretrained(folder, **kw)
    return pipe("A red car at night.", height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS,
                latents=lat, guidance_scale=3.0, max_sequence_length=tiny.MAX_SEQUENCE_LENGTH,
                output_type="latent", progress=False).frames


@pytest.fixture(scope="module")
def torch_pipe():
    return make_torch_pipeline("5b", seed=3)


@pytest.fixture(scope="module")
def latents(torch_pipe):
    return np.random.default_rng(5).standard_normal((1, 1, 4, H // 8, W // 8)).astype(np.float32)


@pytest.fixture(scope="module")
def diffusers_dir(torch_pipe, tmp_path_factory):
    return save_torch_pipeline(torch_pipe, tmp_path_factory.mktemp("src"))


def test_round_trip_sharded(torch_pipe, latents, diffusers_dir, tmp_path):
    # A sharded copy (index json + several files) converts to the same weights.
    sharded = save_torch_pipeline(torch_pipe, tmp_path / "sharded", max_shard_size="40KB")
    assert list((sharded / "transformer").glob("*.safetensors.index.json"))
    out = convert_pipeline(sharded, tmp_path / "converted", log=lambda *_: None)
    assert is_converted(out)
    ref = torch_latents(torch_pipe, latents)
    # fp32 on both sides, latents O(1): see test_pipeline for the tolerance.
    np.testing.assert_allclose(our_latents(out, latents), ref, atol=1e-4, rtol=0)


def test_bf16_variant(torch_pipe, latents, tmp_path):
    # bf16 weights saved as diffusers' `.bf16` variant files; we compute in fp32 from them and must equal
    # the torch pipeline whose weights went through the same bf16 rounding.
    t16 = make_torch_pipeline("5b", seed=3)
    for m in (t16.transformer, t16.vae, t16.text_encoder):
        m.to(torch.bfloat16)
    # sharded too: diffusers names the index `*.safetensors.index.bf16.json`, the shards `*.bf16-0000k-of-N`
    src = save_torch_pipeline(t16, tmp_path / "bf16", variant="bf16", max_shard_size="40KB")
    assert list((src / "transformer").glob("*.safetensors.index.bf16.json"))
    out = convert_pipeline(src, tmp_path / "converted", log=lambda *_: None)
    flat = read_safetensors(next((src / "transformer").glob("*.safetensors")))
    assert str(next(iter(flat.values())).dtype) == "bfloat16"
    for m in (t16.transformer, t16.vae, t16.text_encoder):
        m.to(torch.float32)
    ref = torch_latents(t16, latents)
    np.testing.assert_allclose(our_latents(out, latents, dtype="float32"), ref, atol=1e-4, rtol=0)


def _corrupt(diffusers_dir, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(diffusers_dir, bad)
    f = next((bad / "transformer").glob("*.safetensors"))
    sd = read_safetensors(f)
    if how == "missing":
        sd.pop("proj_out.weight")
    elif how == "extra":
        sd["surprise.weight"] = np.zeros((2, 2), np.float32)
    elif how == "misshaped":
        sd["patch_embed.text_proj.weight"] = sd["patch_embed.text_proj.weight"][:, :-2].copy()
    if how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    else:
        write_safetensors(f, sd)
    return bad


@pytest.mark.parametrize("how,needle", [("missing", "proj_out.weight"), ("extra", "surprise.weight"),
                                        ("misshaped", "patch_embed.text_proj.weight"), ("truncated", "truncated")])
def test_bad_checkpoint_refused_and_nothing_left(diffusers_dir, tmp_path, how, needle):
    bad = _corrupt(diffusers_dir, tmp_path, how)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        convert_pipeline(bad, out, log=lambda *_: None)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no partial folder either


def test_existing_output_needs_overwrite(diffusers_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_pipeline(diffusers_dir, out, log=lambda *_: None)
    assert (out / "keep.txt").read_text() == "mine"
    convert_pipeline(diffusers_dir, out, overwrite=True, log=lambda *_: None)
    assert is_converted(out) and not (out / "keep.txt").exists()
    meta = json.loads((out / "xdit_jax.json").read_text())
    assert meta["components"]["transformer"] == "CogVideoXTransformer3DModel"


def test_cli_convert(diffusers_dir, tmp_path, capsys):
    from xdit_jax.conversion import main

    assert main([str(diffusers_dir), str(tmp_path / "c")]) == 0
    assert main([str(diffusers_dir), str(tmp_path / "c")]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_unknown_model_errors():
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model("/no/such/folder")
    # conftest sets HF_HUB_OFFLINE=1: a hub id that is not cached gives a clear error, not a hang.
    with pytest.raises(CheckpointError, match="hub"):
        resolve_model("nobody-xyz/not-a-model")
    with pytest.raises(CheckpointError, match="neither a diffusers"):
        CogVideoXPipeline.from_pretrained(__import__("pathlib").Path(__file__).parent)
