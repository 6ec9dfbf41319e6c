"""Tiny random diffusers CogVideoX pipelines written with save_pretrained (the oracle's side)."""

from pathlib import Path

import torch
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)
from transformers import T5Config, T5EncoderModel

from tests.torch_util import randomize_
from xdit_jax import tiny

# The three transformer variants on the tiny shapes of xdit_jax.tiny.
VARIANTS = {
    "2b": {},
    "5b": dict(use_rotary_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
}


def make_torch_pipeline(variant: str = "2b", seed: int = 0, scheduler: str = "ddim") -> CogVideoXPipeline:
    torch.manual_seed(seed)
    transformer = randomize_(CogVideoXTransformer3DModel(**tiny.TRANSFORMER, **VARIANTS[variant]), seed, std=0.1)
    vae_kw = {k: v for k, v in tiny.VAE.items()}
    vae = randomize_(AutoencoderKLCogVideoX(**vae_kw), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched_kw = {k: v for k, v in tiny.SCHEDULER.items() if not k.startswith("_")}
    sched_cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    return CogVideoXPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=sched_cls(**sched_kw))


def save_torch_pipeline(pipe: CogVideoXPipeline, folder: Path, **kw) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True, **kw)
    return folder
