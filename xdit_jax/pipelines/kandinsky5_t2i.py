"""Kandinsky 5.0 text-to-image, diffusers' ``Kandinsky5T2IPipeline`` on a JAX mesh: the text-to-video pipeline
(:mod:`xdit_jax.pipelines.kandinsky5`) with one latent frame and

* the image template (:data:`PROMPT_TEMPLATE`), 40 tokens cut (diffusers' ``prompt_template_encode_start_idx``);
* the negative prompt "" by default, guidance 3.5, 1024 x 1024, 50 steps (diffusers' defaults);
* the RoPE scale factor (1, 1, 1);
* a size not in :data:`RESOLUTIONS` replaced, with a warning, by the one of the nearest aspect ratio (diffusers' rule;
  the instance's ``resolutions``);
* latents (B, 1, H / 8, W / 8, C) decoded by FLUX's ``AutoencoderKL`` from ``latents / scaling_factor`` (no shift,
  as diffusers' pipeline) -> ``.images`` (B, H, W, 3).

    pipe = Kandinsky5T2IPipeline.from_pretrained("kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers", mesh="cfg=2")
    out = pipe("A cat in a hat.", seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]
"""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np

from xdit_jax.models import kandinsky5 as k5
from xdit_jax.models import vae_kl
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import check_size_and_mesh, peak_memory_bytes
from xdit_jax.pipelines.image import ImagePipelineOutput
from xdit_jax.pipelines.kandinsky5 import Kandinsky5T2VPipeline

log = logging.getLogger("xdit_jax")

Kandinsky5ImagePipelineOutput = ImagePipelineOutput
PROMPT_TEMPLATE = ("<|im_start|>system\nYou are a prompt engineer. Describe the image by detailing the color, shape, "
                   "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                   "<|im_start|>user\n{}<|im_end|>")
TEMPLATE_START = 40
# diffusers' resolutions (width, height): any other size is replaced by the one of the nearest aspect ratio
RESOLUTIONS = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))


def read_configs(folder: str | os.PathLike):
    return image.read_configs(folder, k5.Kandinsky5Config, vae_kl.AutoencoderKLConfig)


def default_size(tc=None, vc=None) -> dict:
    return {"height": 1024, "width": 1024}


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 3.5):
    s = image.vae_scale_factor(vc)
    _, ph, pw = tc.patch_size
    check_size_and_mesh(height, width, s * max(ph, pw, 2), tc.num_visual_blocks, batch, mesh_spec, guidance_scale)
    grid = (height // s // ph, width // s // pw)
    if max(grid) > max(k5.ROPE_MAX_POS):
        raise ValueError(f"{height} x {width} makes a {grid} token grid; Kandinsky 5.0's RoPE tables hold "
                         f"{k5.ROPE_MAX_POS[1]} positions per axis.")


class Kandinsky5T2IPipeline(Kandinsky5T2VPipeline):
    """Text-to-image with Kandinsky 5.0 — see the module docstring."""

    PIPELINE_CLASSES = ("Kandinsky5T2IPipeline",)
    PROMPT_TEMPLATE, TEMPLATE_START, DEFAULT_NEGATIVE = PROMPT_TEMPLATE, TEMPLATE_START, ""
    _scale_factor = staticmethod(lambda height, width: (1.0, 1.0, 1.0))
    resolutions = RESOLUTIONS

    def check_inputs(self, height: int, width: int, num_frames: int, batch: int, guidance_scale: float) -> None:
        check_request(self.transformer_config, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale)

    def default_size(self) -> dict:
        return default_size()

    def default_video(self) -> dict:
        return dict(default_size(), num_frames=1, fps=1)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        s = image.vae_scale_factor(self.vae_config)
        return (batch, 1, height // s, width // s, self.transformer_config.in_visual_dim)

    def _decode_fn(self):
        """FLUX's AutoencoderKL on ``latents / scaling_factor`` (the one frame, channels moved first)."""
        scaling, dtype = self.vae_config.scaling_factor, self.dtype

        def decode(vae, latents, **kw):
            z = jnp.moveaxis(latents[:, 0].astype(jnp.float32), -1, 1) / scaling
            return vae_kl.decode(vae, z.astype(dtype), **kw)

        return self._jit_decode("image", decode)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, guidance_scale: float = 3.5, text_len: int = 512):
        return super().compile_step(batch, height=height, width=width, num_frames=1,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    text_len=text_len)

    def __call__(self, prompt=None, negative_prompt=None, *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                 latents=None, prompt_embeds_qwen=None, prompt_embeds_clip=None, negative_prompt_embeds_qwen=None,
                 negative_prompt_embeds_clip=None, max_sequence_length: int = 512, seed: int = 0,
                 output_type: str = "np", progress: bool = True) -> Kandinsky5ImagePipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent": (B, 1, h, w, C))."""
        ds = default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        if (width, height) not in self.resolutions:
            w, h = self.resolutions[int(np.argmin([abs(a / b - width / height) for a, b in self.resolutions]))]
            log.warning("height x width %d x %d is not one of Kandinsky 5.0 T2I's resolutions: %d x %d instead (as "
                        "diffusers).", height, width, h, w)
            width, height = w, h
        out, timer = self._generate(prompt, negative_prompt, height, width, 1, num_inference_steps, guidance_scale,
                                    num_images_per_prompt, latents, prompt_embeds_qwen, prompt_embeds_clip,
                                    negative_prompt_embeds_qwen, negative_prompt_embeds_clip, max_sequence_length,
                                    seed, output_type, progress)
        return Kandinsky5ImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
