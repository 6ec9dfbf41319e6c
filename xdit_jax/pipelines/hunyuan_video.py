"""HunyuanVideo text-to-video, diffusers' ``HunyuanVideoPipeline`` on a JAX mesh.

    pipe = HunyuanVideoPipeline.from_pretrained("hunyuanvideo-community/HunyuanVideo", mesh="ulysses=8",
                                                dtype="bfloat16")
    out = pipe("A cat walks on the grass, realistic", height=320, width=512, num_frames=61, seed=42)
    out.frames   # (batch, frames, height, width, 3) float in [0, 1]

As diffusers: the prompt inside the Llama chat template (:data:`xdit_jax.models.llama.HUNYUAN_VIDEO_TEMPLATE`,
``prompt_template``), ``hidden_states[-3]`` of the Llama encoder with the template's ``crop_start`` tokens cropped:
``max_sequence_length`` (256) states and their mask, which the transformer reads as its text mask (the refiner's
and the blocks' key mask); CLIP-L's pooled output of the prompt (77 tokens, no mask) as the pooled projection;
the guidance embedded (``guidance_scale`` 6.0: the transformer's guidance input is ``guidance_scale * 1000``); true
CFG only when ``true_cfg_scale > 1`` and a negative prompt (or negative embeddings with their pooled ones) is
given, the two passes then one batch ``[negative; prompt]`` over the ``cfg`` axis; sigmas
``linspace(1, 0, steps + 1)[:-1]`` shifted by the scheduler's ``shift`` (7.0 for the release), the Euler step, all
inside one jitted step; latents (B, 16, (F - 1) // 4 + 1, H / 8, W / 8); the VAE decode of ``latents /
scaling_factor``, framewise (diffusers' default temporal tiles), the image plane split over the mesh
(:func:`xdit_jax.models.vae_hunyuan_video.decode`). Defaults 720 x 1280, 129 frames, 50 steps.

Over the mesh: prompts over ``data``, true CFG's halves over ``cfg``, the video tokens over ``ring`` x
``ulysses`` (the text joins every attention as the masked context, sharded with the video:
:data:`xdit_jax.models.hunyuan_video.TEXT_KEYS`), PipeFusion over the double- then single-stream stacks
(:func:`xdit_jax.models.hunyuan_video.pipefusion_stacks`: the text sliced with the patches, its mask whole).

Differences from diffusers, on purpose: ``num_frames`` must be 4k + 1 (diffusers rounds others down silently: the
video it makes has ``4 ((F - 1) // 4) + 1`` frames); a string ``negative_prompt`` serves every prompt of a batch
(diffusers' would fail for several prompts); the latents, the timestep and the embedded guidance stay float32 in
bf16 too (diffusers rounds the guidance, 6000, to bf16: 6016). ``prompt_2`` / ``negative_prompt_2`` are accepted
and, as in diffusers (0.42: its ``encode_prompt`` hands CLIP ``prompt``), not used.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.models import hunyuan_video as hv
from xdit_jax.models import llama
from xdit_jax.models import vae_hunyuan_video as hv_vae
from xdit_jax.pipelines import image
from xdit_jax.pipelines.cogvideox import CogVideoXPipelineOutput
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.video import VideoPipelineBase
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

HunyuanVideoPipelineOutput = CogVideoXPipelineOutput
CLIP_TOKENS = 77  # diffusers' _get_clip_prompt_embeds: fixed
NUM_HIDDEN_LAYERS_TO_SKIP = 2  # diffusers: hidden_states[-3]


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, hv.HunyuanVideoConfig, hv_vae.HunyuanVideoVAEConfig)


def default_video(tc=None, vc=None) -> dict:
    """diffusers' defaults: 720 x 1280, 129 frames; diffusers' example writes them at 24 fps."""
    return {"height": 720, "width": 1280, "num_frames": 129, "fps": 24}


def check_request(tc, vc, height: int, width: int, num_frames: int, batch: int = 1, mesh_spec=None,
                  guidance_scale: float = 1.0) -> None:
    """Refuse what the model cannot take, before any heavy work, saying what would work. ``guidance_scale``: the
    true CFG scale that decides whether the batch doubles (1.0 without a negative prompt), not the embedded
    guidance."""
    from xdit_jax.mesh import MeshSpec

    st = vc.temporal_compression_ratio
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or \
            (num_frames - 1) % st:
        raise ValueError(f"num_frames must be {st}k + 1 (1, 5, 9, ..., 129: the VAE's causal frames), got "
                         f"{num_frames!r}.")
    if MeshSpec.parse(mesh_spec).cfg == 2 and guidance_scale <= 1.0:
        raise ValueError("Mesh cfg=2 splits the two passes of true CFG, which HunyuanVideo runs only with a negative "
                         "prompt and true_cfg_scale > 1 (its guidance_scale is an embedding); drop cfg=2 or give "
                         "both.")
    check_size_and_mesh(height, width, vc.spatial_compression_ratio * tc.patch_size,
                        hv.pipefusion_stacks(tc)["stacked_layers"], batch, mesh_spec, guidance_scale)


class HunyuanVideoPipeline(VideoPipelineBase):
    """Text-to-video with HunyuanVideo — see the module docstring."""

    _check_request = staticmethod(check_request)
    _default_video = staticmethod(default_video)
    _vae = hv_vae  # framewise decode, diffusers' default

    PIPELINE_CLASSES = ("HunyuanVideoPipeline",)
    CONFIG = hv.HunyuanVideoConfig
    MORE_TEXT_ENCODERS = ("_2",)  # CLIP (the first: Llama)
    stacks = staticmethod(hv.pipefusion_stacks)

    # ------------------------------------------------------------------ stages

    def _llama_fn(self):
        """``fn(ids, mask) -> hidden_states[-3]`` of the Llama encoder (only the layers it needs), jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if "llama" not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            index = -(NUM_HIDDEN_LAYERS_TO_SKIP + 1)
            enc = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_state(ids, mask, index))
            fns["llama"] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                                 self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns["llama"]

    def _clip_pooled_fn(self):
        fns = self.__dict__.setdefault("_text_fns", {})
        if "clip_pooled" not in fns:
            graphdef, state = nnx.split(self.text_encoder_2)
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).pooler_output)
            fns["clip_pooled"] = lambda ids: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)))
        return fns["clip_pooled"]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256, prompt_template: dict | None = None):
        """((B, L, d) Llama states, (B, L) int32 mask, (B, d_clip) pooled CLIP) as diffusers' ``encode_prompt``:
        the templated prompts' ``hidden_states[-3]`` with the template cropped (:func:`llama.llama_prompt_embeds`),
        CLIP's pooled output of the prompts padded to 77 tokens."""
        emb, mask = llama.llama_prompt_embeds(self.tokenizer, self.text_encoder, prompts, max_sequence_length,
                                              prompt_template, NUM_HIDDEN_LAYERS_TO_SKIP, encode=self._llama_fn())
        ids, _ = tokenize(self.tokenizer_2, prompts, CLIP_TOKENS)
        pooled = self._clip_pooled_fn()(ids)
        return emb.astype(self.dtype), jnp.asarray(mask, jnp.int32), pooled.astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step (:meth:`PipelineBase._flow_step_fn`); ``texts``: (Llama states, their mask, pooled
        CLIP, embedded guidance x 1000), a row each; ``guidance``: the true CFG scale."""
        guided = self.transformer_config.guidance_embeds
        return self._flow_step_fn(do_cfg, warmup, lambda x, texts, t: (x, t, texts[0], texts[1], texts[2],
                                                                       texts[3] if guided else None))

    def _video_tokens(self, latent_shape) -> int:
        return int(np.prod(self.transformer.grid(latent_shape)))

    def schedule(self, num_inference_steps: int, sigmas=None):
        """diffusers' sigmas ``linspace(1, 0, steps + 1)[:-1]`` (or the caller's), shifted by the scheduler."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        return flow_match.make_schedule(self.scheduler_config, sigmas=sigmas)

    def compile_step(self, batch: int = 1, *, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50, true_cfg_scale: float = 1.0,
                     max_sequence_length: int = 256):
        """The compiled denoising step (``jax.stages.Compiled``) for these shapes, without running it
        (``true_cfg_scale > 1``: the true CFG step, as with a negative prompt)."""
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        self.check_inputs(height, width, num_frames, batch, true_cfg_scale)
        do_cfg = true_cfg_scale > 1.0
        tc = self.transformer_config
        shape = self.latent_shape(batch, height, width, num_frames)
        n = (2 if do_cfg else 1) * self._padded_batch(batch)
        sd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=self._batch_sharding(len(shp), do_cfg))  # noqa
        latents = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self._latent_sharding(shape))
        texts = (sd((n, max_sequence_length, tc.text_embed_dim), self.dtype), sd((n, max_sequence_length), jnp.int32),
                 sd((n, tc.pooled_projection_dim), self.dtype), sd((n,), jnp.float32))
        sched = jax.tree.map(jnp.asarray, self.schedule(num_inference_steps))
        _, tstate = nnx.split(self.transformer)
        kv = self._pipefusion_buffers(n, self._video_tokens(shape), abstract=True, text_len=max_sequence_length)
        return self._step_fn(do_cfg, warmup=kv is None).lower(
            tstate, latents, flow_match.init_state(), jnp.int32(0), kv, texts, sched, jnp.float32(true_cfg_scale),
            jax.random.key(0)).compile()

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int = 50, sigmas=None, true_cfg_scale: float = 1.0, guidance_scale: float = 6.0,
                 num_videos_per_prompt: int = 1, latents=None, prompt_embeds=None, pooled_prompt_embeds=None,
                 prompt_attention_mask=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 negative_prompt_attention_mask=None, prompt_template: dict | None = None,
                 max_sequence_length: int = 256, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> HunyuanVideoPipelineOutput:
        """diffusers' arguments (``generator`` -> ``seed``; ``output_type`` "np" or "latent")."""
        del prompt_2, negative_prompt_2  # diffusers 0.42 reads neither (module docstring)
        dv = self.default_video()
        height, width, num_frames = (dv[k] if v is None else v for k, v in
                                     (("height", height), ("width", width), ("num_frames", num_frames)))
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type,
                                      "(with pooled_prompt_embeds and prompt_attention_mask)")
        if prompt_embeds is not None and (pooled_prompt_embeds is None or prompt_attention_mask is None):
            raise ValueError("prompt_embeds need pooled_prompt_embeds and prompt_attention_mask (HunyuanVideo reads "
                             "the pooled CLIP embedding and the Llama states' mask too).")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("negative_prompt_embeds need negative_prompt_attention_mask.")
        if prompt_template is not None and (not isinstance(prompt_template, dict) or "template" not in prompt_template):
            raise ValueError("prompt_template must be a dict with a 'template' key (and optionally 'crop_start').")
        per = per_prompt(num_videos_per_prompt, "num_videos_per_prompt")
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        do_cfg = true_cfg_scale > 1.0 and has_negative
        if true_cfg_scale > 1.0 and not has_negative:
            log.warning("true_cfg_scale=%s without a negative prompt: true CFG is off (as diffusers).", true_cfg_scale)
        self.check_inputs(height, width, num_frames, batch, true_cfg_scale if do_cfg else 1.0)
        sched = self.schedule(num_inference_steps, sigmas)
        timer = StageTimer()
        tc = self.transformer_config

        # 1. text: Llama states + mask, pooled CLIP; [negative; prompt] for true CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_prompt(
                    prompts, max_sequence_length, prompt_template)
            emb, mask, pooled = self._checked(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, "prompt")
            if do_cfg:
                if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                    n_emb, n_mask, n_pooled = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                 max_sequence_length, prompt_template)
                    # diffusers: given negative states keep their mask; a missing part is encoded
                    if negative_prompt_embeds is not None:
                        n_emb, n_mask = negative_prompt_embeds, negative_prompt_attention_mask
                    if negative_pooled_prompt_embeds is not None:
                        n_pooled = negative_pooled_prompt_embeds
                else:
                    n_emb, n_mask, n_pooled = (negative_prompt_embeds, negative_prompt_attention_mask,
                                               negative_pooled_prompt_embeds)
                n_emb, n_mask, n_pooled = self._checked(n_emb, n_mask, n_pooled, "negative_prompt")
                if n_emb.shape != emb.shape:
                    raise ValueError(f"negative prompt embeddings {n_emb.shape} must have the prompt's shape "
                                     f"{emb.shape} (the same max_sequence_length).")
                emb, mask, pooled = (jnp.concatenate([a, b]) for a, b in ((n_emb, emb), (n_mask, mask),
                                                                          (n_pooled, pooled)))
            guidance = jnp.full((emb.shape[0],), guidance_scale * 1000.0, jnp.float32)
            texts = tuple(self._put_batch(x, do_cfg, per) for x in (emb, mask, pooled, guidance))
            jax.block_until_ready(texts)
        del tc

        # 2. latents (diffusers' layout: B, C, F, h, w)
        shape = self.latent_shape(batch * per, height, width, num_frames)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, flow_match.INIT_NOISE_SIGMA,
                                        "batch, channels, (frames - 1) // 4 + 1, height/8, width/8")

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(true_cfg_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], self._video_tokens(shape), text_len=texts[0].shape[1])
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rng), len(sched.timesteps), progress,
                                       output_type, self._decode_fn(), kv=kv)
        return HunyuanVideoPipelineOutput(frames=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())

    def _checked(self, emb, mask, pooled, what: str):
        """(states in the compute dtype, int32 mask, pooled in the compute dtype), their shapes checked."""
        tc = self.transformer_config
        emb, mask, pooled = jnp.asarray(emb, self.dtype), jnp.asarray(mask, jnp.int32), jnp.asarray(pooled, self.dtype)
        if emb.ndim != 3 or emb.shape[2] != tc.text_embed_dim or mask.shape != emb.shape[:2] or \
                pooled.shape != (emb.shape[0], tc.pooled_projection_dim):
            raise ValueError(f"{what} embeddings {tuple(emb.shape)}, mask {tuple(mask.shape)}, pooled "
                             f"{tuple(pooled.shape)}: this model takes (batch, tokens, {tc.text_embed_dim}), "
                             f"(batch, tokens) and (batch, {tc.pooled_projection_dim}).")
        return emb, mask, pooled
