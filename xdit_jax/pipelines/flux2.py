"""FLUX.2 [klein] text-to-image, diffusers' ``Flux2KleinPipeline`` on a JAX mesh (and FLUX.2 [dev]'s
``Flux2Pipeline``: :class:`Flux2Pipeline`, the same loop with Mistral 3's language model and embedded guidance).

    pipe = Flux2KleinPipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B", mesh="ulysses=4", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", num_inference_steps=4, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

As diffusers: each prompt in Qwen3's chat template (one user message, ``enable_thinking=False``), padded to
``max_sequence_length`` (512), and ``hidden_states`` of layers ``text_encoder_out_layers`` (9, 18, 27) stacked into
the features (3 x 2560 = 7680 for the 4B; :func:`xdit_jax.models.qwen3.stacked_hidden_states`), every token kept
(no mask in the transformer), the text's RoPE ids (0, 0, 0, l); the latents (B, 128, H / 16, W / 16) — the VAE's 32
channels patchified 2 x 2 and normalised by the VAE's batch-norm statistics — packed to tokens with ids
(0, row, column, 0); sigmas ``linspace(1, 1/n, n)`` shifted by ``mu = compute_empirical_mu(tokens, n)``; the
transformer fed ``t / 1000`` and no guidance embedding; CFG (``guidance_scale > 1`` and not ``is_distilled``,
model_index.json) as ``neg + g (pos - neg)``, the negative prompt "" (here also a ``negative_prompt`` of one's
own); at the end the latents de-normalised (``x std + mean``), unpatchified and decoded by ``AutoencoderKLFlux2``.
``output_type="latent"`` returns what diffusers returns: the de-normalised, unpatchified latents (B, 32, H/8, W/8).

Over the mesh: prompts over ``data``, CFG's halves over ``cfg``, the transformer in FLUX.1's two phases over
(ring, ulysses) (:func:`transformer_over_mesh`: the double-stream blocks with the image tokens and the text sharded,
the single-stream blocks over the joint [text; image] sequence), PipeFusion over both stacks (the text sliced with
the patches), the VAE decode split over all devices.

Reference images (``image``: one or a list, diffusers' multi-reference editing): each checked (PIL, at least 64 px a
side, aspect ratio at most 8), resized to 1024^2 pixels (Lanczos) when larger, centre-cropped to multiples of 16,
encoded by the VAE's encoder (``latent_dist.mode()``, split over the mesh), patchified and normalised like the
latents, packed with ids (10 (i + 1), row, column, 0) and appended to the noisy tokens at every step (both CFG
halves); the prediction keeps the noisy tokens. The output size defaults to the first image's (cropped) size.

Not supported: the KV-cache variant (``Flux2KleinKVPipeline``), a ``generator`` (``seed`` instead), output types
other than "np" and "latent", reference images as arrays other than uint8 (H, W, 3). Known difference: with
``prompt_embeds`` of L tokens and CFG, the negative prompt is encoded at L tokens (both halves run in one batch;
diffusers encodes it at ``max_sequence_length``).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdit_jax.conversion import read_json
from xdit_jax.models import flux2, mistral3, qwen3, vae_flux2, vae_kl
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
)
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, vae_scale_factor
from xdit_jax.schedulers import flow_match

log = logging.getLogger("xdit_jax")

Flux2PipelineOutput = ImagePipelineOutput
DEFAULT_SAMPLE_SIZE = 128  # diffusers' default_sample_size (x the VAE factor 8: 1024 px)


def read_configs(folder: str | os.PathLike):
    """(transformer config, VAE config) of a diffusers or converted folder."""
    return image.read_configs(folder, flux2.Flux2Config, vae_flux2.AutoencoderKLFlux2Config)


def default_size(tc=None, vc=None) -> dict:
    s = DEFAULT_SAMPLE_SIZE * (vae_scale_factor(vc) if vc is not None else 8)
    return {"height": s, "width": s}


def is_distilled(folder) -> bool:
    """model_index.json's ``is_distilled`` (diffusers' ``register_to_config``; False where absent)."""
    from pathlib import Path

    return bool(read_json(Path(folder) / "model_index.json").get("is_distilled", False))


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, do_cfg: bool = False) -> None:
    """Refuse what the model cannot take, before any heavy work."""
    from xdit_jax.mesh import MeshSpec

    if MeshSpec.parse(mesh_spec).cfg == 2 and not do_cfg:
        raise ValueError("Mesh cfg=2 splits the two halves of classifier-free guidance, which FLUX.2 runs only for "
                         "klein with guidance_scale > 1 on a checkpoint that is not step-distilled (is_distilled; "
                         "FLUX.2-dev embeds its guidance: no CFG); drop cfg=2 or raise the guidance scale.")
    check_size_and_mesh(height, width, 2 * vae_scale_factor(vc), flux2.pipefusion_stacks(tc)["stacked_layers"], batch,
                        mesh_spec, 2.0 if do_cfg else 1.0)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers' ``compute_empirical_mu`` (pipeline_flux2_klein): the shift from the image tokens and the steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def patchify(latents):
    """diffusers' ``_patchify_latents``: (B, C, h, w) -> (B, 4C, h/2, w/2) (channel c's 2 x 2 patch at 4c..4c+3)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents):
    """diffusers' ``_unpatchify_latents``: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents):
    """diffusers' ``_pack_latents``: (B, C, h, w) -> (B, h w, C)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(0, 2, 1)


def unpack(latents, h: int, w: int):
    """(B, h w, C) -> (B, C, h, w): ``_unpack_latents_with_ids`` for the row-major ids of :func:`flux2.image_ids`."""
    b, _, c = latents.shape
    return latents.transpose(0, 2, 1).reshape(b, c, h, w)


REFERENCE_MAX_AREA = 1024 * 1024  # diffusers resizes larger reference images down to this many pixels


def reference_image(image, multiple: int = 16):
    """diffusers' reference-image preparation: ``check_image_input`` (at least 64 px a side, aspect ratio <= 8), a
    Lanczos resize to :data:`REFERENCE_MAX_AREA` pixels where larger, a centre crop to multiples of ``multiple``
    (``Flux2ImageProcessor``'s ``resize_mode="crop"``), scaled to [-1, 1]: (1, 3, H, W) float32."""
    import math

    from PIL import Image

    from xdit_jax.pipelines.denoise import rgb_image

    img = rgb_image(image)
    if isinstance(img, np.ndarray):  # (rgb_image: a PIL image, or a checked (H, W, 3) array)
        if img.dtype != np.uint8:
            raise ValueError("image: give a PIL image or a uint8 (height, width, 3) array (diffusers takes PIL).")
        img = Image.fromarray(img)
    w, h = img.size
    if w < 64 or h < 64:
        raise ValueError(f"Image too small: {w}x{h}. Both dimensions must be at least 64px.")
    if max(w / h, h / w) > 8:
        raise ValueError(f"Aspect ratio too extreme: {w}x{h}. Maximum allowed ratio is 8:1.")
    if w * h > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (w * h))
        img = img.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        w, h = img.size
    cw, ch = w // multiple * multiple, h // multiple * multiple
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return (np.asarray(img, np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)[None]


def transformer_over_mesh(graphdef, state, args, mesh, backend: str = "xla", rope=None):
    """(Traced.) The FLUX.2 transformer on ``args`` = (hidden_states, encoder_hidden_states, timestep, img_ids,
    txt_ids, guidance) over ``mesh`` in FLUX.1's two phases (the double-stream blocks over the image tokens with the
    text sharded too, then the single-stream blocks over [text; image]). Equals ``model(*args)`` on one device."""
    model = nnx.merge(graphdef, state)
    x, tokens, cond, txt_rope = model.embed(*args, rope=rope)
    double = lambda p, y, t, c: nnx.merge(graphdef, p).double_blocks(y, t, c)  # noqa: E731
    single = lambda p, y, t, c: nnx.merge(graphdef, p).single_blocks(y, t, c)  # noqa: E731
    dcond = {k: cond[k] for k in ("mod_img", "mod_txt", "context", "context_rope")}
    x, c = run_blocks(double, state, x, tokens, dcond, mesh, backend=backend, with_context=True,
                      text=flux2.TEXT_KEYS)
    joint = run_blocks(single, state, jnp.concatenate([c, x], axis=1), model.joint_tokens(tokens, txt_rope),
                       {"mod_single": cond["mod_single"]}, mesh, backend=backend)
    return model.head(joint[:, c.shape[1]:], cond)


class Flux2KleinPipeline(ImagePipelineBase):
    """Text-to-image with FLUX.2 [klein] — see the module docstring."""

    PIPELINE_CLASSES = ("Flux2KleinPipeline",)
    TEXT_LAYERS = qwen3.FLUX2_LAYERS  # the text encoder's hidden states stacked into the features
    EMBEDDED_GUIDANCE = False  # klein passes no guidance to the transformer (FLUX.2-dev: the scale, embedded)
    PACKED_LATENT_OUTPUT = False  # output_type="latent": klein's final latents (FLUX.2-dev: the packed tokens)

    CONFIG = flux2.Flux2Config
    stacks = staticmethod(flux2.pipefusion_stacks)

    def __init__(self, *, is_distilled: bool = False, vae_encoder=None, **parts):
        super().__init__(**parts)
        self.is_distilled = bool(is_distilled)
        self.vae_encoder = vae_encoder

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """model_index.json's ``is_distilled``; the VAE's encoder for reference images (``vae/encoder_params``, written
        by conversion; float32, as diffusers' recipe upcasts the VAE), where the folder has it."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_kl_encoder
        from xdit_jax.pipelines.denoise import _RANDOM_WEIGHTS, load_vae_encoder

        vae_encoder = None
        if (folder / "vae" / "encoder_params").exists() or _RANDOM_WEIGHTS.get() is not None:
            vc = vae_flux2.AutoencoderKLFlux2Config.from_dict(read_json(folder / "vae" / "config.json"))
            vae_encoder = load_vae_encoder(folder, vc, jnp.float32, NamedSharding(mesh, P()), vae_kl_encoder)
        return {"is_distilled": is_distilled(folder), "vae_encoder": vae_encoder}

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        return default_size(self.transformer_config, self.vae_config)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patchified latents' (h, w): (H / 16, W / 16)."""
        s = 2 * vae_scale_factor(self.vae_config)
        return height // s, width // s

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """diffusers' ``latents`` argument: (B, in_channels, H / 16, W / 16) (patchified, normalised)."""
        return (batch, self.transformer_config.in_channels) + self.latent_grid(height, width)

    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 and not self.is_distilled

    def _qwen_fn(self, layers):
        """``fn(ids, mask) -> (B, L, len(layers) x hidden)`` of the Qwen3 encoder, jitted once per layer set."""
        fns = self.__dict__.setdefault("_text_fns", {})
        key = ("qwen3_stacked", tuple(layers))
        if key not in fns:
            graphdef, state = nnx.split(self.text_encoder)
            enc = jax.jit(lambda state, ids, mask: qwen3.stacked_hidden_states(nnx.merge(graphdef, state), ids, mask,
                                                                               layers))
            fns[key] = lambda ids, mask: enc(state, self._put_replicated(jnp.asarray(ids, jnp.int32)),
                                             self._put_replicated(jnp.asarray(mask, jnp.int32)))
        return fns[key]

    def _tokenize(self, prompts: list[str], max_sequence_length: int):
        """(ids, mask) of the templated prompts: Qwen3's chat template without thinking."""
        return qwen3.tokenize(self.tokenizer, prompts, max_sequence_length, enable_thinking=False)

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512, text_encoder_out_layers=None):
        """diffusers' ``_get_qwen3_prompt_embeds`` (FLUX.2-dev: ``_get_mistral_3_small_prompt_embeds``): (B,
        max_sequence_length, len(layers) x hidden) in the model's dtype."""
        ids, mask = self._tokenize(prompts, max_sequence_length)
        layers = self.TEXT_LAYERS if text_encoder_out_layers is None else tuple(text_encoder_out_layers)
        return self._qwen_fn(layers)(ids, mask).astype(self.dtype)

    def encode_image(self, pixels) -> jax.Array:
        """diffusers' ``_encode_vae_image`` + normalisation: (1, 3, H, W) in [-1, 1] -> packed reference tokens
        (H/16 x W/16, 128): ``latent_dist.mode()``, patchified, ``(z - bn_mean) / bn_std``; the image plane split
        over the mesh."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.models import vae_kl_encoder
        from xdit_jax.parallel.vae import sharded_encode

        if self.vae_encoder is None:
            raise ValueError("This folder has no VAE encoder (vae/encoder_params), which reference images need; "
                             "convert the diffusers folder again (delete the cached conversion).")
        key = ("vae_encode",)
        if key not in self._decode_cache:
            graphdef, state = nnx.split(self.vae_encoder)
            vgraph, vstate = nnx.split(self.vae)
            mesh = self.mesh if self.mesh.size > 1 else None

            def encode(state, vstate, x):
                mean = sharded_encode(lambda m, y: vae_kl_encoder.encode(m, y)[0], nnx.merge(graphdef, state), x,
                                      mesh)
                bn_mean, bn_std = vae_flux2.bn_stats(nnx.merge(vgraph, vstate))
                z = (patchify(mean.astype(jnp.float32)) - bn_mean[None, :, None, None]) / bn_std[None, :, None, None]
                return pack(z)[0]

            jitted = jax.jit(encode, out_shardings=NamedSharding(self.mesh, P()))
            self._decode_cache[key] = lambda x: jitted(state, vstate, x)
        return self._decode_cache[key](jnp.asarray(pixels, jnp.float32))

    def schedule(self, num_inference_steps: int, image_seq_len: int, sigmas=None):
        """diffusers' schedule: sigmas linspace(1, 1/n, n) (or the caller's), ``mu = compute_empirical_mu``."""
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return flow_match.make_schedule(self.scheduler_config, sigmas=sigmas,
                                        mu=compute_empirical_mu(image_seq_len, num_inference_steps))

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng)``; ``texts``:
        (text states,) ([negative; prompt] for CFG); ``latents`` packed (B, N, in_channels)."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, mesh, backend = self.dtype, self.mesh, self.attention_backend
        embedded = self.EMBEDDED_GUIDANCE

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scale, rope, rng):
            del rng
            x = self._model_batch(latents, do_cfg)
            if len(texts) > 1:  # reference images: their tokens after the noisy ones (cropped from the prediction)
                x = jnp.concatenate([x, texts[1].astype(x.dtype)], axis=1)
            t = jnp.broadcast_to(sched.timesteps[i] / 1000, (x.shape[0],))
            args = (x.astype(dtype), texts[0], t, None, None,
                    jnp.broadcast_to(scale, (x.shape[0],)) if embedded else None)
            if kv is None:
                pred = transformer_over_mesh(graphdef, tstate, args, mesh if mesh.size > 1 else None, backend,
                                             rope=rope)
            else:  # PipeFusion: both stacks with the text held whole (Flux2Transformer2DModel.blocks)
                model = nnx.merge(graphdef, tstate)
                h, tokens, cond, _ = model.embed(*args, rope=rope)
                h, kv = self._blocks_over_mesh(blocks, tstate, h, tokens, cond, kv, warmup)
                pred = model.head(h, cond)
            pred = self._real_rows(pred.astype(jnp.float32)[:, :latents.shape[1]], latents.shape[0], do_cfg)
            if do_cfg:  # [negative; prompt]
                neg, pos = jnp.split(pred, 2)
                pred = neg + scale * (pos - neg)
            latents, sched_state = flow_match.step(sched, i, pred, latents, sched_state)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _finish_fn(self, grid):
        """Jitted: packed latents -> diffusers' final latents (B, 32, h, w): unpacked, de-normalised by the VAE's
        batch-norm statistics, unpatchified."""
        key = ("finish", grid)
        if key not in self._decode_cache:
            graphdef, state = nnx.split(self.vae)
            fn = jax.jit(lambda state, lat: unpatchify(vae_flux2.denormalize(nnx.merge(graphdef, state),
                                                                             unpack(lat, *grid))))
            self._decode_cache[key] = lambda lat: fn(state, lat)
        return self._decode_cache[key]

    def _decode_fn(self, size=None):
        """Jitted VAE decode over the whole mesh of the final latents (B, 32, h, w) -> (B, H, W, 3) in [0, 1]."""
        dtype = self.dtype

        def decode(vae, latents, **kw):
            return vae_kl.decode(vae, latents.astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, *, image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, sigmas=None, guidance_scale: float = 4.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = 512,
                 text_encoder_out_layers=None, seed: int = 0, output_type: str = "np",
                 progress: bool = True) -> Flux2PipelineOutput:
        """diffusers' arguments and defaults (``generator`` -> ``seed``; ``output_type`` "np" or "latent");
        ``image``: reference images (a PIL image or uint8 (H, W, 3) array, or a list; see the module docstring);
        ``negative_prompt``: ours (diffusers always uses ""); ``latents``: diffusers' (B, in_channels, H/16, W/16)."""
        refs = None
        if image is not None:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if not images:
                raise ValueError("image: an empty list; give a reference image (or None for text-to-image).")
            multiple = 2 * vae_scale_factor(self.vae_config)
            refs = [reference_image(im, multiple) for im in images]
            height = refs[0].shape[2] if height is None else height
            width = refs[0].shape[3] if width is None else width
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        prompts, batch = prompt_batch(prompt, prompt_embeds, output_type)
        per = per_prompt(num_images_per_prompt)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        do_cfg = self.do_classifier_free_guidance(guidance_scale)
        if guidance_scale > 1 and self.is_distilled:
            log.warning("Guidance scale %s is ignored for step-wise distilled models (as diffusers).", guidance_scale)
        if not do_cfg and (negative_prompt is not None or negative_prompt_embeds is not None):
            log.warning("The negative prompt is not used: CFG runs only with guidance_scale > 1 on a checkpoint "
                        "that is not step-distilled.")
        tc = self.transformer_config
        check_request(tc, self.vae_config, height, width, batch, self.mesh_spec, do_cfg)
        timer = StageTimer()

        # 1. text: the stacked Qwen3 hidden states; [negative; prompt] for CFG
        with timer.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self.encode_prompt(prompts, max_sequence_length, text_encoder_out_layers)
            emb = jnp.asarray(prompt_embeds, self.dtype)
            if emb.ndim != 3 or emb.shape[2] != tc.joint_attention_dim:
                raise ValueError(f"prompt_embeds {tuple(emb.shape)}: this model takes (batch, tokens, "
                                 f"{tc.joint_attention_dim}).")
            if do_cfg:
                if negative_prompt_embeds is None:
                    negative_prompt_embeds = self.encode_prompt(negative_prompts(negative_prompt, batch),
                                                                emb.shape[1], text_encoder_out_layers)
                neg = jnp.asarray(negative_prompt_embeds, self.dtype)
                if neg.shape != emb.shape:
                    raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must have the shape of prompt_embeds "
                                     f"{tuple(emb.shape)} (both halves run in one batch).")
                emb = jnp.concatenate([neg, emb])
            texts = (self._put_batch(emb, do_cfg, per),)
            jax.block_until_ready(texts)

        # 2. latents (diffusers' patchified layout, packed here), RoPE tables, schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        rng = jax.random.key(seed)
        if latents is None:
            latents = jax.random.normal(rng, shape, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != shape:
            raise ValueError(f"latents have shape {latents.shape}; expected {shape} (batch, {tc.in_channels}, "
                             "height // 16, width // 16).")
        latents = self._initial_latents(pack(latents), (shape[0], h * w, shape[1]), rng, 1.0,
                                        "batch, tokens, channels")
        sched = self.schedule(num_inference_steps, h * w, sigmas)
        ids = flux2.image_ids(h, w)
        if refs is not None:  # the reference images' tokens, the same in every row and both CFG halves
            with timer.stage("image_encoding"):
                tokens = [self.encode_image(r) for r in refs]
                rows = jnp.broadcast_to(jnp.concatenate(tokens)[None], (batch * per,) + (sum(len(t) for t in tokens),
                                                                                          tc.in_channels))
                texts = texts + (self._put_batch(jnp.concatenate([rows, rows]) if do_cfg else rows, do_cfg),)
                jax.block_until_ready(texts)
            s = 2 * vae_scale_factor(self.vae_config)
            ids = np.concatenate([ids] + [flux2.image_ids(r.shape[2] // s, r.shape[3] // s, t=10 * (k + 1))
                                          for k, r in enumerate(refs)])
        rope = (flux2.rope_tables(ids, tc.axes_dims_rope, tc.rope_theta),
                flux2.rope_tables(flux2.text_ids(emb.shape[1]), tc.axes_dims_rope, tc.rope_theta))
        rope = jax.tree.map(self._put_replicated, rope)

        # 3. denoise: one jitted step per iteration; then the VAE
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.float32(guidance_scale))
        kv = self._pipefusion_buffers(texts[0].shape[0], len(ids), text_len=emb.shape[1])
        finish, decode = self._finish_fn((h, w)), self._decode_fn()
        if self.PACKED_LATENT_OUTPUT:  # (the unpacking and de-normalisation are then the decode's first step)
            finish, decode = None, (lambda lat, finish=finish, decode=decode: decode(finish(lat)))
        out = self._denoise_and_decode(timer, do_cfg, latents, flow_match.init_state(),
                                       (texts, sched_arrays, scale, rope, rng), len(sched.timesteps), progress,
                                       output_type, decode, kv=kv, finish=finish)
        return Flux2PipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())


class Flux2Pipeline(Flux2KleinPipeline):
    """Text-to-image with FLUX.2 [dev] (diffusers' ``Flux2Pipeline``): :class:`Flux2KleinPipeline`'s loop with
    Mistral 3's language model as the text encoder (a system message and the prompt in its chat template, hidden states
    10, 20, 30 stacked: :mod:`xdit_jax.models.mistral3`) and the guidance scale embedded (guidance-distilled: one
    sample per prompt, no CFG, no negative prompt). Reference images as klein's. Not supported: diffusers' prompt
    upsampling (``caption_upsample_temperature``: generation with the VLM)."""

    PIPELINE_CLASSES = ("Flux2Pipeline",)
    TEXT_LAYERS = mistral3.FLUX2_DEV_LAYERS
    EMBEDDED_GUIDANCE = True
    PACKED_LATENT_OUTPUT = True  # diffusers' Flux2Pipeline returns the packed latents (B, tokens, 128)

    @classmethod
    def from_pretrained(cls, model, **kw) -> Flux2Pipeline:
        """As :meth:`Flux2KleinPipeline.from_pretrained`. The hub's ``tokenizer`` folder holds a ``PixtralProcessor``
        (which needs torchvision); its tokenizer is loaded, and where it carries no chat template the processor's
        (``chat_template.jinja`` / ``chat_template.json`` next to it) is given to it."""
        pipe = super().from_pretrained(model, **kw)
        if getattr(pipe.tokenizer, "chat_template", None) is None:
            folder, _ = cls._pipeline_folder(model, cls.PIPELINE_CLASSES, cache_dir=kw.get("cache_dir"),
                                             variant=kw.get("variant"), revision=kw.get("revision"))
            tok = folder / "tokenizer"
            if (tok / "chat_template.jinja").exists():
                pipe.tokenizer.chat_template = (tok / "chat_template.jinja").read_text()
            elif (tok / "chat_template.json").exists():
                pipe.tokenizer.chat_template = read_json(tok / "chat_template.json")["chat_template"]
            else:
                raise ValueError(f"{tok}: the tokenizer has no chat template (chat_template.jinja / .json), which "
                                 "FLUX.2-dev's prompt encoding needs.")
        return pipe

    def do_classifier_free_guidance(self, guidance_scale: float) -> bool:
        return False

    def _tokenize(self, prompts: list[str], max_sequence_length: int):
        return mistral3.tokenize(self.tokenizer, prompts, max_sequence_length)

    def __call__(self, prompt: str | list[str] | None = None, *, image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, sigmas=None, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, max_sequence_length: int = 512,
                 text_encoder_out_layers=None, caption_upsample_temperature=None, seed: int = 0,
                 output_type: str = "np", progress: bool = True, negative_prompt=None) -> Flux2PipelineOutput:
        """diffusers' Flux2Pipeline arguments and defaults (50 steps, embedded guidance 4)."""
        if caption_upsample_temperature is not None:
            raise NotImplementedError("caption_upsample_temperature (prompt upsampling with the Mistral VLM) is not "
                                      "supported; upsample the prompt elsewhere and pass it.")
        if negative_prompt is not None:
            raise ValueError("FLUX.2-dev is guidance-distilled (its guidance_scale is an embedding): it takes no "
                             "negative prompt.")
        return super().__call__(prompt, image=image, height=height, width=width,
                                num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                                num_images_per_prompt=num_images_per_prompt, latents=latents,
                                prompt_embeds=prompt_embeds, max_sequence_length=max_sequence_length,
                                text_encoder_out_layers=text_encoder_out_layers, seed=seed, output_type=output_type,
                                progress=progress)
