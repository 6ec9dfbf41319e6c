"""HiDream-I1 text-to-image, diffusers' ``HiDreamImagePipeline`` on a JAX mesh.

    pipe = HiDreamImagePipeline.from_pretrained("path/to/HiDream-I1-Full", mesh="cfg=2,ulysses=4", dtype="bfloat16")
    out = pipe("A cat holding a sign that says hello world", height=1024, width=1024, seed=0)
    out.images   # (batch, height, width, 3) float in [0, 1]

Four text encoders as diffusers: two CLIPs with projection (their projected pooled outputs, concatenated: the pooled
embedding), T5 (with its attention mask) and Llama-3.1 (``output_hidden_states``: every layer's output, stacked;
the pad token is the EOS). The transformer (:mod:`xdit_jax.models.hidream`) runs in two phases over the mesh
(:func:`transformer_over_mesh`): the double-stream blocks with the image tokens sharded over (ring, ulysses) and the
text held whole as their attention's context, then the single-stream blocks over the joint [image; T5; Llama]
sequence sharded as one, each block's Llama layer its attention's context. CFG (``guidance_scale > 1``: [negative;
positive]) splits over ``cfg=2``. The noise prediction is the model's output negated, as diffusers; the scheduler is
the folder's: UniPC (flow sigmas) or flow-matching Euler (``mu`` from ``max_resolution``'s token count where it
shifts dynamically), its step inside the jitted step.

As diffusers, the requested size keeps its aspect ratio and is rescaled to ``default_sample_size x VAE factor``
squared pixels (1024 x 1024 for the release), floored to 16; a non-square latent is padded to ``max_resolution``'s
token count (the model's key mask). PipeFusion (``pipefusion`` axis, or ``pipefusion_patches``) splits both stacks
over the stages as FLUX's (:meth:`~xdit_jax.models.hidream.HiDreamImageTransformer2DModel.blocks`): each patch of image
tokens carries the whole text stream and the index of its next block round the stages once per stack; every device
holds every block's Llama layer, picked by that index (xDiT's defaults: as many patches as stages, one exact warm-up
step).
"""

from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from xdit_jax.models import hidream, vae_kl
from xdit_jax.parallel.sequence import run_blocks
from xdit_jax.pipelines import image
from xdit_jax.pipelines.denoise import (
    StageTimer,
    check_size_and_mesh,
    negative_prompts,
    peak_memory_bytes,
    per_prompt,
    prompt_batch,
    tokenize,
)
from xdit_jax.pipelines.image import ImagePipelineBase, ImagePipelineOutput, vae_scale_factor
from xdit_jax.schedulers import flow_match, module_of, unipc

log = logging.getLogger("xdit_jax")

HiDreamImagePipelineOutput = ImagePipelineOutput
DEFAULT_SAMPLE_SIZE = 128  # diffusers' HiDreamImagePipeline.default_sample_size
CLIP_MAX_TOKENS = 218  # diffusers' cap on the CLIP prompts' length (min(max_sequence_length, 218))


def read_configs(folder: str | os.PathLike):
    return image.read_configs(folder, hidream.HiDreamConfig)


def default_size(tc=None, vc=None) -> dict:
    """diffusers' default: ``default_sample_size`` x the VAE factor (1024 x 1024)."""
    s = DEFAULT_SAMPLE_SIZE * (vae_scale_factor(vc) if vc is not None else 8)
    return {"height": s, "width": s}


def run_size(height: int, width: int, vae_factor: int, default_sample_size: int = DEFAULT_SAMPLE_SIZE):
    """diffusers' HiDreamImagePipeline size rule: the aspect ratio of ``height`` x ``width`` at
    ``(default_sample_size * vae_factor) ** 2`` pixels, each side floored to ``2 * vae_factor``."""
    division = 2 * vae_factor
    scale = math.sqrt((default_sample_size * vae_factor) ** 2 / (width * height))
    return int(height * scale // division * division), int(width * scale // division * division)


def check_request(tc, vc, height: int, width: int, batch: int = 1, mesh_spec=None, guidance_scale: float = 5.0,
                  default_sample_size: int = DEFAULT_SAMPLE_SIZE) -> None:
    """Refuse what the model cannot take (a size that leaves no latent, more PipeFusion stages than a stack's
    layers), before any heavy work."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive; got {height}x{width}.")
    f = vae_scale_factor(vc)
    h, w = run_size(height, width, f, default_sample_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"{height}x{width} rescaled to {default_sample_size * f}^2 pixels leaves {h}x{w}: the aspect "
                         "ratio is too extreme.")
    hidream.patch_layout(tc, 2 * (h // (2 * f)), 2 * (w // (2 * f)))
    check_size_and_mesh(h, w, 2 * f, hidream.pipefusion_stacks(tc)["stacked_layers"], batch, mesh_spec,
                        guidance_scale)


def transformer_over_mesh(graphdef, state, args, mesh, backend: str = "xla", layout=None):
    """(Traced.) The HiDream transformer on ``args`` = (latents, timesteps, T5 states, Llama states, pooled) over
    ``mesh``: embed, the double-stream blocks over the image tokens (text whole), the single-stream blocks over
    [image; text], the head. Equals ``model(*args)`` on one device."""
    model = nnx.merge(graphdef, state)
    x, tokens, cond = model.embed(*args, layout=layout)
    double = lambda p, y, t, c: nnx.merge(graphdef, p).double_blocks(y, t, c)  # noqa: E731
    single = lambda p, y, t, c: nnx.merge(graphdef, p).single_blocks(y, t, c)  # noqa: E731
    x, c = run_blocks(double, state, x, tokens, cond, mesh, backend=backend, with_context=True)
    joint = run_blocks(single, state, jnp.concatenate([x, c], axis=1), model.joint_tokens(tokens, c.shape[1]),
                       {"temb": cond["temb"], "llama_single": cond["llama_single"]}, mesh, backend=backend)
    return model.head(joint[:, :x.shape[1]], cond, args[0].shape)


class HiDreamImagePipeline(ImagePipelineBase):
    """Text-to-image with HiDream-I1 (Full, Dev, Fast) — see the module docstring."""

    PIPELINE_CLASSES = ("HiDreamImagePipeline",)
    CONFIG = hidream.HiDreamConfig
    MORE_TEXT_ENCODERS = ("_2", "_3", "_4")  # CLIP-G (the first: CLIP-L), T5, Llama-3.1
    SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
    stacks = staticmethod(hidream.pipefusion_stacks)
    default_sample_size = DEFAULT_SAMPLE_SIZE  # (diffusers' attribute: the size rule's side in latent pixels)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """(No more parts; the check that the Llama encoder is in the folder, before any weights load. With random
        weights (``from_config``) its config alone: the tokenizers are stand-ins.)"""
        from pathlib import Path

        from xdit_jax.pipelines.denoise import _RANDOM_WEIGHTS

        needed = ("text_encoder_4",) if _RANDOM_WEIGHTS.get() is not None else ("text_encoder_4", "tokenizer_4")
        missing = [n for n in needed if not (Path(folder) / n).is_dir()]
        if missing:
            raise ValueError(f"{folder} has no {' / '.join(missing)}: the Llama-3.1 encoder is not in this folder "
                             "(diffusers' example loads meta-llama/Meta-Llama-3.1-8B-Instruct's LlamaForCausalLM and "
                             "tokenizer and passes them to from_pretrained). Save them (save_pretrained) into the "
                             "diffusers folder as text_encoder_4/ and tokenizer_4/, name them in model_index.json "
                             '("text_encoder_4": ["transformers", "LlamaForCausalLM"], "tokenizer_4": ["transformers", '
                             '"PreTrainedTokenizerFast"]) and load it again.')
        return {}

    def _setup_pipefusion(self, patches, warmup_steps) -> None:
        super()._setup_pipefusion(patches, warmup_steps)
        self.scheduler = module_of(self.scheduler_config)
        if self.tokenizer_4 is not None:
            self.tokenizer_4.pad_token = self.tokenizer_4.eos_token  # (diffusers' __init__)

    # ------------------------------------------------------------------ stages

    def default_size(self) -> dict:
        s = self.default_sample_size * vae_scale_factor(self.vae_config)
        return {"height": s, "width": s}

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        f = vae_scale_factor(self.vae_config)
        return 2 * (height // (2 * f)), 2 * (width // (2 * f))

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """diffusers' ``latents`` (B, in_channels, h, w) at the size the call runs at (after :func:`run_size`)."""
        return (batch, self.transformer_config.in_channels) + self.latent_grid(height, width)

    def _clip_fn(self, name: str):
        fns = self.__dict__.setdefault("_text_fns", {})
        if name not in fns:
            graphdef, state = nnx.split(getattr(self, name))
            enc = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).text_embeds)
            fns[name] = lambda ids: enc(state, ids)
        return fns[name]

    def _llama_fn(self):
        fns = self.__dict__.setdefault("_text_fns", {})
        if "llama" not in fns:
            graphdef, state = nnx.split(self.text_encoder_4)

            @jax.jit
            def enc(state, ids, mask):
                hidden = nnx.merge(graphdef, state)(ids, mask, output_hidden_states=True).hidden_states
                return jnp.stack(hidden[1:])

            fns["llama"] = lambda ids, mask: enc(state, ids, mask)
        return fns["llama"]

    def encode_prompt(self, prompts: list[str], prompts_2=None, prompts_3=None, prompts_4=None,
                      max_sequence_length: int = 128):
        """(T5 states (B, Lt, d_t5), Llama states (n_layers, B, Ll, d_llama), pooled (B, 2 x projection)) as
        diffusers' ``encode_prompt`` makes them; ``prompts_N`` default to ``prompts``."""
        b = len(prompts)
        for name, ps in (("prompt_2", prompts_2), ("prompt_3", prompts_3), ("prompt_4", prompts_4)):
            if ps is not None and len(ps) not in (1, b):
                raise ValueError(f"{name} must be of length 1 or {b}")
        rows = lambda ps: (ps * b if len(ps) == 1 else ps) if ps else prompts  # noqa: E731
        put = lambda a: self._put_replicated(jnp.asarray(a, jnp.int32))  # noqa: E731
        clip_len = min(max_sequence_length, CLIP_MAX_TOKENS)
        pooled = [self._clip_fn(name)(put(tokenize(tok, ps, clip_len)[0]))
                  for name, tok, ps in (("text_encoder", self.tokenizer, prompts),
                                        ("text_encoder_2", self.tokenizer_2, rows(prompts_2)))]
        ids, mask = tokenize(self.tokenizer_3, rows(prompts_3),
                             min(max_sequence_length, self.tokenizer_3.model_max_length))
        t5 = self._text_encoder_fn("text_encoder_3")(put(ids), put(mask))
        ids, mask = tokenize(self.tokenizer_4, rows(prompts_4),
                             min(max_sequence_length, self.tokenizer_4.model_max_length))
        llama = self._llama_fn()(put(ids), put(mask))
        return t5.astype(self.dtype), llama.astype(self.dtype), jnp.concatenate(pooled, axis=-1).astype(self.dtype)

    def _step_fn(self, do_cfg: bool, warmup: bool = True):
        """The jitted step ``(tstate, latents, sched_state, i, kv, texts, sched, scale, layout, rng)``; ``texts``:
        (T5 states, Llama states (B, n, Ll, d): batch first for the mesh), pooled); ``kv``: PipeFusion's K/V
        buffers (``warmup``: an exact step that fills them) or None."""
        key = (do_cfg, warmup)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype, mesh, backend, scheduler = self.dtype, self.mesh, self.attention_backend, self.scheduler

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.pipefusion)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def step(tstate, latents, sched_state, i, kv, texts, sched, scale, layout, rng):
            x = self._model_batch(latents, do_cfg)
            t = jnp.broadcast_to(sched.timesteps[i], (x.shape[0],))
            args = (x.astype(dtype), t, texts[0], jnp.swapaxes(texts[1], 0, 1), texts[2])
            rope, mask = layout
            layout_ = (int(rope[0].shape[0]), rope, mask)
            if kv is None:
                pred = transformer_over_mesh(graphdef, tstate, args, mesh if mesh.size > 1 else None, backend,
                                             layout_)
            else:  # PipeFusion: both stacks, the text whole with each patch (HiDreamImageTransformer2DModel.blocks)
                model = nnx.merge(graphdef, tstate)
                x_tokens, tokens, cond = model.embed(*args, layout=layout_)
                x_tokens, kv = self._blocks_over_mesh(blocks, tstate, x_tokens, tokens, cond, kv, warmup)
                pred = model.head(x_tokens, cond, args[0].shape)
            pred = -self._real_rows(pred.astype(jnp.float32), latents.shape[0], do_cfg)
            if do_cfg:  # [negative; positive]
                neg, pos = jnp.split(pred, 2)
                pred = neg + scale * (pos - neg)
            latents, sched_state = scheduler.step(sched, i, pred, latents, sched_state)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _decode_fn(self, size=None):
        vc, dtype = self.vae_config, self.dtype

        def decode(vae, latents, **kw):
            return vae_kl.decode(vae, vae_kl.unscale_latents(vc, latents.astype(jnp.float32)).astype(dtype), **kw)

        return self._jit_decode("fn", decode)

    def schedule(self, num_inference_steps: int):
        """diffusers' HiDreamImagePipeline schedule: UniPC's own, or FlowMatch Euler's with ``mu`` from the
        transformer's ``max_seq`` (used where it shifts dynamically)."""
        if self.scheduler is unipc:
            return unipc.make_schedule(self.scheduler_config, num_inference_steps)
        mu = flow_match.calculate_shift(self.transformer_config.max_seq)
        return flow_match.make_schedule(self.scheduler_config, num_inference_steps, mu=mu)

    # ------------------------------------------------------------------ call

    def __call__(self, prompt: str | list[str] | None = None, prompt_2=None, prompt_3=None, prompt_4=None, *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None,
                 negative_prompt_4=None, num_images_per_prompt: int = 1, latents=None, prompt_embeds_t5=None,
                 prompt_embeds_llama3=None, negative_prompt_embeds_t5=None, negative_prompt_embeds_llama3=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, max_sequence_length: int = 128,
                 seed: int = 0, output_type: str = "np", progress: bool = True) -> HiDreamImagePipelineOutput:
        """diffusers' HiDreamImagePipeline call and defaults (``generator`` -> ``seed``); the embeddings (T5 (B, L,
        d), Llama (n_layers, B, L, d), pooled (B, d)) all three or none, as their negatives."""
        ds = self.default_size()
        height = ds["height"] if height is None else height
        width = ds["width"] if width is None else width
        given = (prompt_embeds_t5, prompt_embeds_llama3, pooled_prompt_embeds)
        if any(g is not None for g in given) and any(g is None for g in given):
            raise ValueError("prompt_embeds_t5, prompt_embeds_llama3 and pooled_prompt_embeds come together.")
        neg_given = (negative_prompt_embeds_t5, negative_prompt_embeds_llama3, negative_pooled_prompt_embeds)
        if any(g is not None for g in neg_given) and any(g is None for g in neg_given):
            raise ValueError("negative_prompt_embeds_t5, negative_prompt_embeds_llama3 and "
                             "negative_pooled_prompt_embeds come together.")
        if negative_prompt is not None and neg_given[0] is not None:
            raise ValueError("Give either negative_prompt or the negative embeddings, not both.")
        prompts, batch = prompt_batch(prompt, pooled_prompt_embeds, output_type, "(with the T5 and Llama states)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        per = per_prompt(num_images_per_prompt)
        do_cfg = guidance_scale > 1
        tc = self.transformer_config
        check_request(tc, self.vae_config, height, width, batch, self.mesh_spec, guidance_scale,
                      self.default_sample_size)
        height, width = run_size(height, width, vae_scale_factor(self.vae_config), self.default_sample_size)
        listify = lambda p: [p] if isinstance(p, str) else (list(p) if p is not None else None)  # noqa: E731
        timer = StageTimer()

        # 1. text: T5, Llama (all layers), pooled CLIPs; [negative; positive] with CFG
        with timer.stage("text_encoding"):
            if pooled_prompt_embeds is None:
                t5, llama, pooled = self.encode_prompt(prompts, listify(prompt_2), listify(prompt_3),
                                                       listify(prompt_4), max_sequence_length)
            else:
                t5, llama, pooled = (jnp.asarray(a, self.dtype) for a in given)
            if t5.ndim != 3 or llama.ndim != 4 or llama.shape[1] != t5.shape[0] or pooled.shape != (
                    t5.shape[0], tc.text_emb_dim) or t5.shape[-1] != tc.caption_channels[0] or \
                    llama.shape[-1] != tc.caption_channels[1]:
                raise ValueError(f"prompt embeddings T5 {tuple(t5.shape)}, Llama {tuple(llama.shape)}, pooled "
                                 f"{tuple(pooled.shape)}: this model takes (batch, tokens, {tc.caption_channels[0]}), "
                                 f"(layers, batch, tokens, {tc.caption_channels[1]}) and (batch, {tc.text_emb_dim}).")
            if do_cfg:
                if neg_given[0] is None:
                    neg = negative_prompts(negative_prompt, batch)
                    negs = [listify(n) for n in (negative_prompt_2, negative_prompt_3, negative_prompt_4)]
                    nt5, nllama, npooled = self.encode_prompt(neg, *negs, max_sequence_length=max_sequence_length)
                else:
                    nt5, nllama, npooled = (jnp.asarray(a, self.dtype) for a in neg_given)
                if nt5.shape != t5.shape or nllama.shape != llama.shape or npooled.shape != pooled.shape:
                    raise ValueError("the negative prompt's embeddings must have the shapes of the prompt's (diffusers "
                                     "concatenates them).")
                t5, llama, pooled = (jnp.concatenate([nt5, t5]), jnp.concatenate([nllama, llama], axis=1),
                                     jnp.concatenate([npooled, pooled]))
            texts = (self._put_batch(t5, do_cfg, per), self._put_batch(jnp.swapaxes(llama, 0, 1), do_cfg, per),
                     self._put_batch(pooled, do_cfg, per))
            jax.block_until_ready(texts)

        # 2. latents (diffusers' layout), the token layout (RoPE tables, key mask), schedule
        h, w = self.latent_grid(height, width)
        shape = self.latent_shape(batch * per, height, width)
        sched = self.schedule(num_inference_steps)
        rng = jax.random.key(seed)
        latents = self._initial_latents(latents, shape, rng, 1.0, "batch, in_channels, height/8, width/8")
        _, _, ids, mask = hidream.patch_layout(tc, h, w)
        rope = hidream.rope_tables(ids, tc.axes_dims_rope, tc.attention_head_dim)
        layout = jax.tree.map(self._put_replicated, (rope, mask))
        state = (unipc.init_state(shape, jnp.float32, self.scheduler_config.solver_order)
                 if self.scheduler is unipc else flow_match.init_state())

        # 3. denoise, decode
        sched_arrays = jax.tree.map(lambda a: self._put_replicated(jnp.asarray(a)), sched)
        scale = self._put_replicated(jnp.asarray(guidance_scale, jnp.float32))
        out = self._denoise_and_decode(timer, do_cfg, latents, state, (texts, sched_arrays, scale, layout, rng),
                                       len(sched.timesteps), progress, output_type, self._decode_fn(),
                                       kv=self._pipefusion_buffers(len(texts[0]), int(rope[0].shape[0])))
        return HiDreamImagePipelineOutput(images=out, timings=timer.times, peak_memory_bytes=peak_memory_bytes())
