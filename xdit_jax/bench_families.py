"""What the step benchmark needs to know about each model family, and nothing more.

A :class:`Family` describes, for :mod:`xdit_jax.bench`: the workload's latent shape and token
counts, its random inputs (numpy, batch first, in the order the jitted step takes them), the
arguments of the model's ``embed`` (the step then runs ``embed`` -> the blocks over the mesh ->
``head``, as the pipelines do), the analytic FLOPs of one forward, and the diffusers reference
(:class:`TorchReference`). Meshes, PipeFusion, variants, timing, memory, FLOP and collective
counting are shared (``xdit_jax.bench``). Seven families: CogVideoX (text-to-video, joint
attention over text + video tokens), PixArt-alpha / Sigma (text-to-image, self-attention over
the image tokens, masked cross-attention to the caption), HunyuanDiT (text-to-image,
self-attention over the image tokens, cross-attention to BERT + mT5 text, long skips),
Mochi 1 (text-to-video, two streams: the video tokens and a narrower T5 caption stream meet in
one joint attention, the caption's padding masked), FLUX.1 (text-to-image, two
block phases: double-stream blocks over the image with the T5 text whole, then single-stream
blocks over [text; image]; its forward over the mesh is a function, :meth:`Family.mesh_forward`;
one sample per prompt by default, :attr:`Family.default_cfg`), Stable Diffusion 3 / 3.5
(text-to-image, MMDiT: joint blocks over the image with the 77 CLIP + T5 text whole, no text mask), Wan 2.1
(text-to-video, self-attention over the video tokens, cross-attention to the zero-padded UMT5 caption, no mask), and
SANA (text-to-image, linear self-attention and GLUMBConv over the image tokens, masked cross-attention to Gemma 2
states). Every family runs every mesh axis, PipeFusion included, and its whole pipeline end
to end (:meth:`Family.pipeline_call`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

# A typical prompt's T5 tokens: the PixArt workloads' caption mask keeps this many of the
# max_sequence_length tokens of the conditional half (the unconditional half is diffusers' default
# negative prompt "": one token, the EOS).
PIXART_TEXT_VALID = 40


class Family:
    """One model family; subclasses fill in what differs."""

    name: str = ""
    module_name: str = ""  # the xdit_jax.models module: Config, model class, STACKED, build, params_from_torch
    model_class_name: str = ""
    config_class_name: str = ""
    token_word: str = ""  # what the latent tokens are: "video" / "image"
    title: str = ""  # the family's name in messages
    final_block: bool = False  # the stack ends with one more block after its scan (pipefusion.final_block)
    pipefusion_method: str = "blocks"  # the model's method PipeFusion runs (the stacked scans on a patch)
    pipefusion_refused: str | None = None  # why the family does not run with PipeFusion (None: it does)
    default_cfg: bool = True  # the step's batch: both CFG halves per prompt unless the workload says otherwise
    # inputs that are not arguments of the jitted step but host arrays read at trace time (FLUX's
    # position ids: the model turns them into RoPE tables with numpy, as the pipeline does before its step)
    host_inputs: tuple[str, ...] = ()

    def cfg_default(self, w) -> bool:
        """Whether the workload steps both CFG halves per prompt unless asked (:attr:`default_cfg`)."""
        return self.default_cfg

    def check_cfg(self, w) -> None:
        """Refuse a CFG choice the model cannot take (the workload's ``cfg`` as set)."""

    def _stacks(self, cfg) -> dict | None:
        """The model module's ``pipefusion_stacks(cfg)`` (several stacks, or runs that depend on the config)."""
        fn = getattr(self.module, "pipefusion_stacks", None)
        return fn(cfg) if fn is not None else None

    def stacked_layers(self, cfg):
        """The blocks in the stacked scan that PipeFusion splits into stages (a tuple, one per stack, for
        a model with several: :meth:`stacks`)."""
        st = self._stacks(cfg)
        return st["stacked_layers"] if st else cfg.num_layers - (1 if self.final_block else 0)

    @property
    def module(self):
        return importlib.import_module(self.module_name)

    @property
    def model_class(self):
        return getattr(self.module, self.model_class_name)

    @property
    def stacked(self):
        """The stacked blocks' Flax name, or the names of several stacks (the module's ``STACKS``)."""
        return getattr(self.module, "STACKS", self.module.STACKED)

    def stacks(self, cfg):
        """The stacks PipeFusion splits for the model of ``cfg`` (:attr:`stacked` unless the module says)."""
        st = self._stacks(cfg)
        return st["stacked"] if st else self.stacked

    def stack_attentions(self, cfg) -> dict:
        """``init_cache``'s ``attentions`` / ``tail_attentions`` where a block attends more than once."""
        st = self._stacks(cfg) or {}
        return {k: st[s] for k, s in (("attentions", "stack_attentions"), ("tail_attentions", "tail_attentions"))
                if s in st}

    def pipefusion_cache(self, cfg, mesh, layers, latent_shape, seq: int, dtype, patches: int, abstract: bool):
        """PipeFusion's cache where it is not :func:`xdit_jax.parallel.pipefusion.init_cache`'s K/V buffers (SANA:
        the token mixers' buffers, :func:`xdit_jax.parallel.pipefusion.init_mixing`), else None; ``layers``: the
        stacks' slots."""
        return None

    def text_keys(self, cfg) -> tuple[str, ...]:
        """The ``cond`` keys of a two-stream model's text (the module's ``TEXT_KEYS``): sliced with PipeFusion's
        patches, sharded over the sequence group."""
        return tuple(getattr(self.module, "TEXT_KEYS", ()))

    def config(self, transformer: dict):
        return getattr(self.module, self.config_class_name).from_dict(transformer)

    def params_from_torch(self, flat: dict, cfg, dtype=None) -> dict:
        return self.module.params_from_torch(flat, cfg, dtype=dtype)

    def build(self, cfg, params: dict, dtype):
        return self.module.build(cfg, params, dtype)

    def with_layers(self, transformer: dict, layers: int) -> dict:
        """The transformer config with ``layers`` blocks (``--layers``)."""
        return dict(transformer, num_layers=int(layers))

    def mesh_forward(self) -> Callable | None:
        """For a model whose forward over the mesh is not one ``embed`` -> ``run_blocks`` -> ``head``: a
        function ``(graphdef, state, embed_args, mesh, backend) -> prediction`` (traced; ``mesh`` None on
        one device) that the step calls instead. None (the default): the step runs the three itself."""
        return None

    # -- the workload ---------------------------------------------------------------------------
    def latent_shape(self, w) -> tuple[int, ...]:
        raise NotImplementedError

    def tokens(self, w) -> tuple[int, int]:
        """(latent tokens, text tokens) per sample."""
        raise NotImplementedError

    def text_len(self, w) -> int:
        raise NotImplementedError

    def kv_text_tokens(self, w) -> int:
        """The text tokens of a two-stream model's context (:meth:`text_keys`) that PipeFusion's K/V buffers slice with
        the patches: :meth:`text_len` unless the context joins more texts (HunyuanVideo-1.5, HunyuanImage: ByT5's)."""
        return self.text_len(w)

    def attention_tokens(self, w) -> int:
        """The tokens PipeFusion's K/V buffers hold: the sequence its patches split (a text every device
        holds whole joins each attention as a context, outside the buffers)."""
        raise NotImplementedError

    def check(self, cfg, shape: tuple[int, ...]) -> None:
        """Refuse a latent shape the model cannot take (the model's own check)."""
        raise NotImplementedError

    def row_fields(self, w, cfg) -> dict:
        """What a benchmark row says about the workload's shape (after ``latent_shape``)."""
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------
    def make_inputs(self, w, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of one step, numpy, batch first; the dict order is the step's argument order."""
        raise NotImplementedError

    def embed_args(self, inputs: dict, dtype) -> tuple:
        """(Traced.) The positional arguments of ``model.embed`` (and of ``model(...)``) for ``inputs``."""
        raise NotImplementedError

    def analytic_flops(self, w) -> dict[str, float]:
        raise NotImplementedError

    def torch_reference(self, transformer: dict, dtype: str, seed: int = 0, device: str | None = None):
        raise NotImplementedError

    # -- end to end -----------------------------------------------------------------------------
    def pipeline_call(self, w) -> dict:
        """The pipeline's keyword arguments that run the workload's shapes (``--e2e``): its size (frames),
        its text length, CFG unless the workload runs one sample per prompt (the pipeline's default scale); an
        image-to-video folder's first frame (a random image of the video's size)."""
        kw = {"height": w.height, "width": w.width}
        if self.token_word == "video":
            kw["num_frames"] = w.num_frames
        if not w.cfg:
            kw["guidance_scale"] = 1.0
        if w.text_tokens:
            kw["max_sequence_length"] = w.text_tokens
        if self.image_to_video(w):
            kw["image"] = np.random.default_rng(0).integers(0, 256, (w.height, w.width, 3), dtype=np.uint8)
        return kw

    @staticmethod
    def pipeline_class(w) -> str | None:
        """The pipeline the workload's folder holds (model_index.json's ``_class_name``), else a tiny preset's
        (the pipeline of ``xdit_jax.tiny``'s family ``defaults["tiny_family"]``), else None."""
        import json
        from pathlib import Path

        index = Path(w.folder) / "model_index.json" if w.folder else None
        if index is not None and index.exists():
            return json.loads(index.read_text()).get("_class_name")
        if w.defaults.get("tiny_family"):
            from xdit_jax import tiny

            return tiny.model_index(w.defaults["tiny_family"])["_class_name"]
        return None

    def prepare_pipeline(self, pipe, w) -> None:
        """Set on the built pipeline what its folder cannot say (``--e2e``); nothing by default."""

    def image_to_video(self, w) -> bool:
        """Whether the workload's folder holds an image-to-video pipeline (model_index.json's class name)."""
        return self.pipeline_class(w) in ("WanImageToVideoPipeline", "CogVideoXImageToVideoPipeline")


# ============================================================================================
# CogVideoX
# ============================================================================================

def cogvideox_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one CogVideoX transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S_v = (F/p_t)(h/p)(w/p) video tokens, S_t = text tokens,
    S = S_v + S_t, d = heads * head_dim, T = time_embed_dim, L = layers, D_txt = text_embed_dim,
    C_in = in_channels p^2 p_t, C_out = out_channels p^2 p_t. Per block:

        q, k, v, out projections   4 * 2 B S d^2        = 8 B S d^2
        attention QK^T and PV      2 * 2 B S^2 d        = 4 B S^2 d
        feed-forward d->4d->d      2 * 2 B S d (4d)     = 16 B S d^2
        two adaLN modulations      2 * 2 B T (6d)       = 24 B T d

    plus, once: patch embedding 2 B S_v C_in d, text projection 2 B S_t D_txt d, time embedding
    2 B (d T + T^2), output modulation 2 B T (2d), output projection 2 B S_v d C_out; CogVideoX1.5-I2V's ofs
    embedding (T -> T -> T on the one ``ofs`` value, as diffusers) 4 T^2. Element-wise work (norms, softmax, GELU,
    RoPE, 5B-I2V's learned positional table: an add) is left out: < 1% at these sizes.
    """
    b, f, c, h, w = latent_shape
    p = int(transformer.get("patch_size", 2))
    pt = int(transformer.get("patch_size_t") or 1)
    d = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
    tdim = int(transformer.get("time_embed_dim", 512))
    layers = int(transformer["num_layers"])
    dtxt = int(transformer.get("text_embed_dim", 4096))
    cout = int(transformer.get("out_channels") or c)
    sv = (f // pt) * (h // p) * (w // p)
    st = text_len
    s = sv + st
    proj = 8 * b * s * d * d
    attn = 4 * b * s * s * d
    ff = 16 * b * s * d * d
    mod = 24 * b * tdim * d
    embed = 2 * b * sv * (c * p * p * pt) * d + 2 * b * st * dtxt * d + 2 * b * (d * tdim + tdim * tdim)
    if transformer.get("ofs_embed_dim"):
        embed += 4 * tdim * tdim
    head = 2 * b * tdim * 2 * d + 2 * b * sv * d * (cout * p * p * pt)
    block = proj + attn + ff + mod
    return {"total": float(layers * block + embed + head), "per_block": float(block),
            "attention": float(layers * attn), "linear": float(layers * (proj + ff + mod) + embed + head),
            "tokens": s}


class TorchReference:
    """diffusers' transformer on the same config, weights and inputs (here: ``CogVideoXTransformer3DModel``;
    subclasses: other families). ``state_dict_np``: its random weights, for ``params_from_torch``."""

    def __init__(self, transformer_config: dict, dtype: str, seed: int = 0, device: str | None = None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(seed)
        cfg = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
        model = self._make_model(cfg).eval()
        self.state_dict_np = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if tdtype != torch.float32:
            model = model.to(dtype=tdtype)  # on the host first: the device never holds the fp32 copy
        self.model = model.to(self.device)
        self.dtype = tdtype

    diffusers_class = "CogVideoXTransformer3DModel"

    def _make_model(self, cfg: dict):
        """diffusers' ``diffusers_class`` from the config keys its constructor takes (the hub's configs carry
        more), weights drawn by its own init (seeded)."""
        import inspect

        import diffusers

        cls = getattr(diffusers, self.diffusers_class)
        takes = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in cfg.items() if k in takes})

    def _put(self, inputs: dict, key: str, dtype=None):
        """``inputs[key]`` as a torch tensor on the reference's device (in ``dtype``)."""
        return self.torch.from_numpy(np.ascontiguousarray(inputs[key])).to(self.device, dtype)

    def set_inputs(self, inputs: dict, w):
        self.x, self.enc = self._put(inputs, "latents", self.dtype), self._put(inputs, "embeds", self.dtype)
        self.t = self._put(inputs, "t")
        self.rope = None
        if self.model.config.use_rotary_positional_embeddings:
            import types

            from diffusers import CogVideoXPipeline

            fake = types.SimpleNamespace(transformer=self.model, vae_scale_factor_spatial=w.vae_scale_spatial)
            _, f, _, h, ww = inputs["latents"].shape
            self.rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                fake, h * w.vae_scale_spatial, ww * w.vae_scale_spatial, f, self.device)

    def _forward(self):
        ofs = None
        if getattr(self.model.config, "ofs_embed_dim", None):  # CogVideoX1.5-I2V: its pipeline's constant
            ofs = self.torch.full((1,), 2.0, device=self.device)
        return self.model(hidden_states=self.x, encoder_hidden_states=self.enc, timestep=self.t,
                          image_rotary_emb=self.rope, ofs=ofs, return_dict=False)[0]

    def __call__(self):
        with self.torch.inference_mode():
            out = self._forward()
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return out

    def to_numpy(self, out) -> np.ndarray:
        return out.float().cpu().numpy()


class Arg(NamedTuple):
    """One tensor argument of a reference model's call: ``inputs[key]`` on the reference's device, in ``dtype``
    (``"model"``: the reference's compute dtype; a torch dtype's name; None: as given); ``optional``: None where
    the inputs lack it."""

    key: str
    dtype: str | None = None
    optional: bool = False


LATENTS, EMBEDS = Arg("latents", "model"), Arg("embeds", "model")  # (the usual first two)


class KeywordTorchReference(TorchReference):
    """A reference whose model takes keyword tensors straight from the inputs, declared in ``call_args`` (the
    model's argument name -> :class:`Arg`); one call on the whole batch."""

    call_args: dict[str, Arg] = {}

    def set_inputs(self, inputs, w):
        def tensor(a: Arg):
            dtype = self.dtype if a.dtype == "model" else None if a.dtype is None else getattr(self.torch, a.dtype)
            return None if a.optional and a.key not in inputs else self._put(inputs, a.key, dtype)

        self.kwargs = {name: tensor(a) for name, a in self.call_args.items()}

    def _forward(self):
        return self.model(**self.kwargs, return_dict=False)[0]


class CogVideoX(Family):
    name = "cogvideox"
    module_name = "xdit_jax.models.cogvideox"
    model_class_name = "CogVideoXTransformer3DModel"
    config_class_name = "CogVideoXConfig"
    token_word = "video"
    title = "CogVideoX"

    def latent_shape(self, w):
        """(B, F, C, h, w) in diffusers' layout; 1.5 pads latent frames to a multiple of patch_size_t."""
        t = w.transformer
        f = (w.num_frames - 1) // w.vae_scale_temporal + 1
        pt = t.get("patch_size_t")
        if pt and f % pt:
            f += pt - f % pt
        return (w.step_batch, f, int(t.get("in_channels", 16)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, f, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        pt = w.transformer.get("patch_size_t") or 1
        return (f // pt) * (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        return int(w.transformer.get("max_text_seq_length", 226))

    def attention_tokens(self, w):
        return sum(self.tokens(w))  # joint attention over text + video

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[1], shape[3], shape[4])

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"video_tokens": sv, "text_tokens": st, "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width, "num_frames": w.num_frames}

    def make_inputs(self, w, seed=0):
        """Latents (B, F, C, h, w), text embeddings (B, L, D_txt) and timesteps (B,), float32 / int64."""
        rng = np.random.default_rng(seed)
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((w.step_batch, self.text_len(w), int(w.transformer.get("text_embed_dim", 4096))),
                                     dtype=np.float32)
        steps = np.full((w.step_batch,), 500, dtype=np.int64)
        out = {"latents": latents, "embeds": embeds, "t": steps}
        if w.transformer.get("ofs_embed_dim"):  # CogVideoX1.5-I2V: CogVideoXImageToVideoPipeline's ofs
            out["ofs"] = np.float32(2.0)
        return out

    def embed_args(self, inputs, dtype):
        return inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs.get("ofs")

    def analytic_flops(self, w):
        return cogvideox_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return TorchReference(transformer, dtype, seed=seed, device=device)


class ConsisID(CogVideoX):
    """CogVideoX-5B-I2V's step plus the face branch: random face inputs (``id_cond`` (B, id_dim), ``id_vit_hidden``
    (B, scales, 577, vit_dim), batch first), the extractor inside the step as diffusers runs it (the pipeline runs it
    once per call). PipeFusion runs the model's pipefusion_blocks, as the pipeline does."""

    name = "consisid"
    module_name = "xdit_jax.models.consisid"
    model_class_name = "ConsisIDTransformer3DModel"
    config_class_name = "ConsisIDConfig"
    title = "ConsisID"
    pipefusion_method = "pipefusion_blocks"  # the next block's index rides in the carry (the face cross-attentions)

    def make_inputs(self, w, seed=0):
        out = super().make_inputs(w, seed)
        t = w.transformer
        if t.get("is_train_face"):
            rng = np.random.default_rng(seed + 1)
            out["id_cond"] = rng.standard_normal((w.step_batch, int(t.get("LFE_id_dim", 1280))), dtype=np.float32)
            out["id_vit_hidden"] = rng.standard_normal(
                (w.step_batch, int(t.get("LFE_num_scale", 5)), CONSISID_VIT_TOKENS, int(t.get("LFE_vit_dim", 1024))),
                dtype=np.float32)
        return out

    def embed_args(self, inputs, dtype):
        args = super().embed_args(inputs, dtype)
        if "id_cond" not in inputs:
            return args
        vit = inputs["id_vit_hidden"]
        return args + (inputs["id_cond"], [vit[:, k] for k in range(vit.shape[1])])

    def analytic_flops(self, w):
        base = super().analytic_flops(w)
        if not w.transformer.get("is_train_face"):
            return base
        face = consisid_face_flops(w.transformer, w.step_batch, base["tokens"])
        return dict(base, total=base["total"] + face["total"], attention=base["attention"] + face["attention"],
                    linear=base["linear"] + face["linear"])

    def pipeline_call(self, w) -> dict:
        """The pipeline's call: CogVideoX image-to-video's (a random first frame) and random face embeddings."""
        kw = super().pipeline_call(w)
        t, rng = w.transformer, np.random.default_rng(1)
        kw["image"] = rng.integers(0, 256, (w.height, w.width, 3), dtype=np.uint8)
        if t.get("is_train_face"):
            kw["id_cond"] = rng.standard_normal((1, int(t.get("LFE_id_dim", 1280))), dtype=np.float32)
            kw["id_vit_hidden"] = rng.standard_normal(
                (int(t.get("LFE_num_scale", 5)), 1, CONSISID_VIT_TOKENS, int(t.get("LFE_vit_dim", 1024))),
                dtype=np.float32)
        return kw

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return ConsisIDTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# ConsisID (CogVideoX-5B-I2V + the face branch)
# ============================================================================================

CONSISID_VIT_TOKENS = 577  # the face ViT's states per scale (EVA-CLIP-L-14-336: 24 x 24 patches + CLS)


def consisid_face_flops(transformer: dict, batch: int, tokens: int, vit_tokens: int = CONSISID_VIT_TOKENS) -> dict:
    """Matmul FLOPs of ConsisID's face branch in one forward (2 FLOPs per multiply-add), as diffusers runs it (the
    extractor every step). B = batch, V = LFE_vit_dim, Q = LFE_num_querie, n = LFE_num_id_token, N = ``vit_tokens``,
    q = Q + n (the extractor's latents), c = n + N (its context), i = LFE heads x dim_head, s scales, D layers:

        id mapping (id_dim -> V -> V -> nV)          2 B (id_dim V + V^2 + V nV)
        scale mappings (3 Linear V -> V on N)        s * 6 B N V^2
        per layer: q, [c; q] -> kv, out              2 B (q V i + (c + q) V 2i + q i V)
                   QK^T and PV                       4 B q (c + q) i
                   feed-forward V -> mV -> V         4 B q V (mV)
        output projection                            2 B Q V out

    and the L / k face cross-attentions, over all S = ``tokens`` joint tokens as xdit_jax runs them (the text rows'
    results are dropped; diffusers runs only the video rows: 1.3% fewer at ConsisID's 226 + 17550), each
    2 B (S d j + Q out 2j + S j d) + 4 B S Q j (j = cross heads x dim_head, d the model width)."""
    t = transformer
    b, s_tok = int(batch), int(tokens)
    v, q_n, n_id = int(t.get("LFE_vit_dim", 1024)), int(t.get("LFE_num_querie", 32)), int(t.get("LFE_num_id_token", 5))
    out, idd = int(t.get("LFE_output_dim", 2048)), int(t.get("LFE_id_dim", 1280))
    i_l = int(t.get("LFE_num_heads", 16)) * int(t.get("LFE_dim_head", 64))
    depth, scales, mult = int(t.get("LFE_depth", 10)), int(t.get("LFE_num_scale", 5)), int(t.get("LFE_ff_mult", 4))
    q, c = q_n + n_id, n_id + int(vit_tokens)
    lfe = 2 * b * (idd * v + v * v + v * n_id * v) + scales * 6 * b * int(vit_tokens) * v * v
    lfe += depth * (2 * b * (q * v * i_l + (c + q) * v * 2 * i_l + q * i_l * v) + 4 * b * q * (c + q) * i_l
                    + 4 * b * q * v * mult * v)
    lfe += 2 * b * q_n * v * out
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    j = int(t.get("cross_attn_num_heads", 16)) * int(t.get("cross_attn_dim_head", 128))
    ca_attn = 4 * b * s_tok * q_n * j
    ca_lin = 2 * b * (s_tok * d * j + q_n * out * 2 * j + s_tok * j * d)
    n_ca = int(t["num_layers"]) // int(t.get("cross_attn_interval", 2))
    return {"total": float(lfe + n_ca * (ca_attn + ca_lin)), "attention": float(n_ca * ca_attn),
            "linear": float(lfe + n_ca * ca_lin)}


class ConsisIDTorchReference(TorchReference):
    """diffusers' ``ConsisIDTransformer3DModel`` with the face inputs (the extractor run in the forward, as there)."""

    diffusers_class = "ConsisIDTransformer3DModel"

    def set_inputs(self, inputs: dict, w):
        import types

        from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline  # (the package's name needs cv2)

        self.x, self.enc = self._put(inputs, "latents", self.dtype), self._put(inputs, "embeds", self.dtype)
        self.t = self._put(inputs, "t")
        fake = types.SimpleNamespace(transformer=self.model, vae_scale_factor_spatial=w.vae_scale_spatial)
        _, f, _, h, ww = inputs["latents"].shape
        self.rope = ConsisIDPipeline._prepare_rotary_positional_embeddings(
            fake, h * w.vae_scale_spatial, ww * w.vae_scale_spatial, f, self.device) \
            if self.model.config.use_rotary_positional_embeddings else None
        self.face = {}
        if "id_cond" in inputs:
            vit = self._put(inputs, "id_vit_hidden", self.dtype)
            self.face = {"id_cond": self._put(inputs, "id_cond", self.dtype),
                         "id_vit_hidden": [vit[:, k] for k in range(vit.shape[1])]}

    def _forward(self):
        return self.model(hidden_states=self.x, encoder_hidden_states=self.enc, timestep=self.t,
                          image_rotary_emb=self.rope, return_dict=False, **self.face)[0]


# ============================================================================================
# PixArt-alpha / PixArt-Sigma
# ============================================================================================

PIXART_TIME_PROJ = 256  # the sinusoidal timestep (and size) projection width


def pixart_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one PixArt transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = (h/p)(w/p) image tokens, L = caption tokens (all of them: the
    mask changes which keys count, not the work), d = heads * head_dim, d_c = cross_attention_dim,
    C_cap = caption_channels, layers N. Per block:

        self-attention q, k, v, out      8 B S d^2
        self-attention QK^T and PV       4 B S^2 d
        cross-attention q, out           4 B S d^2
        cross-attention k, v (caption)   4 B L d_c d
        cross-attention QK^T and PV      4 B S L d
        feed-forward d->4d->d            16 B S d^2

    plus, once: patch embedding 2 B S (C_in p^2) d; timestep embedding 2 B (256 d + d^2) and the
    block modulation (adaln_single) 2 B d (6d); with PixArt-alpha's micro-conditions, the size
    embeddings (2 resolution values + 1 aspect ratio per sample, each 256 -> d/3 -> d/3)
    6 B (256 d/3 + (d/3)^2); the caption projection 2 B L (C_cap d + d^2); the output projection
    2 B S d (p^2 C_out). The modulations themselves (adds and multiplies) are element-wise.
    """
    b, c, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    dc = int(t.get("cross_attention_dim") or d)
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    cap = t.get("caption_channels")
    s = (h // p) * (w // p)
    txt = text_len
    self_proj, self_attn = 8 * b * s * d * d, 4 * b * s * s * d
    cross_proj, cross_attn = 4 * b * s * d * d + 4 * b * txt * dc * d, 4 * b * s * txt * d
    ff = 16 * b * s * d * d
    tp = PIXART_TIME_PROJ
    embed = 2 * b * s * (c * p * p) * d + 2 * b * (tp * d + d * d) + 2 * b * d * 6 * d
    if pixart_additional_conditions(t):
        d3 = d // 3
        embed += 6 * b * (tp * d3 + d3 * d3)
    if cap is not None:
        embed += 2 * b * txt * (int(cap) * d + d * d)
    head = 2 * b * s * d * (p * p * cout)
    block = self_proj + self_attn + cross_proj + cross_attn + ff
    attention = self_attn + cross_attn
    return {"total": float(layers * block + embed + head), "per_block": float(block),
            "attention": float(layers * attention),
            "linear": float(layers * (block - attention) + embed + head), "tokens": s}


def pixart_additional_conditions(transformer: dict) -> bool:
    """diffusers' rule: ``use_additional_conditions`` None means ``sample_size == 128`` (alpha 1024px)."""
    u = transformer.get("use_additional_conditions")
    return int(transformer.get("sample_size", 128)) == 128 if u is None else bool(u)


def pixart_mask(step_batch: int, text_len: int, valid: int, cfg: bool) -> np.ndarray:
    """(B, L) int32 caption mask as the pipeline builds it: with CFG the first half is the negative
    prompt "" (1 token, its EOS), the second half the prompt (``valid`` tokens); without, the prompt."""
    mask = np.zeros((step_batch, text_len), np.int32)
    mask[:, :max(1, min(valid, text_len))] = 1
    if cfg:
        mask[: step_batch // 2] = 0
        mask[: step_batch // 2, 0] = 1
    return mask


class PixArtTorchReference(TorchReference):
    """diffusers' ``PixArtTransformer2DModel`` (from the config keys it takes: the hub's
    ``Transformer2DModel`` configs carry more), called as ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``
    call it (the caption mask; ``added_cond_kwargs`` with None values where the model has no
    micro-conditions)."""

    diffusers_class = "PixArtTransformer2DModel"

    def set_inputs(self, inputs, w):
        self.x, self.enc = self._put(inputs, "latents", self.dtype), self._put(inputs, "embeds", self.dtype)
        self.t, self.mask = self._put(inputs, "t"), self._put(inputs, "mask")
        self.added = {k: (self._put(inputs, k, self.dtype) if k in inputs else None)
                      for k in ("resolution", "aspect_ratio")}

    def _forward(self):
        return self.model(self.x, encoder_hidden_states=self.enc, timestep=self.t, added_cond_kwargs=self.added,
                          encoder_attention_mask=self.mask, return_dict=False)[0]


class PixArt(Family):
    name = "pixart"
    module_name = "xdit_jax.models.pixart"
    model_class_name = "PixArtTransformer2DModel"
    config_class_name = "PixArtConfig"
    token_word = "image"
    title = "PixArt"

    def pipeline_call(self, w):
        return dict(super().pipeline_call(w), use_resolution_binning=False)  # the workload's size, not a bin

    def latent_shape(self, w):
        """(B, C, h, w) in diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 4)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        return int(w.text_tokens or w.defaults.get("max_sequence_length", 120))

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or PIXART_TEXT_VALID), self.text_len(w))

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # self-attention over the image tokens; the caption is cross-attended

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[2], shape[3])

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "height": w.height, "width": w.width, "additional_conditions": cfg.additional_conditions}

    def make_inputs(self, w, seed=0):
        """Latents (B, C, h, w), caption embeddings (B, L, caption_channels), timesteps (B,), the caption
        mask (B, L) and, for PixArt-alpha's micro-conditions, resolution (B, 2) [height, width] in pixels
        and aspect ratio (B, 1) height / width, as the pipeline passes them."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        width = int(t.get("caption_channels") or t.get("cross_attention_dim")
                    or int(t["num_attention_heads"]) * int(t["attention_head_dim"]))
        embeds = rng.standard_normal((b, txt, width), dtype=np.float32)
        inputs = {"latents": latents, "embeds": embeds, "t": np.full((b,), 500, dtype=np.int64),
                  "mask": pixart_mask(b, txt, self.text_valid(w), w.cfg)}
        if pixart_additional_conditions(t):
            inputs["resolution"] = np.tile(np.array([[w.height, w.width]], np.float32), (b, 1))
            inputs["aspect_ratio"] = np.full((b, 1), w.height / w.width, np.float32)
        return inputs

    def embed_args(self, inputs, dtype):
        added = ({"resolution": inputs["resolution"], "aspect_ratio": inputs["aspect_ratio"]}
                 if "resolution" in inputs else None)
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], added,
                inputs["mask"])

    def analytic_flops(self, w):
        return pixart_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return PixArtTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# CogView3-Plus
# ============================================================================================

COGVIEW3_SIZES = ("original_size", "target_size", "crop_coords")  # the size conditions, diffusers' argument order


def cogview3_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one CogView3-Plus transformer forward: CogVideoX's (its blocks, one frame, patch_size_t 1:
    the 12-way modulation linear is CogVideoX's two 6-way ones) plus the size conditions' embedder, 2 B (6 c T + T^2)
    (c = condition_dim, T = time_embed_dim)."""
    b, c, h, w = latent_shape
    out = cogvideox_analytic_flops(dict(transformer, patch_size_t=None), (b, 1, c, h, w), text_len)
    tdim = int(transformer.get("time_embed_dim", 512))
    extra = 2 * b * (6 * int(transformer.get("condition_dim", 256)) * tdim + tdim * tdim)
    return dict(out, total=out["total"] + extra, linear=out["linear"] + extra)


class CogView3TorchReference(KeywordTorchReference):
    """diffusers' ``CogView3PlusTransformer2DModel`` as ``CogView3PlusPipeline`` calls it (the size conditions in the
    text states' dtype, as the pipeline makes them)."""

    diffusers_class = "CogView3PlusTransformer2DModel"
    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t"),
                 **{name: Arg(name, "model") for name in COGVIEW3_SIZES}}


class CogView3(PixArt):
    """PixArt's image latents (B, C, h, w), CogVideoX's joint [text; image] attention (PipeFusion's buffers hold
    both), the size conditions at the image's size."""

    name = "cogview3"
    module_name = "xdit_jax.models.cogview3plus"
    model_class_name = "CogView3PlusTransformer2DModel"
    config_class_name = "CogView3PlusConfig"
    title = "CogView3-Plus"

    def pipeline_call(self, w):
        return Family.pipeline_call(self, w)  # (no resolution binning)

    def text_len(self, w):
        return int(w.text_tokens or w.defaults.get("max_sequence_length", 224))

    def attention_tokens(self, w):
        return sum(self.tokens(w))  # joint attention over text + image

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "height": w.height,
                "width": w.width}

    def make_inputs(self, w, seed=0):
        """Latents (B, C, h, w), T5 states (B, L, text_embed_dim), timesteps (B,) and the size conditions (B, 2) each
        (the image's size twice, crop (0, 0)), as the pipeline passes them."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        embeds = rng.standard_normal((b, self.text_len(w), int(w.transformer.get("text_embed_dim", 4096))),
                                     dtype=np.float32)
        size = np.tile(np.array([[w.height, w.width]], np.float32), (b, 1))
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32), "embeds": embeds,
                "t": np.full((b,), 500, dtype=np.int64), "original_size": size, "target_size": size.copy(),
                "crop_coords": np.zeros((b, 2), np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"],
                *(inputs[name] for name in COGVIEW3_SIZES))

    def analytic_flops(self, w):
        return cogview3_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return CogView3TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# HunyuanDiT
# ============================================================================================

# A typical prompt's real tokens in the two text masks (BERT, mT5), both counting their special
# tokens; the unconditional half is diffusers' default negative prompt "": BERT [CLS] [SEP] (2
# tokens), mT5 its EOS (1 token).
HUNYUAN_TEXT_VALID = (40, 40)
HUNYUAN_NEGATIVE_VALID = (2, 1)
HUNYUAN_TIME_PROJ = 256  # the sinusoidal timestep (and image-meta size) projection width
HUNYUAN_POOLER_HEADS = 8


def hunyuandit_ff_inner_dim(transformer: dict) -> int:
    """diffusers' ``int(inner_dim * mlp_ratio)`` (mlp_ratio 4.3637 in the releases: 6144 at d = 1408)."""
    d = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
    return int(d * float(transformer.get("mlp_ratio", 4.0)))


def hunyuandit_analytic_flops(transformer: dict, latent_shape: tuple[int, ...]) -> dict[str, float]:
    """Matmul FLOPs of one HunyuanDiT transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = (h/p)(w/p) image tokens, d = heads * head_dim (= hidden_size),
    L1 = text_len (BERT, 77), L2 = text_len_t5 (mT5, 256), L = L1 + L2 (all of them: masked positions
    are replaced by a learned row, not dropped), d_c = cross_attention_dim, d_5 = cross_attention_dim_t5,
    F = int(d * mlp_ratio), P = pooled_projection_dim, N = layers, of which N/2 - 1 have a skip. Per block:

        shift of norm1 (from the conditioning vector)   2 B d^2
        self-attention q, k, v, out                      8 B S d^2
        self-attention QK^T and PV                       4 B S^2 d
        cross-attention q, out                           4 B S d^2
        cross-attention k, v (the text)                  4 B L d_c d
        cross-attention QK^T and PV                      4 B S L d
        feed-forward d->F->d                             4 B S d F
        skip layers only: skip_linear 2d -> d            4 B S d^2

    plus, once: patch embedding 2 B S (C_in p^2) d; the mT5 text projection d_5 -> 4 d_5 -> d_c
    2 B L2 (4 d_5^2 + 4 d_5 d_c); the timestep embedding 2 B (256 d + d^2); the text pooler (one
    query over the L2 + 1 tokens [mean; mT5]: q 2 B d_5^2, k and v 4 B (L2+1) d_5^2, QK^T and PV
    4 B (L2+1) d_5, out 2 B d_5 P); the extra embedder E -> 4d -> d with E = P (+ 6 * 256 + d with the
    v1.0/1.1 image-meta sizes and style) 2 B (4 E d + 4 d^2); the output modulation 2 B d (2d) and
    projection 2 B S d (p^2 C_out). Norms, RoPE, softmax, GELU, the embedding lookup: element-wise.
    """
    b, c, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    dc = int(t.get("cross_attention_dim", 1024))
    d5 = int(t.get("cross_attention_dim_t5", 2048))
    pooled = int(t.get("pooled_projection_dim", 1024))
    l1, l2 = int(t.get("text_len", 77)), int(t.get("text_len_t5", 256))
    txt = l1 + l2
    layers = int(t["num_layers"])
    skips = layers // 2 - 1
    ff_dim = hunyuandit_ff_inner_dim(t)
    cout = c * 2 if t.get("learn_sigma", True) else c
    s = (h // p) * (w // p)
    self_proj, self_attn = 8 * b * s * d * d, 4 * b * s * s * d
    cross_proj, cross_attn = 4 * b * s * d * d + 4 * b * txt * dc * d, 4 * b * s * txt * d
    ff = 4 * b * s * d * ff_dim
    shift = 2 * b * d * d
    skip = 4 * b * s * d * d
    tp = HUNYUAN_TIME_PROJ
    extra_in = pooled + ((6 * tp + d) if t.get("use_style_cond_and_image_meta_size", True) else 0)
    pool = 2 * b * d5 * d5 + 4 * b * (l2 + 1) * d5 * d5 + 4 * b * (l2 + 1) * d5 + 2 * b * d5 * pooled
    embed = (2 * b * s * (c * p * p) * d + 2 * b * l2 * (4 * d5 * d5 + 4 * d5 * dc) + 2 * b * (tp * d + d * d)
             + pool + 2 * b * (4 * extra_in * d + 4 * d * d))
    head = 2 * b * d * 2 * d + 2 * b * s * d * (p * p * cout)
    block = shift + self_proj + self_attn + cross_proj + cross_attn + ff
    attention = self_attn + cross_attn
    total = layers * block + skips * skip + embed + head
    attention_total = layers * attention + 4 * b * (l2 + 1) * d5  # + the pooler's
    return {"total": float(total), "per_block": float(block), "attention": float(attention_total),
            "linear": float(total - attention_total), "tokens": s}


def hunyuandit_masks(step_batch: int, text_lens: tuple[int, int], valid: tuple[int, int], cfg: bool,
                     negative: tuple[int, int] = HUNYUAN_NEGATIVE_VALID) -> tuple[np.ndarray, np.ndarray]:
    """(BERT mask, mT5 mask), (B, L1) and (B, L2) int32, as the pipeline builds them: with CFG the first
    half is the negative prompt "" (``negative`` real tokens), the second the prompt (``valid``)."""
    out = []
    for length, keep, neg in zip(text_lens, valid, negative):
        mask = np.zeros((step_batch, length), np.int32)
        mask[:, :max(1, min(keep, length))] = 1
        if cfg:
            mask[: step_batch // 2] = 0
            mask[: step_batch // 2, :max(1, min(neg, length))] = 1
        out.append(mask)
    return out[0], out[1]


def hunyuandit_rope(head_dim: int, grid_h: int, grid_w: int, patch_size: int):
    """The pipeline's ``image_rotary_emb`` (torch): diffusers' ``get_2d_rotary_pos_embed`` over the crop
    region of the grid in a ``512 // 8 // patch_size`` base grid."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    base = 512 // 8 // patch_size
    return get_2d_rotary_pos_embed(head_dim, get_resize_crop_region_for_grid((grid_h, grid_w), base),
                                   (grid_h, grid_w), output_type="pt")


class HunyuanDiTTorchReference(TorchReference):
    """diffusers' ``HunyuanDiT2DModel`` (from the config keys it takes), called as ``HunyuanDiTPipeline``
    calls it: both text states and masks, the timestep in the model's dtype, ``image_rotary_emb`` for
    the latent grid and, for v1.0/1.1, ``image_meta_size`` and ``style``."""

    diffusers_class = "HunyuanDiT2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x = put("latents", self.dtype)
        self.t = put("t", self.dtype)  # diffusers: t_expand in the latents' dtype
        self.enc, self.mask = put("embeds", self.dtype), put("mask")
        self.enc_t5, self.mask_t5 = put("embeds_t5", self.dtype), put("mask_t5")
        self.meta = put("image_meta_size", self.dtype) if "image_meta_size" in inputs else None
        self.style = put("style") if "style" in inputs else None
        cfg = self.model.config
        _, _, h, ww = inputs["latents"].shape
        p = int(cfg.patch_size)
        cos, sin = hunyuandit_rope(int(cfg.attention_head_dim), h // p, ww // p, p)
        self.rope = (cos.to(self.device), sin.to(self.device))

    def _forward(self):
        return self.model(self.x, self.t, encoder_hidden_states=self.enc, text_embedding_mask=self.mask,
                          encoder_hidden_states_t5=self.enc_t5, text_embedding_mask_t5=self.mask_t5,
                          image_meta_size=self.meta, style=self.style, image_rotary_emb=self.rope,
                          return_dict=False)[0]


class HunyuanDiT(Family):
    name = "hunyuandit"
    module_name = "xdit_jax.models.hunyuandit"
    model_class_name = "HunyuanDiT2DModel"
    config_class_name = "HunyuanDiTConfig"
    token_word = "image"
    title = "HunyuanDiT"
    pipefusion_method = "pipefusion_blocks"  # the long skips ride in the carry (a register) across the stages

    def pipeline_call(self, w):
        return dict(super().pipeline_call(w), use_resolution_binning=False)  # the workload's size, not a bin

    def latent_shape(self, w):
        """(B, C, h, w) in diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 4)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def text_lens(self, w) -> tuple[int, int]:
        """(BERT, mT5) tokens: the config's text_len, text_len_t5 (the pipeline pads to them)."""
        return int(w.transformer.get("text_len", 77)), int(w.transformer.get("text_len_t5", 256))

    def text_len(self, w):
        return sum(self.text_lens(w))

    def text_valid(self, w) -> tuple[int, int]:
        """Real tokens in the prompt's (BERT, mT5) masks: ``w.text_valid`` for both, else HUNYUAN_TEXT_VALID."""
        valid = (int(w.text_valid),) * 2 if w.text_valid else HUNYUAN_TEXT_VALID
        return tuple(min(v, n) for v, n in zip(valid, self.text_lens(w)))

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p), self.text_len(w)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # self-attention over the image tokens; the text is cross-attended

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[2], shape[3])

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        (l1, l2), (v1, v2) = self.text_lens(w), self.text_valid(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "bert_tokens": l1, "t5_tokens": l2,
                "bert_valid_tokens": v1, "t5_valid_tokens": v2, "layers": cfg.num_layers,
                "skip_layers": cfg.n_down, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "ff_inner_dim": cfg.ff_inner_dim, "height": w.height, "width": w.width,
                "style_and_image_meta": cfg.use_style_cond_and_image_meta_size}

    def make_inputs(self, w, seed=0):
        """As ``HunyuanDiTPipeline`` passes them: latents (B, C, h, w), timesteps (B,) float, BERT states
        (B, L1, cross_attention_dim) and mask (B, L1), mT5 states (B, L2, cross_attention_dim_t5) and mask
        (B, L2) and, for v1.0/1.1 (use_style_cond_and_image_meta_size), image_meta_size (B, 6) [original
        h, w (1024, 1024), target h, w, crop top, left (0, 0)] in pixels and style (B,) = 0."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        (l1, l2) = self.text_lens(w)
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        bert = rng.standard_normal((b, l1, int(t.get("cross_attention_dim", 1024))), dtype=np.float32)
        mt5 = rng.standard_normal((b, l2, int(t.get("cross_attention_dim_t5", 2048))), dtype=np.float32)
        mask, mask_t5 = hunyuandit_masks(b, (l1, l2), self.text_valid(w), w.cfg)
        inputs = {"latents": latents, "t": np.full((b,), 500.0, dtype=np.float32), "embeds": bert, "mask": mask,
                  "embeds_t5": mt5, "mask_t5": mask_t5}
        if t.get("use_style_cond_and_image_meta_size", True):
            inputs["image_meta_size"] = np.tile(np.array([[1024, 1024, w.height, w.width, 0, 0]], np.float32),
                                                (b, 1))
            inputs["style"] = np.zeros((b,), np.int64)
        return inputs

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), inputs["mask"],
                inputs["embeds_t5"].astype(dtype), inputs["mask_t5"], inputs.get("image_meta_size"),
                inputs.get("style"))

    def analytic_flops(self, w):
        return hunyuandit_analytic_flops(w.transformer, self.latent_shape(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return HunyuanDiTTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Mochi 1
# ============================================================================================

# A typical prompt's T5 tokens in the conditional half's caption mask (as PixArt's: the same T5
# tokenizer); the unconditional half is diffusers' default negative prompt "": 1 token, the EOS
# (``force_zeros_for_empty_prompt`` is false in genmo/mochi-1-preview's model_index.json).
MOCHI_TEXT_VALID = PIXART_TEXT_VALID
MOCHI_POOLER_HEADS = 8  # MochiAttentionPool over the T5 states


def mochi_ff_inner_dim(dim: int) -> int:
    """The SwiGLU feed-forward's inner width in diffusers' Mochi blocks: ``(4 * dim * 2) // 3`` (8192 at 3072)."""
    return (4 * dim * 2) // 3


def mochi_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                         text_valid) -> dict[str, float]:
    """Matmul FLOPs of one Mochi transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = (F)(h/p)(w/p) video tokens, L = caption tokens (``text_len``, 256),
    V_b = the real tokens of sample b's caption mask (``text_valid``: one count per sample, or one for
    all), d = heads * head_dim (3072), d_c = pooled_projection_dim (the caption stream, 1536),
    D = text_embed_dim (T5, 4096), T = time_embed_dim, F = (4d * 2) // 3 and F_c = (4 d_c * 2) // 3 (the
    SwiGLU inner widths; the first projection is 2F wide: value and gate), N = layers. Per block
    (the first N - 1):

        modulation of both streams: norm1 d -> 4d, norm1_context d -> 4 d_c   8 B d^2 + 8 B d d_c
        video q, k, v, out                                                    8 B S d^2
        caption q, k, v (d_c -> d) and to_add_out (d -> d_c)                  8 B L d_c d
        joint attention QK^T and PV over [video; valid caption]              4 d sum_b (S + V_b)^2
        video feed-forward d -> 2F, F -> d                                    6 B S d F
        caption feed-forward d_c -> 2 F_c, F_c -> d_c                         6 B L d_c F_c

    The last block (``context_pre_only``) has no caption output and no caption MLP: norm1 8 B d^2,
    norm1_context (one d -> d_c scale) 2 B d d_c, video q, k, v, out 8 B S d^2, caption k, v
    4 B L d_c d, attention of the video rows only 4 d sum_b S (S + V_b), video feed-forward 6 B S d F.
    (diffusers still computes the last block's caption queries and attention rows and drops them;
    we count the work the output needs, which is what ours does.)

    The joint attention counts the caption's valid tokens only: diffusers attends each sample over
    [video; its real caption tokens] (the padding is cut out, not masked), so that is the model's work.
    Ours holds the whole padded caption and masks its keys (one program for any mask); the extra it
    computes, ``attention_padding`` below, is 4 d sum_b ((S + L)^2 - (S + V_b)^2) over the first N - 1
    blocks plus 4 d sum_b S (L - V_b) in the last, and the compiled program's dot count is
    ``total + attention_padding``. At full size it is ~1% (44,520 video tokens); at small shapes it is
    not. The caption stream's linears run over all L tokens on both sides (the mask acts in the
    attention only) and are counted so.

    Plus, once: patch embedding 2 B S (C p^2) d; the timestep embedding 2 B (T d + d^2); the caption
    pooler (one query, the masked mean, over L + 1 tokens [mean; T5], 8 heads: to_kv 4 B (L+1) D^2,
    to_q 2 B D^2, QK^T and PV over all L + 1 keys 4 B (L+1) D, to_out 2 B D d); caption_proj
    2 B L D d_c; the RoPE angles (positions (S, 3) x learned frequencies (3, H, head_dim / 2), one
    table for the batch) 3 S d; the output modulation 2 B d (2d) and projection 2 B S d (p^2 C_out).
    Norms, RoPE rotations, softmax, SiLU, the masked mean and the modulations themselves are element-wise.
    """
    b, c, f, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    dc = int(t.get("pooled_projection_dim", 1536))
    dtxt = int(t.get("text_embed_dim", 4096))
    tdim = int(t.get("time_embed_dim", 256))
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    ff, ffc = mochi_ff_inner_dim(d), mochi_ff_inner_dim(dc)
    s, txt = f * (h // p) * (w // p), text_len
    valid = [int(text_valid)] * b if np.ndim(text_valid) == 0 else [int(v) for v in text_valid]
    if len(valid) != b:
        raise ValueError(f"text_valid: {len(valid)} counts for a batch of {b}.")
    valid = [max(0, min(v, txt)) for v in valid]
    video = 8 * b * s * d * d + 6 * b * s * d * ff
    mod = 8 * b * d * d + 8 * b * d * dc
    caption = 8 * b * txt * dc * d + 6 * b * txt * dc * ffc
    attn = 4 * d * sum((s + v) ** 2 for v in valid)
    last_attn = 4 * d * sum(s * (s + v) for v in valid)
    last_lin = 8 * b * d * d + 2 * b * d * dc + 8 * b * s * d * d + 4 * b * txt * dc * d + 6 * b * s * d * ff
    padding = (layers - 1) * 4 * d * sum((s + txt) ** 2 - (s + v) ** 2 for v in valid) \
        + 4 * d * sum(s * (txt - v) for v in valid)
    pool_attn = 4 * b * (txt + 1) * dtxt
    pool = 4 * b * (txt + 1) * dtxt * dtxt + 2 * b * dtxt * dtxt + pool_attn + 2 * b * dtxt * d
    embed = (2 * b * s * (c * p * p) * d + 2 * b * (tdim * d + d * d) + pool + 2 * b * txt * dtxt * dc
             + 3 * s * d)
    head = 2 * b * d * 2 * d + 2 * b * s * d * (p * p * cout)
    block = mod + video + caption + attn
    total = (layers - 1) * block + last_lin + last_attn + embed + head
    attention = (layers - 1) * attn + last_attn + pool_attn
    return {"total": float(total), "per_block": float(block), "attention": float(attention),
            "linear": float(total - attention), "attention_padding": float(padding), "tokens": s}


class MochiTorchReference(KeywordTorchReference):
    """diffusers' ``MochiTransformer3DModel`` called as ``MochiPipeline`` calls it: latents, T5 states and the
    timestep in the model's dtype (the pipeline's ``t.expand(B).to(latents.dtype)``), the bool caption
    mask. Its RoPE frequencies (``pos_frequencies``, learned; zeros at init) are drawn at random, as a
    checkpoint's are non-zero, so that the output check sees the rotation."""

    diffusers_class = "MochiTransformer3DModel"

    def _make_model(self, cfg):
        model = super()._make_model(cfg)
        with self.torch.no_grad():
            model.pos_frequencies.copy_(self.torch.randn(model.pos_frequencies.shape) * 0.1)
        return model

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t", "model"),
                 "encoder_attention_mask": Arg("mask", "bool")}


class Mochi(Family):
    name = "mochi"
    module_name = "xdit_jax.models.mochi"
    model_class_name = "MochiTransformer3DModel"
    config_class_name = "MochiConfig"
    token_word = "video"
    title = "Mochi"
    final_block = True  # the context_pre_only last block

    def latent_shape(self, w):
        """(B, C, F, h, w) in diffusers' layout: (num_frames - 1) // 6 + 1 latent frames, H/8 x W/8."""
        return (w.step_batch, int(w.transformer.get("in_channels", 12)),
                (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, f, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return f * (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        """T5 tokens: the pipeline's ``max_sequence_length`` (256; defaults.json's, else the config's)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length")
                   or w.transformer.get("max_sequence_length", 256))

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or MOCHI_TEXT_VALID), self.text_len(w))

    def mask(self, w) -> np.ndarray:
        """(B, L) int32 caption mask: with CFG the negative prompt "" (1 token), then the prompt's."""
        return pixart_mask(w.step_batch, self.text_len(w), self.text_valid(w), w.cfg)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the video tokens; the caption joins as a context every device holds

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[3], shape[4])

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.latent_shape(w)[2], "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "caption_dim": cfg.pooled_projection_dim, "height": w.height,
                "width": w.width, "num_frames": w.num_frames}

    def make_inputs(self, w, seed=0):
        """As ``MochiPipeline`` passes them: latents (B, C, F, h, w), T5 states (B, L, text_embed_dim),
        timesteps (B,) float and the caption mask (B, L)."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((b, self.text_len(w), int(w.transformer.get("text_embed_dim", 4096))),
                                     dtype=np.float32)
        return {"latents": latents, "embeds": embeds, "t": np.full((b,), 500.0, dtype=np.float32),
                "mask": self.mask(w)}

    def embed_args(self, inputs, dtype):
        return inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["mask"]

    def analytic_flops(self, w):
        return mochi_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w),
                                    self.mask(w).sum(axis=1).tolist())

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return MochiTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# FLUX.1
# ============================================================================================

FLUX_TIME_PROJ = 256  # the sinusoidal timestep (and guidance) projection width
# The transformer's ``timestep`` argument: FluxPipeline passes t / 1000 with t = 1000 sigma (0.5: mid-schedule,
# exact in bf16 too, so diffusers' rounding of t to the model dtype changes nothing)
FLUX_TIMESTEP = 0.5
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's embedded guidance (FluxPipeline's default guidance_scale)


def flux_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one FLUX.1 transformer forward (2 FLOPs per multiply-add).

    B = batch (one sample per prompt; both halves with true CFG), S = (H/16)(W/16) image tokens (the
    packed latents: 2 x 2 patches of the 8x VAE latent), L = T5 tokens (``text_len``: 512 for dev, 256 for
    schnell; all of them: FluxPipeline attends to the T5 padding, no mask), J = S + L, d = heads x
    head_dim (3072), C = in_channels (64 = 16 latent channels x 2 x 2), C_out = out_channels or C,
    D_j = joint_attention_dim (T5, 4096), P = pooled_projection_dim (CLIP, 768), N double-stream and M
    single-stream blocks (19 and 38). Per double-stream block (``FluxTransformerBlock``; the image and
    the text tokens each through their own weights):

        modulations norm1, norm1_context (d -> 6d each)     2 x 2 B d (6d)        = 24 B d^2
        image q, k, v, out                                  4 x 2 B S d^2         =  8 B S d^2
        text q, k, v, to_add_out                            4 x 2 B L d^2         =  8 B L d^2
        joint attention QK^T and PV over [text; image]      2 x 2 B J^2 d         =  4 B J^2 d
        image MLP d -> 4d -> d                              2 x 2 B S d (4d)      = 16 B S d^2
        text MLP d -> 4d -> d                                                     = 16 B L d^2
                                                   together 24 B d^2 + 24 B J d^2 + 4 B J^2 d

    Per single-stream block (``FluxSingleTransformerBlock``, one set of weights over all J tokens):

        modulation norm (d -> 3d)                           2 B d (3d)            =  6 B d^2
        q, k, v                                             3 x 2 B J d^2         =  6 B J d^2
        proj_mlp d -> 4d                                    2 B J d (4d)          =  8 B J d^2
        proj_out over [attention; MLP] 5d -> d              2 B J (5d) d          = 10 B J d^2
        attention QK^T and PV over J                                              =  4 B J^2 d
                                                   together 6 B d^2 + 24 B J d^2 + 4 B J^2 d

    (so a double and a single block cost alike per token: 24 d^2, the double's split over two weight sets).
    Plus, once: x_embedder 2 B S C d; context_embedder 2 B L D_j d; the timestep embedder
    (256 -> d -> d) 2 B (256 d + d^2), the same again for the guidance embedder where
    ``guidance_embeds`` (dev; not schnell); the pooled-text embedder (P -> d -> d) 2 B (P d + d^2); the
    head: norm_out's modulation (d -> 2d) 4 B d^2 and proj_out 2 B S d C_out. Norms, the q/k RMS norms,
    RoPE (its tables come from the position ids on the host), the sinusoids, GELU, SiLU and the gates
    are element-wise.
    """
    b, s, c = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    n, m = int(t["num_layers"]), int(t["num_single_layers"])
    p = int(t.get("patch_size", 1))
    cout = int(t.get("out_channels") or c)
    dj, pooled = int(t.get("joint_attention_dim", 4096)), int(t.get("pooled_projection_dim", 768))
    txt = int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    double = 24 * b * d * d + 24 * b * j * d * d
    single = 6 * b * d * d + 24 * b * j * d * d
    tp = FLUX_TIME_PROJ
    time = 2 * b * (tp * d + d * d) * (2 if t.get("guidance_embeds", False) else 1)
    embed = 2 * b * s * c * d + 2 * b * txt * dj * d + time + 2 * b * (pooled * d + d * d)
    head = 4 * b * d * d + 2 * b * s * d * (p * p * cout)
    total = n * (double + attn) + m * (single + attn) + embed + head
    attention = (n + m) * attn
    return {"total": float(total), "per_block": float(double + attn), "per_single_block": float(single + attn),
            "attention": float(attention), "linear": float(total - attention), "tokens": s}


class FluxTorchReference(KeywordTorchReference):
    """diffusers' ``FluxTransformer2DModel`` called as ``FluxPipeline`` calls it: the packed latents, T5 states
    and pooled CLIP embedding in the model's dtype, ``timestep`` = t / 1000 in the latents' dtype, ``img_ids``
    (S, 3) and ``txt_ids`` (L, 3) in the model's dtype (diffusers makes the RoPE tables from them in float64)
    and, where ``guidance_embeds``, ``guidance`` (B,) float32. With true CFG the pipeline calls it once per
    half; here once on both halves (the same work, as ours)."""

    diffusers_class = "FluxTransformer2DModel"

    call_args = {"hidden_states": LATENTS, "timestep": Arg("t", "model"),
                 "guidance": Arg("guidance", "float32", optional=True), "pooled_projections": Arg("pooled", "model"),
                 "encoder_hidden_states": EMBEDS, "txt_ids": Arg("txt_ids", "model"),
                 "img_ids": Arg("img_ids", "model")}


class Flux(Family):
    name = "flux"
    module_name = "xdit_jax.models.flux"
    model_class_name = "FluxTransformer2DModel"
    config_class_name = "FluxConfig"
    token_word = "image"
    title = "FLUX"
    # FLUX.1-dev is guidance-distilled (the scale is an embedding) and schnell takes none: FluxPipeline runs one
    # sample per prompt; diffusers' true CFG (a negative prompt, true_cfg_scale > 1) doubles it (--cfg)
    default_cfg = False
    host_inputs = ("img_ids", "txt_ids")

    def pipeline_call(self, w):
        """guidance_scale is an embedding here: CFG is diffusers' "true CFG" (a negative prompt, true_cfg_scale)."""
        kw = {k: v for k, v in super().pipeline_call(w).items() if k != "guidance_scale"}
        if self.reference_tokens(w):  # Kontext: a random reference image of the output's size, kept at that size
            kw.update(image=np.random.default_rng(0).integers(0, 256, (w.height, w.width, 3), dtype=np.uint8),
                      max_area=w.height * w.width, _auto_resize=False)
        return dict(kw, negative_prompt="", true_cfg_scale=4.0) if w.cfg else kw

    def grid(self, w) -> tuple[int, int]:
        """The packed token grid (H/16, W/16): 2 x 2 patches of the VAE latent."""
        m = 2 * w.vae_scale_spatial
        if w.height % m or w.width % m or w.height <= 0 or w.width <= 0:
            raise ValueError(f"FLUX packs 2 x 2 patches of the {w.vae_scale_spatial}x VAE latent: height and width "
                             f"must be positive multiples of {m}; got {w.height}x{w.width}.")
        return w.height // m, w.width // m

    def reference_tokens(self, w) -> int:
        """FLUX.1 Kontext (defaults.json's ``reference_image``): the reference image's packed tokens, appended to the
        latents' (an image of the output's size: as many again); 0 for text-to-image."""
        gh, gw = self.grid(w)
        return gh * gw if w.defaults.get("reference_image") else 0

    def latent_shape(self, w):
        """The packed latents (B, (H/16)(W/16), in_channels), FluxPipeline's ``latents`` and the
        transformer's ``hidden_states`` (Kontext: the reference image's tokens after them)."""
        gh, gw = self.grid(w)
        return w.step_batch, gh * gw + self.reference_tokens(w), int(w.transformer.get("in_channels", 64))

    def tokens(self, w):
        gh, gw = self.grid(w)
        return gh * gw + self.reference_tokens(w), self.text_len(w)

    def text_len(self, w):
        """T5 tokens: the pipeline's ``max_sequence_length`` (defaults.json's: dev 512, schnell 256)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 512)

    def guidance(self, w) -> float:
        return float(w.defaults.get("guidance_scale") or FLUX_GUIDANCE)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the image tokens; under PipeFusion the text joins as a context

    def check(self, cfg, shape):
        if shape[2] != cfg.in_channels:
            raise ValueError(f"packed latents {shape}: this FLUX transformer takes {cfg.in_channels} channels.")

    def with_layers(self, transformer, layers):
        """``--layers N``: N double-stream and N single-stream blocks."""
        return dict(transformer, num_layers=int(layers), num_single_layers=int(layers))

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st,
                "layers": cfg.num_layers + cfg.num_single_layers, "double_layers": cfg.num_layers,
                "single_layers": cfg.num_single_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width,
                "guidance_embeds": cfg.guidance_embeds, "true_cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``FluxPipeline`` passes them: packed latents (B, S, in_channels), T5 states (B, L,
        joint_attention_dim), the pooled CLIP embedding (B, pooled_projection_dim), the timestep t / 1000
        (B,) float, where ``guidance_embeds`` the guidance scale (B,) float (defaults.json's, 3.5), and the
        position ids: ``img_ids`` (S, 3) = (0, row, column) and ``txt_ids`` (L, 3) zeros (host arrays, not
        step arguments: :attr:`Family.host_inputs`)."""
        from xdit_jax.models.flux import image_ids

        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((b, txt, int(t.get("joint_attention_dim", 4096))), dtype=np.float32)
        pooled = rng.standard_normal((b, int(t.get("pooled_projection_dim", 768))), dtype=np.float32)
        inputs = {"latents": latents, "embeds": embeds, "pooled": pooled,
                  "t": np.full((b,), FLUX_TIMESTEP, dtype=np.float32)}
        if t.get("guidance_embeds", False):
            inputs["guidance"] = np.full((b,), self.guidance(w), dtype=np.float32)
        inputs["img_ids"] = image_ids(*self.grid(w))
        if self.reference_tokens(w):  # Kontext: the reference image's ids (1, row, column)
            ref = image_ids(*self.grid(w))
            ref[:, 0] = 1
            inputs["img_ids"] = np.concatenate([inputs["img_ids"], ref])
        inputs["txt_ids"] = np.zeros((txt, 3), np.float32)
        return inputs

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["pooled"].astype(dtype),
                inputs["t"], inputs["img_ids"], inputs["txt_ids"], inputs.get("guidance"))

    def mesh_forward(self):
        """``xdit_jax.pipelines.flux.transformer_over_mesh``: the double-stream blocks over the image tokens
        (the text whole on every device), then the single-stream blocks over [text; image], as the pipeline."""
        from xdit_jax.pipelines.flux import transformer_over_mesh

        return transformer_over_mesh

    def analytic_flops(self, w):
        return flux_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return FluxTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Stable Diffusion 3 / 3.5
# ============================================================================================

SD3_TIME_PROJ = 256  # the sinusoidal timestep projection width
SD3_CLIP_TOKENS = 77  # the two CLIP encoders' tokens (concatenated along the width, padded to 4096) before T5's
# The transformer's ``timestep`` argument: StableDiffusion3Pipeline passes the scheduler's t = 1000 sigma (float32)
SD3_TIMESTEP = 500.0


def sd3_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one SD3 / SD3.5 transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = (h/p)(w/p) image tokens, L = text tokens (``text_len``: 77 CLIP + the T5
    ``max_sequence_length``, 333 by default; all of them: SD3 attends to the padding, no mask), J = S + L,
    d = heads x head_dim (= caption_projection_dim; 1536 for SD3 Medium, 2432 for SD3.5 Large), C = in_channels,
    C_out = out_channels or C, D_j = joint_attention_dim (4096), P = pooled_projection_dim (2048), N = layers.
    Per joint block (``JointTransformerBlock``, the first N - 1; image and text each through their own weights):

        modulations norm1, norm1_context (AdaLayerNormZero, d -> 6d each)  2 x 2 B d (6d)   = 24 B d^2
        image q, k, v, out                                                 4 x 2 B S d^2    =  8 B S d^2
        text q, k, v, to_add_out                                           4 x 2 B L d^2    =  8 B L d^2
        joint attention QK^T and PV over [image; text]                     2 x 2 B J^2 d    =  4 B J^2 d
        image MLP d -> 4d -> d                                             2 x 2 B S d (4d) = 16 B S d^2
        text MLP d -> 4d -> d                                                               = 16 B L d^2
                                                                  together 24 B d^2 + 24 B J d^2 + 4 B J^2 d

    The last block (``context_pre_only``) has no text output and no text MLP: norm1 12 B d^2, its text norm an
    AdaLayerNormContinuous (d -> 2d) 4 B d^2, image q, k, v, out 8 B S d^2, text k, v 4 B L d^2, the attention
    of the image rows only 4 B S J d, the image MLP 16 B S d^2. (diffusers computes the last block's text
    queries and attention rows and drops them; we count the work the output needs, which is what ours does.)

    A block in ``dual_attention_layers`` (SD3.5 Medium) also runs ``attn2``, a self-attention over the image
    tokens with its own q, k, v, out, modulated by the 9-chunk ``SD35AdaLayerNormZeroX`` (norm1 d -> 9d):
    + 6 B d^2 + 8 B S d^2 + 4 B S^2 d.

    Plus, once: the patch embedding (a p x p conv) 2 B S (C p^2) d; context_embedder 2 B L D_j d; the timestep
    embedder (256 -> d -> d) 2 B (256 d + d^2); the pooled-text embedder (P -> d -> d) 2 B (P d + d^2); the head:
    norm_out's modulation (d -> 2d) 4 B d^2 and proj_out 2 B S d (p^2 C_out). The position table's crop (a slice),
    norms, the q/k RMS norms (SD3.5), the sinusoids, GELU, SiLU and the gates are element-wise.
    """
    b, c, h, w = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    n = int(t["num_layers"])
    p = int(t.get("patch_size", 2))
    cout = int(t.get("out_channels") or c)
    dj, pooled = int(t.get("joint_attention_dim", 4096)), int(t.get("pooled_projection_dim", 2048))
    dual = {int(i) for i in (t.get("dual_attention_layers") or ())}
    s, txt = (h // p) * (w // p), int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    block = 24 * b * d * d + 24 * b * j * d * d
    last_attn = 4 * b * s * j * d
    last = 12 * b * d * d + 4 * b * d * d + 8 * b * s * d * d + 4 * b * txt * d * d + 16 * b * s * d * d
    dual_attn = 4 * b * s * s * d
    dual_lin = 6 * b * d * d + 8 * b * s * d * d
    n_dual = len([i for i in dual if 0 <= i < n])
    tp = SD3_TIME_PROJ
    embed = (2 * b * s * (c * p * p) * d + 2 * b * txt * dj * d + 2 * b * (tp * d + d * d)
             + 2 * b * (pooled * d + d * d))
    head = 4 * b * d * d + 2 * b * s * d * (p * p * cout)
    attention = (n - 1) * attn + last_attn + n_dual * dual_attn
    total = (n - 1) * (block + attn) + last + last_attn + n_dual * (dual_lin + dual_attn) + embed + head
    return {"total": float(total), "per_block": float(block + attn), "attention": float(attention),
            "linear": float(total - attention), "tokens": s}


class SD3TorchReference(KeywordTorchReference):
    """diffusers' ``SD3Transformer2DModel`` called as ``StableDiffusion3Pipeline`` calls it: latents, the joint
    CLIP + T5 states and the pooled CLIP embeddings in the model's dtype, ``timestep`` the scheduler's t
    expanded to the batch (float32; the model casts its sinusoid to the pooled embeddings' dtype)."""

    diffusers_class = "SD3Transformer2DModel"

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS,
                 "pooled_projections": Arg("pooled", "model"), "timestep": Arg("t", "float32")}


class SD3(Family):
    name = "sd3"
    module_name = "xdit_jax.models.sd3"
    model_class_name = "SD3Transformer2DModel"
    config_class_name = "SD3Config"
    token_word = "image"
    title = "SD3"
    final_block = True  # the context_pre_only last block

    def latent_shape(self, w):
        """(B, C, H/8, W/8), diffusers' layout (the transformer patchifies it itself)."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p), self.text_len(w)

    def t5_len(self, w) -> int:
        """T5 tokens: the pipeline's ``max_sequence_length`` (the workload's ``text_tokens``, else
        defaults.json's, else 256)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 256)

    def text_len(self, w):
        """The joint text: 77 CLIP tokens, then the T5 tokens."""
        return SD3_CLIP_TOKENS + self.t5_len(w)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the image tokens; the text joins as a context every device holds

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[2], shape[3])

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "t5_tokens": self.t5_len(w),
                "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "qk_norm": cfg.qk_norm, "dual_attention_layers": list(cfg.dual_attention_layers),
                "height": w.height, "width": w.width}

    def make_inputs(self, w, seed=0):
        """As ``StableDiffusion3Pipeline`` passes them: latents (B, C, h, w), the joint text states (B, 77 + L,
        joint_attention_dim: CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5), the pooled
        CLIP embeddings (B, pooled_projection_dim) and the timestep t (B,) float."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((b, self.text_len(w), int(t.get("joint_attention_dim", 4096))),
                                     dtype=np.float32)
        pooled = rng.standard_normal((b, int(t.get("pooled_projection_dim", 2048))), dtype=np.float32)
        return {"latents": latents, "embeds": embeds, "pooled": pooled,
                "t": np.full((b,), SD3_TIMESTEP, dtype=np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["pooled"].astype(dtype),
                inputs["t"])

    def analytic_flops(self, w):
        return sd3_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return SD3TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Wan 2.1
# ============================================================================================

# A typical prompt's UMT5 tokens (its EOS included) in the conditional half; the unconditional half is WanPipeline's
# default negative prompt "": 1 token, the EOS. WanPipeline zeroes each caption's states after its tokens (there is
# no mask: the transformer cross-attends to all max_sequence_length rows, the zeros included).
WAN_TEXT_VALID = PIXART_TEXT_VALID
# The transformer's ``timestep``: WanPipeline passes the UniPC scheduler's t expanded to the batch, int64 (its
# flow sigmas times 1000, truncated); 500 is mid-schedule.
WAN_TIMESTEP = 500


def wan_vae_scales(vae: dict | None) -> tuple[int, int]:
    """(spatial, temporal) compression of an ``AutoencoderKLWan`` config, as ``WanPipeline`` reads them: its
    ``scale_factor_spatial`` / ``scale_factor_temporal`` (AutoencoderKLWan's defaults 8 and 4; Wan 2.2's VAE 16 and
    4); (8, 4) without a config."""
    vae = vae or {}
    return int(vae.get("scale_factor_spatial") or 8), int(vae.get("scale_factor_temporal") or 4)


def wan_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                       image_tokens: int = 0) -> dict[str, float]:
    """Matmul FLOPs of one Wan 2.1 transformer forward (2 FLOPs per multiply-add), as diffusers'
    ``WanTransformer3DModel`` (transformer_wan.py) computes it.

    B = batch (both CFG halves), S = (F/p_t)(h/p_h)(w/p_w) video tokens, L = caption tokens (``text_len``, 512:
    all of them, WanPipeline zero-pads the UMT5 states and passes no mask), d = heads x head_dim (1536 for 1.3B,
    5120 for 14B), F = ffn_dim (8960 / 13824), D = text_dim (UMT5, 4096), T = freq_dim (256), C = in_channels,
    C_out = out_channels or C, P = p_t p_h p_w, N = layers. Per block (``WanTransformerBlock``):

        self-attention q, k, v, out (attn1)             4 x 2 B S d^2      =  8 B S d^2
        self-attention QK^T and PV                      2 x 2 B S^2 d      =  4 B S^2 d
        cross-attention q, out (attn2)                  2 x 2 B S d^2      =  4 B S d^2
        cross-attention k, v on the caption             2 x 2 B L d^2      =  4 B L d^2
        cross-attention QK^T and PV                     2 x 2 B S L d      =  4 B S L d
        feed-forward d -> F -> d (tanh GELU)            2 x 2 B S d F      =  4 B S d F

    (the block's modulation is the shared ``timestep_proj`` plus its own ``scale_shift_table``: an add, no matmul).
    Plus, once: the patch embedding (a Conv3d, kernel = stride = patch) 2 B S (C P) d; the time embedder
    (``TimestepEmbedding`` T -> d -> d) 2 B (T d + d^2); ``time_proj`` (d -> 6d) 12 B d^2; the text embedder
    (``PixArtAlphaTextProjection`` D -> d -> d over the L tokens) 2 B L (D d + d^2); the head: ``proj_out``
    2 B S d (C_out P) (its modulation is ``scale_shift_table`` + temb: an add). Norms (the q/k RMS norms across
    heads, the float32 LayerNorms), RoPE (its tables on the host), the sinusoids, GELU and SiLU are element-wise.

    Wan 2.1 image-to-video (``image_dim`` I, ``image_tokens`` M CLIP states: 257, FLF2V 514): the image embedder
    (I -> I -> d over the M states) 2 B M (I^2 + I d) once, and per block attn2's added K/V on them 4 B M d^2 and
    their QK^T and PV 4 B S M d.
    """
    b, c, f, h, w = latent_shape
    t = transformer
    pt, ph, pw = (int(x) for x in t.get("patch_size", (1, 2, 2)))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    ffn = int(t.get("ffn_dim", 13824))
    dtxt, tdim = int(t.get("text_dim", 4096)), int(t.get("freq_dim", 256))
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    patch = pt * ph * pw
    s, txt = (f // pt) * (h // ph) * (w // pw), int(text_len)
    self_proj, self_attn = 8 * b * s * d * d, 4 * b * s * s * d
    cross_proj, cross_attn = 4 * b * s * d * d + 4 * b * txt * d * d, 4 * b * s * txt * d
    ff = 4 * b * s * d * ffn
    img, idim = int(image_tokens), int(t.get("image_dim") or 0)
    cross_proj += 4 * b * img * d * d
    cross_attn += 4 * b * s * img * d
    block = self_proj + self_attn + cross_proj + cross_attn + ff
    embed = (2 * b * s * (c * patch) * d + 2 * b * (tdim * d + d * d) + 12 * b * d * d
             + 2 * b * txt * (dtxt * d + d * d) + 2 * b * img * (idim * idim + idim * d))
    head = 2 * b * s * d * (cout * patch)
    attention = layers * (self_attn + cross_attn)
    total = layers * block + embed + head
    return {"total": float(total), "per_block": float(block), "attention": float(attention),
            "linear": float(total - attention), "tokens": s}


def wan_text_states(rng, step_batch: int, text_len: int, width: int, valid: int, cfg: bool) -> np.ndarray:
    """(B, L, width) float32 UMT5-like states as WanPipeline hands them to the transformer: each caption's rows
    after its tokens zeroed (no mask); with CFG the first half is the negative prompt "" (1 token, its EOS), the
    second the prompt (``valid`` tokens); without, the prompt."""
    states = rng.standard_normal((step_batch, text_len, width), dtype=np.float32)
    keep = pixart_mask(step_batch, text_len, valid, cfg)
    return states * keep[..., None].astype(np.float32)


class WanTorchReference(TorchReference):
    """diffusers' ``WanTransformer3DModel`` called as ``WanPipeline`` calls it: latents and the zero-padded UMT5
    states in the model's dtype, ``timestep`` the scheduler's int64 t expanded to the batch (``t.expand(B)``).
    WanPipeline calls it once per CFG half; here once on both halves (the same work, as ours)."""

    diffusers_class = "WanTransformer3DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x = put("latents", self.dtype)
        self.enc = put("embeds", self.dtype)
        self.t = put("t")  # int64, as the scheduler's
        self.img = None
        if "image" in inputs:  # Wan 2.1 I2V: diffusers splits the states assuming 512 caption tokens
            if inputs["embeds"].shape[1] != 512:
                raise ValueError(f"diffusers' Wan image-to-video attention assumes 512 caption tokens; this workload "
                                 f"has {inputs['embeds'].shape[1]} (drop --text-tokens).")
            img = put("image", self.dtype)
            if self.model.config.pos_embed_seq_len is not None:  # FLF2V: diffusers takes (2B, 257, I)
                img = img.reshape(2 * img.shape[0], -1, img.shape[-1])
            self.img = img

    def _forward(self):
        return self.model(hidden_states=self.x, timestep=self.t, encoder_hidden_states=self.enc,
                          encoder_hidden_states_image=self.img, return_dict=False)[0]


class Wan(Family):
    name = "wan"
    module_name = "xdit_jax.models.wan"
    model_class_name = "WanTransformer3DModel"
    config_class_name = "WanConfig"
    token_word = "video"
    title = "Wan"

    def pipeline_call(self, w):
        """As :meth:`Family.pipeline_call`; a first-last-frame folder (Wan 2.1 FLF2V: ``pos_embed_seq_len``) also gets
        its last frame."""
        kw = super().pipeline_call(w)
        if "image" in kw and w.transformer.get("pos_embed_seq_len"):
            kw["last_image"] = np.random.default_rng(1).integers(0, 256, (w.height, w.width, 3), dtype=np.uint8)
        return kw

    def latent_shape(self, w):
        """(B, C, F, h, w) in diffusers' layout: (num_frames - 1) // 4 + 1 latent frames, H/8 x W/8."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)),
                (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, f, h, ww = self.latent_shape(w)
        pt, ph, pw = (int(x) for x in w.transformer.get("patch_size", (1, 2, 2)))
        return (f // pt) * (h // ph) * (ww // pw), self.text_len(w)

    def text_len(self, w):
        """UMT5 tokens: the pipeline's ``max_sequence_length`` (the workload's, else defaults.json's, else 512)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 512)

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or WAN_TEXT_VALID), self.text_len(w))

    def image_tokens(self, w) -> int:
        """Wan 2.1 image-to-video: CLIP image states a row (the image encoder's (image_size / patch)^2 + 1, 257 for
        ViT-H/14 at 224; FLF2V's ``pos_embed_seq_len``, two images'); 0 for the other Wans."""
        import json
        from pathlib import Path

        t = w.transformer
        if t.get("image_dim") is None:
            return 0
        if t.get("pos_embed_seq_len"):
            return int(t["pos_embed_seq_len"])
        enc = Path(w.folder) / "image_encoder" / "config.json" if w.folder else None
        c = json.loads(enc.read_text()) if enc is not None and enc.exists() else {}
        return (int(c.get("image_size", 224)) // int(c.get("patch_size", 14))) ** 2 + 1

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # self-attention over the video tokens; the caption is a cross-attention context

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[2], shape[3], shape[4])

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "image_tokens": self.image_tokens(w), "latent_frames": self.latent_shape(w)[2],
                "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "ffn_dim": cfg.ffn_dim,
                "height": w.height, "width": w.width, "num_frames": w.num_frames}

    def make_inputs(self, w, seed=0):
        """As ``WanPipeline`` passes them: latents (B, C, F, h, w), UMT5 states (B, L, text_dim) zero after each
        caption's tokens (:func:`wan_text_states`) and the timestep (B,) int64."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = wan_text_states(rng, b, self.text_len(w), int(w.transformer.get("text_dim", 4096)),
                                 self.text_valid(w), w.cfg)
        out = {"latents": latents, "embeds": embeds, "t": np.full((b,), WAN_TIMESTEP, dtype=np.int64)}
        if self.image_tokens(w):  # Wan 2.1 I2V: CLIP image states, the same for both CFG halves (as the pipeline)
            img = rng.standard_normal((1, self.image_tokens(w), int(w.transformer["image_dim"])), dtype=np.float32)
            out["image"] = np.repeat(img, b, axis=0)
        return out

    def embed_args(self, inputs, dtype):
        image = inputs["image"].astype(dtype) if "image" in inputs else None
        return inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), image

    def analytic_flops(self, w):
        return wan_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w), self.image_tokens(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return WanTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# SkyReels-V2 (Wan's blocks; diffusion forcing: a timestep per latent frame, the fps embedding, causal blocks)
# ============================================================================================

SKYREELS_FPS = 24  # the DF pipelines' default fps: the fps embedding's row 1 (16 fps is row 0)


def skyreels_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int, per_frame: bool,
                            image_tokens: int = 0) -> dict[str, float]:
    """Matmul FLOPs of one SkyReels-V2 transformer forward: :func:`wan_analytic_flops` (the same blocks; the causal
    blocks' mask is applied to full score matrices, so their attention counts whole), where with a timestep per latent
    frame (``per_frame``, diffusion forcing) the time embedder and ``time_proj`` run on the B F' frames' timesteps:
    2 B F' (T d + d^2) + 12 B F' d^2 instead of B's; plus, with ``inject_sample_info``, the fps projection
    (``FeedForward`` d -> d -> 6d on the fps embedding's row): 14 B d^2."""
    out = wan_analytic_flops(transformer, latent_shape, text_len, image_tokens)
    b, f = latent_shape[0], latent_shape[2] // int(transformer.get("patch_size", (1, 2, 2))[0])
    d = int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])
    tdim = int(transformer.get("freq_dim", 256))
    extra = (f - 1) * (2 * b * (tdim * d + d * d) + 12 * b * d * d) if per_frame else 0
    if transformer.get("inject_sample_info"):
        extra += 14 * b * d * d
    return dict(out, total=out["total"] + extra, linear=out["linear"] + extra)


class SkyReelsV2TorchReference(WanTorchReference):
    """diffusers' ``SkyReelsV2Transformer3DModel`` as the diffusion-forcing pipelines call it: Wan's inputs with a
    (B, F') timestep and ``enable_diffusion_forcing=True`` (one sample a call), ``fps`` the embedding's rows (a
    list, as the pipeline)."""

    diffusers_class = "SkyReelsV2Transformer3DModel"

    def set_inputs(self, inputs, w):
        super().set_inputs(inputs, w)
        self.fps = [int(v) for v in inputs["fps"]] if "fps" in inputs else None
        self.forcing = inputs["t"].ndim == 2

    def _forward(self):
        if not self.forcing:
            return self.model(hidden_states=self.x, timestep=self.t, encoder_hidden_states=self.enc,
                              encoder_hidden_states_image=self.img, fps=self.fps, return_dict=False)[0]
        # diffusers adds the fps projection repeated over the frames, which broadcasts with one sample only: the DF
        # pipelines call it per CFG half, batch 1; here once per sample (the same work as ours on the batch)
        outs = [self.model(hidden_states=self.x[i:i + 1], timestep=self.t[i:i + 1],
                           encoder_hidden_states=self.enc[i:i + 1],
                           encoder_hidden_states_image=None if self.img is None else self.img[i:i + 1],
                           enable_diffusion_forcing=True, fps=None if self.fps is None else self.fps[i:i + 1],
                           return_dict=False)[0] for i in range(self.x.shape[0])]
        return self.torch.cat(outs)


class SkyReelsV2(Wan):
    """SkyReels-V2: Wan's workload shapes; a diffusion-forcing folder (its model_index says so, or the transformer
    has ``inject_sample_info``) steps with a timestep per latent frame (a ramp, as the asynchronous schedule's) and
    the fps embedding, its causal blocks from defaults.json's ``causal_block_size`` (the pipeline sets the
    transformer's ``num_frame_per_block`` to it)."""

    name = "skyreels_v2"
    module_name = "xdit_jax.models.skyreels_v2"
    model_class_name = "SkyReelsV2Transformer3DModel"
    config_class_name = "SkyReelsV2Config"
    title = "SkyReels-V2"

    def forcing(self, w) -> bool:
        """Whether the workload steps as the diffusion-forcing pipelines: a timestep per latent frame."""
        cls = self.pipeline_class(w)
        return "DiffusionForcing" in cls if cls else bool(w.transformer.get("inject_sample_info"))

    def pipeline_call(self, w):
        kw = super().pipeline_call(w)
        if self.forcing(w):
            kw["fps"] = int(w.defaults.get("fps", SKYREELS_FPS))
            if w.defaults.get("causal_block_size"):
                kw["causal_block_size"] = int(w.defaults["causal_block_size"])
        return kw

    def row_fields(self, w, cfg):
        return dict(super().row_fields(w, cfg), diffusion_forcing=self.forcing(w),
                    causal_block=cfg.num_frame_per_block)

    def make_inputs(self, w, seed=0):
        """Wan's (:meth:`Wan.make_inputs`); diffusion forcing: ``t`` (B, F') int64, a ramp from 999 down over the
        latent frames (every frame its own timestep), and ``fps`` (B,) the embedding's row."""
        out = super().make_inputs(w, seed)
        if self.forcing(w):
            b, _, f = self.latent_shape(w)[:3]
            frames = f // int(w.transformer.get("patch_size", (1, 2, 2))[0])
            ramp = np.linspace(999, WAN_TIMESTEP, frames).astype(np.int64)
            out["t"] = np.broadcast_to(ramp, (b, frames)).copy()
        if w.transformer.get("inject_sample_info"):
            fps = int(w.defaults.get("fps", SKYREELS_FPS))
            out["fps"] = np.full((w.step_batch,), self.module.fps_index(fps), np.int64)
        return out

    def embed_args(self, inputs, dtype):
        return super().embed_args(inputs, dtype) + ((inputs["fps"] if "fps" in inputs else None),)

    def analytic_flops(self, w):
        return skyreels_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w), self.forcing(w),
                                       self.image_tokens(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return SkyReelsV2TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Latte
# ============================================================================================

def latte_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one Latte transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), F frames, S = (h/p)(w/p) patch positions a frame, L caption tokens, d = heads
    * head_dim, d_c = cross_attention_dim, C_cap = caption_channels, N layer pairs. Per pair:

        spatial self-attention q, k, v, out      8 B F S d^2
        spatial self-attention QK^T and PV       4 B F S^2 d
        cross-attention q, out                   4 B F S d^2
        cross-attention k, v (caption)           4 B L d_c d      (once per video: the frames share it)
        cross-attention QK^T and PV              4 B F S L d
        spatial feed-forward d->4d->d            16 B F S d^2
        temporal self-attention q, k, v, out     8 B S F d^2
        temporal QK^T and PV                     4 B S F^2 d
        temporal feed-forward                    16 B S F d^2

    plus, once: patch embedding 2 B F S (C_in p^2) d; timestep embedding 2 B (256 d + d^2) and adaln_single's
    2 B d (6d); the caption projection 2 B L (C_cap d + d^2); the output projection 2 B F S d (p^2 C_out).
    diffusers projects the caption's K/V once per frame (its caption is repeated over the frames): F times the
    cross-attention k, v term here.
    """
    b, c, f, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    dc = int(t.get("cross_attention_dim") or d)
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    cap = int(t.get("caption_channels") or 4096)
    s, txt = (h // p) * (w // p), int(text_len)
    n = b * f * s  # tokens
    self_attn, cross_attn, temporal_attn = 4 * n * s * d, 4 * n * txt * d, 4 * n * f * d
    spatial = 8 * n * d * d + self_attn + 4 * n * d * d + 4 * b * txt * dc * d + cross_attn + 16 * n * d * d
    temporal = 8 * n * d * d + temporal_attn + 16 * n * d * d
    block = spatial + temporal
    embed = 2 * n * (c * p * p) * d + 2 * b * (PIXART_TIME_PROJ * d + d * d) + 2 * b * d * 6 * d \
        + 2 * b * txt * (cap * d + d * d)
    head = 2 * n * d * (p * p * cout)
    attention = layers * (self_attn + cross_attn + temporal_attn)
    total = layers * block + embed + head
    return {"total": float(total), "per_block": float(block), "attention": float(attention),
            "linear": float(total - attention), "tokens": f * s}


class LatteTorchReference(TorchReference):
    """diffusers' ``LatteTransformer3DModel`` called as ``LattePipeline`` calls it (no attention mask). Its frame
    table buffer has ``video_length`` rows and fails at another frame count: it is replaced by the table for the
    workload's frames (:func:`xdit_jax.models.latte.temporal_table`: the same table's first rows, as ours)."""

    diffusers_class = "LatteTransformer3DModel"

    def set_inputs(self, inputs, w):
        from xdit_jax.models.latte import temporal_table

        self.x, self.enc = self._put(inputs, "latents", self.dtype), self._put(inputs, "embeds", self.dtype)
        self.t = self._put(inputs, "t")
        frames, dim = self.x.shape[2], self.model.temp_pos_embed.shape[-1]
        if frames != self.model.temp_pos_embed.shape[1]:
            table = self.torch.from_numpy(temporal_table(dim, frames))[None]
            self.model.temp_pos_embed = table.to(self.device, self.model.temp_pos_embed.dtype)

    def _forward(self):
        return self.model(self.x, timestep=self.t, encoder_hidden_states=self.enc, return_dict=False)[0]


class Latte(Family):
    name = "latte"
    module_name = "xdit_jax.models.latte"
    model_class_name = "LatteTransformer3DModel"
    config_class_name = "LatteConfig"
    token_word = "video"
    title = "Latte"

    def pipeline_call(self, w):
        kw = super().pipeline_call(w)
        kw.pop("max_sequence_length", None)  # LattePipeline's T5 length is fixed (120)
        return kw

    def latent_shape(self, w):
        """(B, C, F, h, w) in diffusers' layout: one latent frame per frame (an image VAE), H/8 x W/8."""
        return (w.step_batch, int(w.transformer.get("in_channels", 4)), w.num_frames, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, f, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return f * (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        """T5 tokens the transformer sees: 120 (several prompts; one prompt's are cut to its real tokens)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 120)

    def attention_tokens(self, w):
        _, _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p)  # PipeFusion's buffers: the patch positions (times the frames in the batch)

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[3], shape[4])

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "latent_frames": self.latent_shape(w)[2],
                "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "height": w.height, "width": w.width, "num_frames": w.num_frames}

    def make_inputs(self, w, seed=0):
        """As ``LattePipeline`` passes them: latents (B, C, F, h, w), T5 states (B, L, caption_channels), t (B,)."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((b, self.text_len(w), int(w.transformer.get("caption_channels", 4096))),
                                     dtype=np.float32)
        return {"latents": latents, "embeds": embeds, "t": np.full((b,), 500, dtype=np.int64)}

    def embed_args(self, inputs, dtype):
        return inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"]

    def analytic_flops(self, w):
        return latte_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return LatteTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# HunyuanVideo
# ============================================================================================

HUNYUAN_VIDEO_TIME_PROJ = 256  # the sinusoidal timestep (and guidance) projection width


def hunyuan_video_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one HunyuanVideo transformer forward (2 FLOPs per multiply-add).

    Latents (B, C, F, H, W); S = (F/p_t)(H/p)(W/p) video tokens, L = Llama tokens (``text_len``: 256 in the
    pipeline; every one computed, the padded ones masked as keys, not skipped), J = S + L, d = heads x head_dim
    (3072), m = int(d x mlp_ratio) (4d), D_t = text_embed_dim (4096), P = pooled_projection_dim (768), N double-,
    M single-stream and R refiner blocks (20, 40, 2). Per double-stream block (FLUX's, MLP width m):

        modulations norm1, norm1_context (d -> 6d each)     2 x 2 B d (6d)        = 24 B d^2
        q, k, v, out of both streams                        4 x 2 B J d^2         =  8 B J d^2
        joint attention QK^T and PV over [video; text]      2 x 2 B J^2 d         =  4 B J^2 d
        the two MLPs d -> m -> d                            2 x 2 B J d m         =  4 B J d m

    Per single-stream block: modulation (d -> 3d) 6 B d^2; q, k, v 6 B J d^2; proj_mlp 2 B J d m; proj_out over
    [attention; MLP] 2 B J (d + m) d; attention 4 B J^2 d: together 6 B d^2 + 8 B J d^2 + 4 B J d m + 4 B J^2 d.
    Per token refiner block (on the L text tokens): q, k, v, out 8 B L d^2; attention 4 B L^2 d; the SiLU MLP
    d -> m -> d 4 B L d m; its gates (d -> 2d) 4 B d^2. Plus, once: the patch embed (a Conv3d) 2 B S (C p_t p^2) d;
    the refiner's proj_in 2 B L D_t d, its timestep embedder (256 -> d -> d) 2 B (256 d + d^2) and its text
    embedder (D_t -> d -> d) 2 B (D_t d + d^2); the model's timestep embedder 2 B (256 d + d^2), the same again
    for the guidance where ``guidance_embeds``, the pooled-text embedder 2 B (P d + d^2); the head: norm_out's
    modulation (d -> 2d) 4 B d^2 and proj_out 2 B S d (p_t p^2 C_out). Norms, RoPE (host tables), the masked
    mean, the sinusoids, GELU, SiLU and the gates are element-wise.
    """
    b, c, f, h, w = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    mlp = int(d * float(t.get("mlp_ratio", 4.0)))
    n, m, r = int(t["num_layers"]), int(t["num_single_layers"]), int(t.get("num_refiner_layers", 2))
    p, pt = int(t.get("patch_size", 2)), int(t.get("patch_size_t", 1))
    cout = int(t.get("out_channels") or c)
    dt, pooled = int(t.get("text_embed_dim", 4096)), int(t.get("pooled_projection_dim", 768))
    s, txt = (f // pt) * (h // p) * (w // p), int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    double = 24 * b * d * d + 8 * b * j * d * d + 4 * b * j * d * mlp
    single = 6 * b * d * d + 8 * b * j * d * d + 4 * b * j * d * mlp
    refiner_attn = 4 * b * txt * txt * d
    refiner = 8 * b * txt * d * d + 4 * b * txt * d * mlp + 4 * b * d * d
    tp = HUNYUAN_VIDEO_TIME_PROJ
    time = 2 * b * (tp * d + d * d)
    embed = (2 * b * s * (c * pt * p * p) * d + 2 * b * txt * dt * d + time + 2 * b * (dt * d + d * d)
             + time * (2 if t.get("guidance_embeds", True) else 1) + 2 * b * (pooled * d + d * d))
    head = 4 * b * d * d + 2 * b * s * d * (pt * p * p * cout)
    total = n * (double + attn) + m * (single + attn) + r * (refiner + refiner_attn) + embed + head
    attention = (n + m) * attn + r * refiner_attn
    return {"total": float(total), "per_block": float(double + attn), "per_single_block": float(single + attn),
            "attention": float(attention), "linear": float(total - attention), "tokens": s}


HUNYUAN_VIDEO_TIMESTEP = 500.0  # the transformer's ``timestep``: the scheduler's t (float32), mid-schedule
HUNYUAN_VIDEO_GUIDANCE = 6.0  # HunyuanVideoPipeline's default guidance_scale (embedded: x 1000)
HUNYUAN_VIDEO_TEXT_VALID = PIXART_TEXT_VALID  # real tokens of the prompt's Llama states (after the template's crop)


class HunyuanVideoTorchReference(KeywordTorchReference):
    """diffusers' ``HunyuanVideoTransformer3DModel`` called as ``HunyuanVideoPipeline`` calls it: latents, Llama
    states, their mask and the pooled CLIP embedding in the model's dtype, the timestep in float32 (the latents'),
    the guidance (scale x 1000) in the model's dtype. With true CFG the pipeline calls it once per half; here once
    on both halves (the same work, as ours)."""

    diffusers_class = "HunyuanVideoTransformer3DModel"

    call_args = {"hidden_states": LATENTS, "timestep": Arg("t"), "encoder_hidden_states": EMBEDS,
                 "encoder_attention_mask": Arg("mask", "model"), "pooled_projections": Arg("pooled", "model"),
                 "guidance": Arg("guidance", "model", optional=True)}


class HunyuanVideo(Family):
    name = "hunyuanvideo"
    module_name = "xdit_jax.models.hunyuan_video"
    model_class_name = "HunyuanVideoTransformer3DModel"
    config_class_name = "HunyuanVideoConfig"
    token_word = "video"
    title = "HunyuanVideo"
    # guidance-distilled (the scale is an embedding): HunyuanVideoPipeline runs one sample per prompt; diffusers'
    # true CFG (a negative prompt, true_cfg_scale > 1) doubles it (--cfg)
    default_cfg = False

    def pipeline_call(self, w):
        """guidance_scale is an embedding here: CFG is diffusers' "true CFG" (a negative prompt, true_cfg_scale)."""
        kw = {k: v for k, v in super().pipeline_call(w).items() if k != "guidance_scale"}
        return dict(kw, negative_prompt="", true_cfg_scale=6.0) if w.cfg else kw

    def latent_shape(self, w):
        """(B, C, F, h, w) in diffusers' layout: (num_frames - 1) // 4 + 1 latent frames, H/8 x W/8."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)),
                (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, f, h, ww = self.latent_shape(w)
        p, pt = int(w.transformer.get("patch_size", 2)), int(w.transformer.get("patch_size_t", 1))
        return (f // pt) * (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        """Llama tokens after the template's crop: the pipeline's ``max_sequence_length`` (256)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 256)

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or HUNYUAN_VIDEO_TEXT_VALID), self.text_len(w))

    def mask(self, w) -> np.ndarray:
        """(B, L) int32 text mask: with true CFG the negative prompt's (1 token), then the prompt's."""
        return pixart_mask(w.step_batch, self.text_len(w), self.text_valid(w), w.cfg)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the video tokens; the text joins as a context

    def check(self, cfg, shape):
        if shape[1] != cfg.in_channels or shape[3] < cfg.patch_size or shape[4] < cfg.patch_size:
            raise ValueError(f"latents {shape}: this HunyuanVideo transformer takes {cfg.in_channels} channels and "
                             f"at least one {cfg.patch_size} x {cfg.patch_size} patch.")

    def with_layers(self, transformer, layers):
        """``--layers N``: N double-stream and N single-stream blocks."""
        return dict(transformer, num_layers=int(layers), num_single_layers=int(layers))

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.latent_shape(w)[2], "layers": cfg.num_layers + cfg.num_single_layers,
                "double_layers": cfg.num_layers, "single_layers": cfg.num_single_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "height": w.height,
                "width": w.width, "num_frames": w.num_frames, "true_cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``HunyuanVideoPipeline`` passes them: latents (B, C, F, h, w), Llama states (B, L, text_embed_dim),
        their mask (B, L), the pooled CLIP embedding (B, pooled_projection_dim), the timestep (B,) float32 and,
        where ``guidance_embeds``, the guidance (B,) = 6 x 1000."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        inputs = {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                  "embeds": rng.standard_normal((b, self.text_len(w), int(t.get("text_embed_dim", 4096))),
                                                dtype=np.float32),
                  "mask": self.mask(w),
                  "pooled": rng.standard_normal((b, int(t.get("pooled_projection_dim", 768))), dtype=np.float32),
                  "t": np.full((b,), HUNYUAN_VIDEO_TIMESTEP, dtype=np.float32)}
        if t.get("guidance_embeds", True):
            inputs["guidance"] = np.full((b,), HUNYUAN_VIDEO_GUIDANCE * 1000.0, dtype=np.float32)
        return inputs

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), inputs["mask"],
                inputs["pooled"].astype(dtype), inputs.get("guidance"))

    def analytic_flops(self, w):
        return hunyuan_video_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return HunyuanVideoTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# HunyuanVideo-1.5
# ============================================================================================

HUNYUAN_VIDEO15_BYT5_TOKENS = 256  # HunyuanVideo15Pipeline's tokenizer_2_max_length
HUNYUAN_VIDEO15_BYT5_HIDDEN = 2048  # the ByT5 projection's fixed width (HunyuanVideo15ByT5TextProjection)
HUNYUAN_VIDEO15_GLYPH_VALID = 16  # real ByT5 tokens of a prompt with a quoted word (the negative prompt "": none)
HUNYUAN_VIDEO15_VISION_TOKENS = 729  # the zero image embeddings diffusers' T2V pipeline passes (masked, unused)


def hunyuan_video15_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                                   text_2_len: int = HUNYUAN_VIDEO15_BYT5_TOKENS) -> dict[str, float]:
    """Matmul FLOPs of one HunyuanVideo-1.5 transformer forward (text-to-video; 2 FLOPs per multiply-add).

    Latents (B, C, F, H, W) (C = in_channels: 65, the latents with the zero condition channels); S = (F/p_t)(H/p)(W/p)
    video tokens, L = Qwen tokens (``text_len``: 1000), L2 = ByT5 tokens (256), J = S + L + L2 (every text token
    computed; the padding masked as keys, not skipped; the 729 image tokens of image-to-video are not computed),
    d = heads x head_dim (2048), m = int(d x mlp_ratio), D_t = text_embed_dim (3584), D_2 = text_embed_2_dim (1472),
    H_2 = 2048 (the ByT5 projection), N blocks (54), R refiner blocks (2). Per double-stream block (FLUX's):
    24 B d^2 (modulations) + 8 B J d^2 (q, k, v, out of both streams) + 4 B J d m (the two MLPs) + 4 B J^2 d (the
    joint attention). Per refiner block (on the L Qwen tokens, MLP 4d): 8 B L d^2 + 4 B L^2 d + 4 B L d (4d) + 4 B d^2.
    Plus, once: the patch embed 2 B S (C p_t p^2) d; the refiner's proj_in 2 B L D_t d, its timestep embedder
    2 B (256 d + d^2) and its pooled-text embedder 2 B (D_t d + d^2); the model's timestep embedder 2 B (256 d + d^2);
    the ByT5 projection 2 B L2 (D_2 H_2 + H_2^2 + H_2 d); the head 4 B d^2 + 2 B S d (p_t p^2 C_out). Norms, RoPE,
    the condition-type rows (a lookup), the masked mean and the activations are element-wise."""
    b, c, f, h, w = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    mlp = int(d * float(t.get("mlp_ratio", 4.0)))
    n, r = int(t["num_layers"]), int(t.get("num_refiner_layers", 2))
    p, pt = int(t.get("patch_size", 1)), int(t.get("patch_size_t", 1))
    cout = int(t.get("out_channels") or c)
    dt, d2, h2 = int(t.get("text_embed_dim", 3584)), int(t.get("text_embed_2_dim", 1472)), HUNYUAN_VIDEO15_BYT5_HIDDEN
    s, txt, txt2 = (f // pt) * (h // p) * (w // p), int(text_len), int(text_2_len)
    j = s + txt + txt2
    attn = 4 * b * j * j * d
    double = 24 * b * d * d + 8 * b * j * d * d + 4 * b * j * d * mlp
    refiner_attn = 4 * b * txt * txt * d
    refiner = 8 * b * txt * d * d + 4 * b * txt * d * (4 * d) + 4 * b * d * d
    time = 2 * b * (HUNYUAN_VIDEO_TIME_PROJ * d + d * d)
    embed = (2 * b * s * (c * pt * p * p) * d + 2 * b * txt * dt * d + time + 2 * b * (dt * d + d * d) + time
             + 2 * b * txt2 * (d2 * h2 + h2 * h2 + h2 * d))
    head = 4 * b * d * d + 2 * b * s * d * (pt * p * p * cout)
    total = n * (double + attn) + r * (refiner + refiner_attn) + embed + head
    attention = n * attn + r * refiner_attn
    return {"total": float(total), "per_block": float(double + attn), "attention": float(attention),
            "linear": float(total - attention), "tokens": s}


class HunyuanVideo15TorchReference(KeywordTorchReference):
    """diffusers' ``HunyuanVideo15Transformer3DModel`` called as ``HunyuanVideo15Pipeline`` calls it: the latents with
    the zero condition channels, the timestep, the Qwen and ByT5 states with their masks (the model's dtype), the
    zero image embeddings (text-to-video). The pipeline calls it once per guider half; here once on both halves."""

    diffusers_class = "HunyuanVideo15Transformer3DModel"

    call_args = {"hidden_states": LATENTS, "timestep": Arg("t"), "encoder_hidden_states": EMBEDS,
                 "encoder_attention_mask": Arg("mask", "model"), "encoder_hidden_states_2": Arg("embeds_2", "model"),
                 "encoder_attention_mask_2": Arg("mask_2", "model")}

    def set_inputs(self, inputs, w):
        super().set_inputs(inputs, w)
        b = inputs["latents"].shape[0]
        self.kwargs["image_embeds"] = self.torch.zeros(b, HUNYUAN_VIDEO15_VISION_TOKENS,
                                                       int(w.transformer.get("image_embed_dim", 1152)),
                                                       dtype=self.dtype, device=self.device)


class HunyuanVideo15(HunyuanVideo):
    """HunyuanVideo-1.5 text-to-video: the guider's CFG (both halves per prompt by default), one double-stream stack,
    the text [ByT5; Qwen] as the masked context."""

    name = "hunyuan_video15"
    module_name = "xdit_jax.models.hunyuan_video15"
    model_class_name = "HunyuanVideo15Transformer3DModel"
    config_class_name = "HunyuanVideo15Config"
    title = "HunyuanVideo-1.5"
    default_cfg = True

    def pipeline_call(self, w):
        return Family.pipeline_call(self, w)  # (guidance_scale: the guider's; 1.0 runs one pass)

    def text_len(self, w):
        """Qwen tokens after the template's crop: the pipeline's ``max_sequence_length`` (1000)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 1000)

    def tokens(self, w):
        s, _ = super().tokens(w)
        return s, self.text_len(w) + HUNYUAN_VIDEO15_BYT5_TOKENS

    def kv_text_tokens(self, w):
        return self.tokens(w)[1]  # the context [ByT5; Qwen]

    def check(self, cfg, shape):
        if shape[1] != cfg.in_channels:
            raise ValueError(f"latents {shape}: this HunyuanVideo-1.5 transformer takes {cfg.in_channels} channels "
                             "(the latents, the condition latents and the mask).")

    def with_layers(self, transformer, layers):
        """``--layers N``: N double-stream blocks."""
        return dict(transformer, num_layers=int(layers))

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.latent_shape(w)[2], "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width, "num_frames": w.num_frames,
                "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``HunyuanVideo15Pipeline`` passes them: latents (B, in_channels, F, h, w) (noise, then the zero
        condition channels), Qwen states (B, L, text_embed_dim) and mask (the prompt's valid tokens; with CFG the
        negative prompt's first), ByT5 states (B, 256, text_embed_2_dim) and mask (a quoted word's bytes in the
        prompt; none in the negative prompt ""), the timestep (B,) float32."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        shape = self.latent_shape(w)
        latents = np.zeros(shape, np.float32)
        c = int(t.get("out_channels") or 32)
        latents[:, :c] = rng.standard_normal((shape[0], c) + shape[2:], dtype=np.float32)
        return {"latents": latents,
                "embeds": rng.standard_normal((b, self.text_len(w), int(t.get("text_embed_dim", 3584))),
                                              dtype=np.float32),
                "mask": self.mask(w),
                "embeds_2": rng.standard_normal((b, HUNYUAN_VIDEO15_BYT5_TOKENS, int(t.get("text_embed_2_dim", 1472))),
                                                dtype=np.float32),
                "mask_2": pixart_mask(b, HUNYUAN_VIDEO15_BYT5_TOKENS, HUNYUAN_VIDEO15_GLYPH_VALID, False) * (
                    np.arange(b)[:, None] >= (b // 2 if w.cfg else 0)).astype(np.int32),
                "t": np.full((b,), HUNYUAN_VIDEO_TIMESTEP, dtype=np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), inputs["mask"],
                inputs["embeds_2"].astype(dtype), inputs["mask_2"])

    def analytic_flops(self, w):
        return hunyuan_video15_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return HunyuanVideo15TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Qwen-Image
# ============================================================================================

QWEN_IMAGE_TIME_PROJ = 256  # the sinusoidal timestep projection width
# The transformer's ``timestep``: QwenImagePipeline passes t / 1000 (0.5: mid-schedule, exact in bf16)
QWEN_IMAGE_TIMESTEP = 0.5
# Qwen2.5-VL states of the prompt (after the template's 34): the prompt's own length, not padded to a fixed one; a
# prompt of a sentence or two
QWEN_IMAGE_TEXT_TOKENS = 64
QWEN_IMAGE_TRUE_CFG = 4.0  # QwenImagePipeline's default true_cfg_scale


def qwen_image_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one Qwen-Image transformer forward (2 FLOPs per multiply-add).

    Packed latents (B, S, C): S = (H/16)(W/16) image tokens, C = in_channels (64); L = Qwen2.5-VL tokens
    (``text_len``; every one computed, padded ones masked as keys, not skipped), J = S + L, d = heads x head_dim
    (3072), D_j = joint_attention_dim (3584), C_out = out_channels (16), p = patch_size (2), N blocks (60). Per
    block (FLUX's double-stream block):

        modulations img_mod, txt_mod (d -> 6d each)         2 x 2 B d (6d)        = 24 B d^2
        q, k, v, out of both streams                        4 x 2 B J d^2         =  8 B J d^2
        joint attention QK^T and PV over [text; image]      2 x 2 B J^2 d         =  4 B J^2 d
        the two MLPs d -> 4d -> d                           2 x 2 B J d (4d)      = 16 B J d^2
                                                   together 24 B d^2 + 24 B J d^2 + 4 B J^2 d

    Plus, once: img_in 2 B S C d; txt_in 2 B L D_j d; the timestep embedder (256 -> d -> d) 2 B (256 d + d^2);
    the head: norm_out's modulation (d -> 2d) 4 B d^2 and proj_out 2 B S d (p^2 C_out). The text RMSNorm, the
    q/k norms, RoPE (host tables), the sinusoids, GELU, SiLU and the gates are element-wise."""
    b, s, c = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    n, p = int(t["num_layers"]), int(t.get("patch_size", 2))
    cout = int(t.get("out_channels") or c)
    dj, txt = int(t.get("joint_attention_dim", 3584)), int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    block = 24 * b * d * d + 24 * b * j * d * d
    embed = 2 * b * s * c * d + 2 * b * txt * dj * d + 2 * b * (QWEN_IMAGE_TIME_PROJ * d + d * d)
    head = 4 * b * d * d + 2 * b * s * d * (p * p * cout)
    total = n * (block + attn) + embed + head
    return {"total": float(total), "per_block": float(block + attn), "attention": float(n * attn),
            "linear": float(total - n * attn), "tokens": s}


QWEN_EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def qwen_img_shapes(img_shape: np.ndarray) -> list[tuple[int, ...]]:
    """The host array ``img_shape`` ((3,) one grid, or (K, 3): the noisy latents' then the condition images') as the
    transformer's ``img_shapes`` of one sample."""
    return [tuple(int(v) for v in row) for row in np.asarray(img_shape).reshape(-1, 3)]


class QwenImageTorchReference(TorchReference):
    """diffusers' ``QwenImageTransformer2DModel`` called as ``QwenImagePipeline`` calls it: packed latents and
    Qwen2.5-VL states in the model's dtype, their mask, ``timestep`` = t / 1000 in the latents' dtype, ``img_shapes``
    [(1, H/16, W/16)] per sample (the edit pipelines': the condition image's grid after it). With true CFG the
    pipeline calls it once per half (each half's own text length); here once on both halves, the negative prompt's
    text padded and masked (the same work as ours)."""

    diffusers_class = "QwenImageTransformer2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x, self.enc, self.t = put("latents", self.dtype), put("embeds", self.dtype), put("t", self.dtype)
        self.mask = put("mask")
        self.img_shapes = [qwen_img_shapes(inputs["img_shape"])] * inputs["latents"].shape[0]

    def _forward(self):
        return self.model(hidden_states=self.x, encoder_hidden_states=self.enc, encoder_hidden_states_mask=self.mask,
                          timestep=self.t, img_shapes=self.img_shapes, return_dict=False)[0]


class QwenImage(Family):
    name = "qwenimage"
    module_name = "xdit_jax.models.qwenimage"
    model_class_name = "QwenImageTransformer2DModel"
    config_class_name = "QwenImageConfig"
    token_word = "image"
    title = "Qwen-Image"
    # true CFG (QwenImagePipeline's default true_cfg_scale 4 with a negative prompt; its model card's use): both
    # halves per prompt; --no-cfg for one sample (no negative prompt)
    default_cfg = True
    host_inputs = ("img_shape",)

    def pipeline_call(self, w):
        """Qwen-Image has no guidance_scale: CFG is diffusers' "true CFG" (a negative prompt, true_cfg_scale); an edit
        pipeline also gets an image (random, of the output's size)."""
        kw = {k: v for k, v in super().pipeline_call(w).items() if k != "guidance_scale"}
        if self.edit(w):
            kw["image"] = np.random.default_rng(0).integers(0, 256, (w.height, w.width, 3), dtype=np.uint8)
        return dict(kw, negative_prompt=" ", true_cfg_scale=QWEN_IMAGE_TRUE_CFG) if w.cfg else \
            dict(kw, true_cfg_scale=1.0)

    def grid(self, w) -> tuple[int, int]:
        """The packed token grid (H/16, W/16): 2 x 2 patches of the VAE latent."""
        m = 2 * w.vae_scale_spatial
        if w.height % m or w.width % m or w.height <= 0 or w.width <= 0:
            raise ValueError(f"Qwen-Image packs 2 x 2 patches of the {w.vae_scale_spatial}x VAE latent: height and "
                             f"width must be positive multiples of {m}; got {w.height}x{w.width}.")
        return w.height // m, w.width // m

    def edit(self, w) -> str | None:
        """The edit pipeline the workload steps as (its folder's, or the preset's), else None."""
        cls = self.pipeline_class(w)
        return cls if cls in QWEN_EDIT_PIPELINES else None

    def _image_sizes(self, w) -> tuple[tuple[int, int], tuple[int, int]]:
        """An edit workload's one condition image (an image of the output's aspect ratio), as the pipelines size it:
        ((height, width) for the VAE: ``vae_image_area`` pixels (1024^2; defaults.json may say), (height, width) that
        Qwen2.5-VL sees: the same (Edit), or at ``condition_image_area`` (384^2, Plus), before its processor's
        resize)."""
        from xdit_jax.pipelines import qwenimage_edit as qe

        ratio = w.width / w.height
        vw, vh = qe.calculate_dimensions(int(w.defaults.get("vae_image_area", qe.VAE_IMAGE_AREA)), ratio)
        if self.edit(w) == "QwenImageEditPipeline":
            return (vh, vw), (vh, vw)
        cw, ch = qe.calculate_dimensions(int(w.defaults.get("condition_image_area", qe.CONDITION_IMAGE_AREA)), ratio)
        return (vh, vw), (ch, cw)

    def condition_grid(self, w) -> tuple[int, int] | None:
        """An edit workload's condition image's packed grid (its VAE size / 16), else None."""
        if not self.edit(w):
            return None
        (vh, vw), _ = self._image_sizes(w)
        m = 2 * w.vae_scale_spatial
        return vh // m, vw // m

    def vision_tokens(self, w) -> int:
        """An edit workload's Qwen2.5-VL image tokens in the prompt (its processor's resize to multiples of patch x
        merge within its pixel bounds, one token per merged patch), else 0."""
        if not self.edit(w):
            return 0
        import json
        from pathlib import Path

        from xdit_jax.models import qwen2_5_vl_vision as qv

        conf = Path(w.folder) / "processor" / "preprocessor_config.json" if w.folder else None
        proc = qv.ProcessorConfig.from_dict(json.loads(conf.read_text())) if conf is not None and conf.exists() \
            else qv.ProcessorConfig()
        _, (ch, cw) = self._image_sizes(w)
        f = proc.patch_size * proc.merge_size
        h, ww = qv.smart_resize(ch, cw, f, proc.min_pixels, proc.max_pixels)
        return (h // f) * (ww // f)

    def image_grids(self, w) -> list[tuple[int, int, int]]:
        """The transformer's ``img_shapes`` of one sample: the noisy latents' grid, then an edit's condition image's."""
        cond = self.condition_grid(w)
        return [(1,) + self.grid(w)] + ([(1,) + cond] if cond else [])

    def latent_shape(self, w):
        return w.step_batch, sum(f * h * ww for f, h, ww in self.image_grids(w)), int(w.transformer.get("in_channels",
                                                                                                        64))

    def tokens(self, w):
        return self.latent_shape(w)[1], self.text_len(w)

    def text_len(self, w):
        """Qwen2.5-VL states: the workload's, else a prompt's 64 (+ an edit's image tokens in its template)."""
        return int(w.text_tokens or QWEN_IMAGE_TEXT_TOKENS + self.vision_tokens(w))

    def mask(self, w) -> np.ndarray:
        """(B, L) int32 text mask: the prompt's tokens all valid (its states are cut to its length); with true CFG
        the negative prompt " " first (1 token, padded to the prompt's length and masked)."""
        return pixart_mask(w.step_batch, self.text_len(w), self.text_len(w), w.cfg)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the image tokens; the text joins as a context

    def check(self, cfg, shape):
        if shape[2] != cfg.in_channels:
            raise ValueError(f"packed latents {shape}: this Qwen-Image transformer takes {cfg.in_channels} channels.")

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        cond = self.condition_grid(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "height": w.height,
                "width": w.width, "true_cfg": w.cfg, "edit": self.edit(w),
                "condition_tokens": cond[0] * cond[1] if cond else 0, "zero_cond_t": bool(cfg.zero_cond_t)}

    def make_inputs(self, w, seed=0):
        """As ``QwenImagePipeline`` passes them: packed latents (B, S, in_channels) (an edit's: the condition image's
        packed latents after the noisy ones), Qwen2.5-VL states (B, L, joint_attention_dim), their mask (B, L), the
        timestep t / 1000 (B,) and the packed grids (K, 3) (:meth:`image_grids`; a host array: the RoPE tables are
        made from it before the step, as the pipeline does)."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                "embeds": rng.standard_normal((b, txt, int(t.get("joint_attention_dim", 3584))), dtype=np.float32),
                "mask": self.mask(w), "t": np.full((b,), QWEN_IMAGE_TIMESTEP, dtype=np.float32),
                "img_shape": np.array(self.image_grids(w), np.int64)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["mask"], inputs["t"], None,
                None, qwen_img_shapes(inputs["img_shape"]))

    def analytic_flops(self, w):
        out = qwen_image_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))
        if w.transformer.get("zero_cond_t"):  # timestep 0's embedding and every block's image modulation of it
            t = w.transformer
            b, d = w.step_batch, int(t["num_attention_heads"]) * int(t["attention_head_dim"])
            extra = 2 * b * (QWEN_IMAGE_TIME_PROJ * d + d * d) + int(t["num_layers"]) * 12 * b * d * d
            out = dict(out, total=out["total"] + extra, linear=out["linear"] + extra)
        return out

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return QwenImageTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Z-Image
# ============================================================================================

ZIMAGE_TIMESTEP = 0.5  # the transformer's ``timestep``: ZImagePipeline's (1000 - t) / 1000, mid-schedule
ZIMAGE_CAPTION_TOKENS = 64  # a typical prompt's kept Qwen3 tokens in the chat template (~50), padded to 32s
ZIMAGE_FREQ_DIM = 256  # the timestep sinusoids' width (TimestepEmbedder's frequency_embedding_size)
ZIMAGE_T_MID = 1024  # TimestepEmbedder's mid_size


def zimage_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], caption_tokens: int) -> dict[str, float]:
    """Matmul FLOPs of one Z-Image transformer forward (2 FLOPs per multiply-add).

    Latents (B, C, H, W); X0 = (H/p)(W/p) image tokens, X = X0 padded to a multiple of 32 (the learned pad token),
    L = the caption array's tokens padded to 32 (every one computed; those past a prompt's ``ceil32(n)`` masked as
    keys), d = dim (3840), f = int(d / 3 * 8) (the SwiGLU width), a = min(d, 256) (the adaLN input), D_c =
    cap_feat_dim (2560), N main layers and R refiner layers of each kind (30, 2). Per block: q, k, v, out 8 T d^2
    over its T tokens, attention QK^T and PV 4 T^2 d (T: X for the noise refiner, L for the context refiner, X + L
    for the main layers: the image queries and keys with the caption's), the SwiGLU FFN (w1, w3, w2) 6 T d f, and
    in the modulated ones (noise refiner, main layers) the adaLN linear 2 B a (4d). Once: the timestep MLP
    2 B (256 x 1024 + 1024 a), the patch embed 2 B X0 (p^2 C) d, the caption embed 2 B L D_c d, and the final
    layer: its modulation 2 B a d and linear 2 B X0 d (p^2 C). Norms, RoPE (host tables), the pad tokens, tanh /
    SiLU and the gates are element-wise."""
    b, c, h, w = latent_shape
    t = transformer
    d, n, r = int(t.get("dim", 3840)), int(t.get("n_layers", 30)), int(t.get("n_refiner_layers", 2))
    p = int((t.get("all_patch_size") or [2])[0])
    f, a = int(d / 3 * 8), min(d, 256)
    dc = int(t.get("cap_feat_dim", 2560))
    x0 = (h // p) * (w // p)
    x, cap = -(-x0 // 32) * 32, -(-int(caption_tokens) // 32) * 32

    def block(tokens, modulated):
        return b * (8 * tokens * d * d + 4 * tokens * tokens * d + 6 * tokens * d * f) + (
            2 * b * a * 4 * d if modulated else 0)

    attention = b * 4 * d * (n * (x + cap) ** 2 + r * (x * x + cap * cap))
    main, noise, context = block(x + cap, True), block(x, True), block(cap, False)
    once = 2 * b * (ZIMAGE_FREQ_DIM * ZIMAGE_T_MID + ZIMAGE_T_MID * a) + 2 * b * x0 * p * p * c * d \
        + 2 * b * cap * dc * d + 2 * b * a * d + 2 * b * x0 * d * p * p * c
    total = n * main + r * (noise + context) + once
    return {"total": float(total), "per_block": float(main), "attention": float(attention),
            "linear": float(total - attention), "tokens": x0}


class ZImageTorchReference(TorchReference):
    """diffusers' ``ZImageTransformer2DModel`` called as ``ZImagePipeline`` calls it: a list of (C, 1, h, w) latents,
    the timestep (1000 - t) / 1000, a list of each prompt's kept caption features; the output list stacked. With CFG
    the pipeline calls it on both halves in one list, as here."""

    diffusers_class = "ZImageTransformer2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        x, enc = put("latents", self.dtype), put("embeds", self.dtype)
        lens = inputs["lens"]
        self.x = list(x.unsqueeze(2).unbind(0))
        self.caps = [enc[i, :int(lens[i])] for i in range(enc.shape[0])]
        self.t = put("t")

    def _forward(self):
        out = self.model(self.x, self.t, self.caps, return_dict=False)[0]
        return self.torch.stack([o[:, 0] for o in out])


class ZImage(Family):
    name = "zimage"
    module_name = "xdit_jax.models.zimage"
    model_class_name = "ZImageTransformer2DModel"
    config_class_name = "ZImageConfig"
    token_word = "image"
    title = "Z-Image"
    # Z-Image-Turbo runs without CFG (guidance 0): one sample per prompt; --cfg doubles it (guidance > 0)
    default_cfg = False

    def pipeline_call(self, w):
        """CFG runs for any guidance_scale > 0: 0 without it (Turbo), the pipeline's default scale with it."""
        kw = {k: v for k, v in super().pipeline_call(w).items() if k != "guidance_scale"}
        return kw if w.cfg else dict(kw, guidance_scale=0.0)

    def latent_shape(self, w):
        """(B, C, H/8, W/8), diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int((w.transformer.get("all_patch_size") or [2])[0])
        return (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        """The caption array's tokens (the pipeline crops it to the batch's longest prompt rounded up to 32)."""
        return int(w.text_tokens or ZIMAGE_CAPTION_TOKENS)

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or self.text_len(w)), self.text_len(w))

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the image tokens; the caption joins as a context

    def check(self, cfg, shape):
        if shape[1] != cfg.in_channels or shape[2] % cfg.patch_size or shape[3] % cfg.patch_size:
            raise ValueError(f"latents {shape}: this Z-Image transformer takes {cfg.in_channels} channels and sizes "
                             f"that are multiples of {cfg.patch_size}.")

    def with_layers(self, transformer, layers):
        """``--layers N``: N main layers (the two refiners kept)."""
        return dict(transformer, n_layers=int(layers))

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "layers": cfg.n_layers, "refiner_layers": cfg.n_refiner_layers, "heads": cfg.n_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``ZImagePipeline`` passes them: latents (B, C, h, w), the caption features (B, L, cap_feat_dim) of which
        the first ``lens`` rows are each prompt's kept tokens (the rest zeros), and the timestep (B,) float32."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        embeds = rng.standard_normal((b, txt, int(t.get("cap_feat_dim", 2560))), dtype=np.float32)
        lens = np.full((b,), self.text_valid(w), np.int32)
        embeds[:, self.text_valid(w):] = 0.0
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32), "embeds": embeds,
                "lens": lens, "t": np.full((b,), ZIMAGE_TIMESTEP, dtype=np.float32)}

    def embed_args(self, inputs, dtype):
        return inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), inputs["lens"]

    def analytic_flops(self, w):
        return zimage_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return ZImageTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Lumina 2 (Z-Image's blocks: the family below is Z-Image's with Lumina 2's sizes and inputs)
# ============================================================================================

LUMINA2_TIMESTEP = 0.5  # the transformer's ``timestep``: Lumina2Pipeline's 1 - t / 1000, mid-schedule
# a typical prompt behind diffusers' system prompt: ~40 + ~60 Gemma tokens kept, the caption array cropped to 32s
LUMINA2_CAPTION_TOKENS = 128
LUMINA2_FREQ_DIM = 256  # the timestep sinusoids' width (Lumina2CombinedTimestepCaptionEmbedding's)


def lumina2_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], caption_tokens: int) -> dict[str, float]:
    """Matmul FLOPs of one Lumina 2 transformer forward (2 FLOPs per multiply-add).

    Latents (B, C, H, W); X = (H/p)(W/p) image tokens (no pad tokens), L = the caption array's tokens (every one
    computed; those past a prompt's count masked as keys), d = hidden_size (2304), H heads over K K/V heads of
    d / H (24, 8), f = ``LuminaFeedForward``'s 4d rounded up to ``multiple_of`` (9216), a = min(d, 1024) (the adaLN
    input and the timestep MLP's width), D_c = cap_feat_dim (2304), N main layers and R refiner layers of each kind
    (26, 2). Per block over its T tokens: q and out 4 T d^2, k and v 4 T d (K d / H), attention QK^T and PV 4 T^2 d
    (K/V repeated to the H heads first: T = X for the noise refiner, L for the context refiner, X + L for the main
    layers), the SwiGLU FFN 6 T d f, and in the modulated ones (noise refiner, main layers) the adaLN linear
    2 B a (4d). Once: the timestep MLP 2 B (256 a + a^2), the patch embed 2 B X (p^2 C) d, the caption embed
    2 B L D_c d, and the final layer: its modulation 2 B a d and linear 2 B X d (p^2 C). Norms, RoPE (host
    tables), tanh / SiLU and the gates are element-wise."""
    from xdit_jax.models.lumina2 import Lumina2Config

    b, c, h, w = latent_shape
    cfg = Lumina2Config.from_dict(transformer)
    d, n, r, p = cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.patch_size
    f, a, dc = cfg.ffn_dim, cfg.adaln_dim, cfg.cap_feat_dim
    dkv = cfg.kv_heads * cfg.attention_head_dim
    x, cap = (h // p) * (w // p), int(caption_tokens)

    def block(tokens, modulated):
        return b * (4 * tokens * d * d + 4 * tokens * d * dkv + 4 * tokens * tokens * d + 6 * tokens * d * f) + (
            2 * b * a * 4 * d if modulated else 0)

    attention = b * 4 * d * (n * (x + cap) ** 2 + r * (x * x + cap * cap))
    main, noise, context = block(x + cap, True), block(x, True), block(cap, False)
    once = 2 * b * (LUMINA2_FREQ_DIM * a + a * a) + 2 * b * x * p * p * c * d + 2 * b * cap * dc * d \
        + 2 * b * a * d + 2 * b * x * d * p * p * c
    total = n * main + r * (noise + context) + once
    return {"total": float(total), "per_block": float(main), "attention": float(attention),
            "linear": float(total - attention), "tokens": x}


class Lumina2TorchReference(TorchReference):
    """diffusers' ``Lumina2Transformer2DModel`` called as ``Lumina2Pipeline`` calls it: latents (B, C, h, w), the
    timestep 1 - t / 1000, the caption states (B, L, cap_feat_dim) with their attention mask (B, L); with CFG the
    two halves in one batch (the pipeline makes two calls; the masked keys make the batch the same math)."""

    diffusers_class = "Lumina2Transformer2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x, self.enc = put("latents", self.dtype), put("embeds", self.dtype)
        lens = np.asarray(inputs["lens"])
        mask = (np.arange(self.enc.shape[1])[None] < lens[:, None]).astype(np.int64)
        self.mask = self.torch.from_numpy(mask).to(self.x.device)
        self.t = put("t")

    def _forward(self):
        return self.model(self.x, self.t, self.enc, self.mask, return_dict=False)[0]


class Lumina2(ZImage):
    name = "lumina2"
    module_name = "xdit_jax.models.lumina2"
    model_class_name = "Lumina2Transformer2DModel"
    config_class_name = "Lumina2Config"
    title = "Lumina 2"
    default_cfg = True  # diffusers' default guidance 4: both halves per prompt

    def pipeline_call(self, w):
        """CFG runs for guidance_scale > 1: 1 without it, the pipeline's default scale (4) with it."""
        return Family.pipeline_call(self, w)

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        """The caption array's tokens (the pipeline crops it to the batch's longest prompt rounded up to 32)."""
        return int(w.text_tokens or LUMINA2_CAPTION_TOKENS)

    def check(self, cfg, shape):
        if shape[1] != cfg.in_channels or shape[2] % cfg.patch_size or shape[3] % cfg.patch_size:
            raise ValueError(f"latents {shape}: this Lumina 2 transformer takes {cfg.in_channels} channels and sizes "
                             f"that are multiples of {cfg.patch_size}.")

    def with_layers(self, transformer, layers):
        """``--layers N``: N main layers (the two refiners kept)."""
        return dict(transformer, num_layers=int(layers))

    def row_fields(self, w, cfg):
        return dict(super().row_fields(w, cfg), kv_heads=cfg.kv_heads)

    def make_inputs(self, w, seed=0):
        """As ``Lumina2Pipeline`` passes them: latents (B, C, h, w), the caption states (B, L, cap_feat_dim) of which
        the first ``lens`` rows are each prompt's kept tokens (the rest zeros here), and the timestep (B,)."""
        inputs = super().make_inputs(w, seed)
        inputs["t"] = np.full_like(inputs["t"], LUMINA2_TIMESTEP)
        return inputs

    def analytic_flops(self, w):
        return lumina2_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return Lumina2TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# SANA
# ============================================================================================

SANA_TEXT_VALID = 40  # a typical prompt's Gemma tokens of the 300 the pipeline keeps (BOS + the last 299)


def sana_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul and convolution FLOPs of one SANA transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = (h/p)(w/p) image tokens, L = caption tokens, d = heads * head_dim (hd),
    d_c = cross_attention_dim, C_cap = caption_channels, m = int(mlp_ratio d) (GLUMBConv's hidden width), layers N.
    Per block:

        linear self-attention q, k, v, out       8 B S d^2
        linear attention K^T [V; 1] and Q (.)    4 B S d (hd + 1)
        cross-attention q, out                   4 B S d^2
        cross-attention k, v (caption)           4 B L d_c d
        cross-attention QK^T and PV              4 B S L d
        GLUMBConv 1x1 d -> 2m, 1x1 m -> d        6 B S d m
        GLUMBConv depthwise 3x3 over 2m          36 B S m

    plus, once: patch embedding 2 B S (C_in p^2) d; timestep embedding 2 B (256 d + d^2) and the block modulation
    2 B d (6d); the caption projection 2 B L (C_cap d + d^2); the output projection 2 B S d (p^2 C_out). Norms,
    ReLU, SiLU, the modulations: element-wise.
    """
    b, c, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 1))
    heads, hd = int(t["num_attention_heads"]), int(t["attention_head_dim"])
    d = heads * hd
    dc = int(t.get("cross_attention_dim") or d)
    m = int(float(t.get("mlp_ratio", 2.5)) * d)
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    cap = int(t.get("caption_channels", 2304))
    s = (h // p) * (w // p)
    txt = text_len
    self_proj, self_attn = 8 * b * s * d * d, 4 * b * s * d * (hd + 1)
    cross_proj, cross_attn = 4 * b * s * d * d + 4 * b * txt * dc * d, 4 * b * s * txt * d
    ff = 6 * b * s * d * m + 36 * b * s * m
    tp = PIXART_TIME_PROJ
    embed = 2 * b * s * (c * p * p) * d + 2 * b * (tp * d + d * d) + 2 * b * d * 6 * d + 2 * b * txt * (cap * d + d * d)
    head = 2 * b * s * d * (p * p * cout)
    block = self_proj + self_attn + cross_proj + cross_attn + ff
    attention = self_attn + cross_attn
    return {"total": float(layers * block + embed + head), "per_block": float(block),
            "attention": float(layers * attention),
            "linear": float(layers * (block - attention) + embed + head), "tokens": s}


SANA_SPRINT_TIMESTEP = 0.5  # Sprint's transformer timestep: the SCM angle's sin / (cos + sin), in (0, 1); mid-way
SANA_SPRINT_GUIDANCE = 4.5  # SanaSprintPipeline's default guidance_scale (embedded, x guidance_embeds_scale)


class SanaTorchReference(KeywordTorchReference):
    """diffusers' ``SanaTransformer2DModel``, called as ``SanaPipeline`` calls it (the caption mask); Sprint's
    (``guidance_embeds``) as ``SanaSprintPipeline``: with the scaled guidance."""

    diffusers_class = "SanaTransformer2DModel"

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t"),
                 "encoder_attention_mask": Arg("mask"), "guidance": Arg("guidance", "model", optional=True)}


class Sana(PixArt):
    """SANA: PixArt's workload shapes (image tokens, a masked caption); linear self-attention and GLUMBConv: under
    PipeFusion no K/V buffers but the token mixers' (:meth:`pipefusion_cache`)."""

    name = "sana"
    module_name = "xdit_jax.models.sana"
    model_class_name = "SanaTransformer2DModel"
    config_class_name = "SanaConfig"
    title = "SANA"

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 1))
        return (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        return int(w.text_tokens or w.defaults.get("max_sequence_length", 300))

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or SANA_TEXT_VALID), self.text_len(w))

    @staticmethod
    def sprint(w) -> bool:
        """Sana Sprint: the guidance embedded (``guidance_embeds``), one sample per prompt, SCM timesteps."""
        return bool(w.transformer.get("guidance_embeds"))

    def cfg_default(self, w):
        return False if self.sprint(w) else self.default_cfg

    def check_cfg(self, w):
        if self.sprint(w) and w.cfg:
            raise ValueError(f"{w.name}: Sana Sprint embeds its guidance (no CFG batch): drop --cfg.")

    def pipeline_call(self, w):
        """As :meth:`Family.pipeline_call`; Sprint without guidance_scale 1 (its guidance is embedded, never off)."""
        kw = super().pipeline_call(w)
        return {k: v for k, v in kw.items() if k != "guidance_scale"} if self.sprint(w) else kw

    def pipefusion_cache(self, cfg, mesh, layers, latent_shape, seq: int, dtype, patches: int, abstract: bool):
        from xdit_jax.parallel import pipefusion

        slots = pipefusion.stack_sizes(layers)[0]
        return (pipefusion.init_mixing(mesh, slots, latent_shape[0], seq, latent_shape[3] // cfg.patch_size,
                                       cfg.num_attention_heads, cfg.attention_head_dim, 2 * cfg.ff_hidden, dtype,
                                       patches, abstract=abstract),)

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[1], shape[2], shape[3])

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "height": w.height, "width": w.width, "sprint": self.sprint(w)}

    def make_inputs(self, w, seed=0):
        """Latents (B, C, h, w), Gemma states (B, L, caption_channels), timesteps (B,) and the caption mask (B, L)
        (the negative prompt "": its BOS only), as the pipeline passes them; Sprint: the timestep a float in (0, 1)
        and ``guidance`` (B,) = guidance_scale x guidance_embeds_scale, as ``SanaSprintPipeline``."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        out = {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
               "embeds": rng.standard_normal((b, txt, int(t.get("caption_channels", 2304))), dtype=np.float32),
               "t": np.full((b,), 500, dtype=np.int64), "mask": pixart_mask(b, txt, self.text_valid(w), w.cfg)}
        if self.sprint(w):
            scale = float(w.defaults.get("guidance_scale", SANA_SPRINT_GUIDANCE))
            out["t"] = np.full((b,), SANA_SPRINT_TIMESTEP, np.float32)
            out["guidance"] = np.full((b,), scale * float(t.get("guidance_embeds_scale", 0.1)), np.float32)
        return out

    def embed_args(self, inputs, dtype):
        guidance = inputs["guidance"].astype(dtype) if "guidance" in inputs else None
        return inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["mask"], guidance

    def analytic_flops(self, w):
        out = sana_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))
        if self.sprint(w):  # Sprint's guidance embedder (256 -> d -> d) beside the timestep's
            t = w.transformer
            b, d = self.latent_shape(w)[0], int(t["num_attention_heads"]) * int(t["attention_head_dim"])
            extra = 2 * b * (PIXART_TIME_PROJ * d + d * d)
            out = dict(out, total=out["total"] + extra, linear=out["linear"] + extra)
        return out

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return SanaTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Chroma
# ============================================================================================

CHROMA_TEXT_VALID = PIXART_TEXT_VALID  # a typical prompt's T5 tokens (the mask keeps them and one padding token)


def chroma_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one Chroma transformer forward (2 FLOPs per multiply-add), with the pipeline's text mask.

    FLUX.1's count (:func:`flux_analytic_flops`: B, S image tokens, L T5 tokens, J = S + L, d = heads x head_dim,
    C, C_out, D_j) without the per-block modulation linears, the pooled-text and timestep embedders and the head's
    modulation: a double- and a single-stream block each cost 24 B J d^2 in their linears, their attention QK^T
    and PV over J: 4 B J^2 d (the masked text keys are computed, then dropped). Once: x_embedder 2 B S C d,
    context_embedder 2 B L D_j d, proj_out 2 B S d C_out, and the approximator on its R = 3 M + 12 N + 2 rows
    (N double-, M single-stream blocks): in_proj 2 B R a h, n_a residual layers of two h x h linears 4 B R h^2
    each, out_proj 2 B R h d (a = approximator_num_channels, h = approximator_hidden_dim, n_a =
    approximator_layers). Norms, RoPE, the sinusoids, GELU, SiLU and the gates are element-wise."""
    b, s, c = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    n, m = int(t["num_layers"]), int(t["num_single_layers"])
    p = int(t.get("patch_size", 1))
    cout = int(t.get("out_channels") or c)
    dj = int(t.get("joint_attention_dim", 4096))
    a, h, na = (int(t.get(k, v)) for k, v in (("approximator_num_channels", 64), ("approximator_hidden_dim", 5120),
                                               ("approximator_layers", 5)))
    txt = int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    block = 24 * b * j * d * d
    rows = 3 * m + 12 * n + 2
    approximator = 2 * b * rows * (a * h + 2 * na * h * h + h * d)
    embed = 2 * b * s * c * d + 2 * b * txt * dj * d + approximator
    head = 2 * b * s * d * (p * p * cout)
    total = (n + m) * (block + attn) + embed + head
    attention = (n + m) * attn
    return {"total": float(total), "per_block": float(block + attn), "per_single_block": float(block + attn),
            "attention": float(attention), "linear": float(total - attention), "tokens": s}


class ChromaTorchReference(TorchReference):
    """diffusers' ``ChromaTransformer2DModel`` as ``ChromaPipeline`` calls it (the packed latents and T5 states in
    the model's dtype, ``timestep`` = t / 1000, the ids) on the text CROPPED to the tokens the mask keeps (the
    prompt's and one padding token), with no mask: what ours computes with its real key mask (diffusers' own
    float mask is added to the logits, not a mask: huggingface/diffusers#12116; :mod:`xdit_jax.models.chroma`).
    Every sample keeps the same count here (:meth:`Chroma.make_inputs`): one call on the whole batch (both CFG
    halves; the pipeline calls it once per half, the same work)."""

    diffusers_class = "ChromaTransformer2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        text = inputs["embeds"].shape[1]
        kept = {int(k) for k in np.count_nonzero(inputs["mask"][:, :text], axis=1)}
        if len(kept) != 1:
            raise ValueError(f"the reference crops the text to one kept length for the batch; got {sorted(kept)}.")
        (kept,) = kept
        self.x, self.t = put("latents", self.dtype), put("t", self.dtype)
        self.enc = put("embeds", self.dtype)[:, :kept]
        self.img_ids, self.txt_ids = put("img_ids", self.dtype), put("txt_ids", self.dtype)[:kept]

    def _forward(self):
        return self.model(hidden_states=self.x, encoder_hidden_states=self.enc, timestep=self.t,
                          img_ids=self.img_ids, txt_ids=self.txt_ids, attention_mask=None, return_dict=False)[0]


class Chroma(Flux):
    """FLUX.1's shapes (packed 2 x 2 latents, T5 tokens); real CFG (both halves per prompt, ChromaPipeline's
    guidance 5); the text mask; one embed -> blocks -> head (the text as the context of both stacks)."""

    name = "chroma"
    module_name = "xdit_jax.models.chroma"
    model_class_name = "ChromaTransformer2DModel"
    config_class_name = "ChromaConfig"
    title = "Chroma"
    default_cfg = True

    def pipeline_call(self, w):
        return Family.pipeline_call(self, w)

    def reference_tokens(self, w) -> int:
        return 0

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "text_valid": self.text_valid(w),
                "layers": cfg.num_layers + cfg.num_single_layers, "double_layers": cfg.num_layers,
                "single_layers": cfg.num_single_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width,
                "approximator_layers": cfg.approximator_layers, "cfg": w.cfg}

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or CHROMA_TEXT_VALID), self.text_len(w))

    def make_inputs(self, w, seed=0):
        """As ``ChromaPipeline`` passes them: packed latents (B, S, in_channels), T5 states (B, L,
        joint_attention_dim), t / 1000 (B,), the float mask (B, L + S) (:meth:`text_valid` prompt tokens and one
        padding token, then the image's ones), and the host ids."""
        from xdit_jax.models.chroma import text_mask
        from xdit_jax.models.flux import image_ids

        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        latents = rng.standard_normal(self.latent_shape(w), dtype=np.float32)
        embeds = rng.standard_normal((b, txt, int(t.get("joint_attention_dim", 4096))), dtype=np.float32)
        tokenizer_mask = (np.arange(txt)[None] < self.text_valid(w)).repeat(b, 0).astype(np.int64)
        mask = np.concatenate([np.asarray(text_mask(tokenizer_mask)), np.ones((b, latents.shape[1]), np.float32)], 1)
        return {"latents": latents, "embeds": embeds, "t": np.full((b,), FLUX_TIMESTEP, dtype=np.float32),
                "mask": mask, "img_ids": image_ids(*self.grid(w)), "txt_ids": np.zeros((txt, 3), np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["img_ids"],
                inputs["txt_ids"], inputs["mask"])

    def mesh_forward(self):
        return None  # embed -> run_blocks(blocks, text=TEXT_KEYS) -> head

    def analytic_flops(self, w):
        return chroma_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return ChromaTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# FLUX.2
# ============================================================================================

FLUX2_TIMESTEP = 0.5  # the transformer's ``timestep``: Flux2KleinPipeline's t / 1000, mid-schedule (exact in bf16)
FLUX2_GUIDANCE = 4.0  # FLUX.2-dev's embedded guidance where ``guidance_embeds`` (klein: none)


def flux2_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one FLUX.2 transformer forward (2 FLOPs per multiply-add).

    B = batch, S = (H/16)(W/16) image tokens, L = text tokens (all of them: klein's Qwen3 padding included, no
    mask), J = S + L, d = heads x head_dim (klein 4B: 3072), m = int(d x mlp_ratio) (SwiGLU's width, 3d), C =
    in_channels (128), C_out = out_channels or C, D_j = joint_attention_dim (3 x the Qwen3 width), T =
    timestep_guidance_channels (256), N double- and M single-stream blocks. Once per forward (shared by the
    blocks): the three modulations of silu(temb): d -> 6d (image), d -> 6d (text), d -> 3d (single) = 30 B d^2.
    Per double-stream block (``Flux2TransformerBlock``, no biases):

        image q, k, v, out                                  4 x 2 B S d^2         =  8 B S d^2
        text q, k, v, to_add_out                            4 x 2 B L d^2         =  8 B L d^2
        joint attention QK^T and PV over [text; image]      2 x 2 B J^2 d         =  4 B J^2 d
        image SwiGLU d -> 2m, m -> d                        2 B S d (2m) + 2 B S m d = 6 B S d m
        text SwiGLU                                                               =  6 B L d m
                                                   together 8 B J d^2 + 6 B J d m + 4 B J^2 d

    Per single-stream block (``Flux2ParallelSelfAttention`` over all J tokens):

        to_qkv_mlp_proj d -> 3d + 2m                        2 B J d (3d + 2m)
        to_out [attention; SwiGLU] d + m -> d               2 B J (d + m) d
        attention QK^T and PV over J                                              =  4 B J^2 d
                                                   together 8 B J d^2 + 6 B J d m + 4 B J^2 d

    Plus: x_embedder 2 B S C d; context_embedder 2 B L D_j d; the timestep embedder (T -> d -> d) 2 B (T d + d^2),
    again for the guidance embedder where ``guidance_embeds`` (FLUX.2-dev); the head: norm_out's d -> 2d 4 B d^2 and
    proj_out 2 B S d C_out. Norms, q/k RMS norms, RoPE, sinusoids, SiLU gates: element-wise.
    """
    b, s, c = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    mlp = int(d * float(t.get("mlp_ratio", 3.0)))
    n, m = int(t["num_layers"]), int(t["num_single_layers"])
    p = int(t.get("patch_size", 1))
    cout = int(t.get("out_channels") or c)
    dj, tp = int(t.get("joint_attention_dim", 15360)), int(t.get("timestep_guidance_channels", 256))
    txt = int(text_len)
    j = s + txt
    attn = 4 * b * j * j * d
    block = 8 * b * j * d * d + 6 * b * j * d * mlp
    time = 2 * b * (tp * d + d * d) * (2 if t.get("guidance_embeds", True) else 1)
    embed = 2 * b * s * c * d + 2 * b * txt * dj * d + time + 30 * b * d * d
    head = 4 * b * d * d + 2 * b * s * d * (p * p * cout)
    total = (n + m) * (block + attn) + embed + head
    attention = (n + m) * attn
    return {"total": float(total), "per_block": float(block + attn), "per_single_block": float(block + attn),
            "attention": float(attention), "linear": float(total - attention), "tokens": s}


class Flux2TorchReference(KeywordTorchReference):
    """diffusers' ``Flux2Transformer2DModel`` called as ``Flux2KleinPipeline`` calls it: the packed latents and the
    text states in the model's dtype, ``timestep`` t / 1000, ``img_ids`` (S, 4) and ``txt_ids`` (L, 4), ``guidance``
    (B,) float32 only where ``guidance_embeds`` (klein passes None). With CFG the pipeline calls it once per half;
    here once on both halves (the same work, as ours)."""

    diffusers_class = "Flux2Transformer2DModel"

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t", "model"),
                 "img_ids": Arg("img_ids", "model"), "txt_ids": Arg("txt_ids", "model"),
                 "guidance": Arg("guidance", "float32", optional=True)}


class Flux2(Flux):
    """FLUX.2 (klein): FLUX.1's packed-token workload (2 x 2 patches of the 8x latent: 128 channels), Qwen3's stacked
    states as the text, 4-axis ids, no pooled embedding. Klein 4B / 9B are step-distilled: one sample per prompt by
    default (``--cfg``: the base models' CFG, both halves)."""

    name = "flux2"
    module_name = "xdit_jax.models.flux2"
    model_class_name = "Flux2Transformer2DModel"
    config_class_name = "Flux2Config"
    title = "FLUX.2"
    default_cfg = False

    def pipeline_call(self, w):
        kw = Family.pipeline_call(self, w)
        return dict(kw, guidance_scale=4.0) if w.cfg else kw

    def reference_tokens(self, w) -> int:
        return 0

    def text_len(self, w):
        """Qwen3 tokens: the pipeline's ``max_sequence_length`` (512; all of them reach the transformer)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 512)

    def guidance(self, w) -> float:
        return FLUX2_GUIDANCE

    def check(self, cfg, shape):
        if shape[2] != cfg.in_channels:
            raise ValueError(f"packed latents {shape}: this FLUX.2 transformer takes {cfg.in_channels} channels.")

    def make_inputs(self, w, seed=0):
        """As ``Flux2KleinPipeline`` passes them: packed latents (B, S, in_channels), the text states (B, L,
        joint_attention_dim), t / 1000 (B,), guidance (B,) only where ``guidance_embeds``, and the position ids
        ``img_ids`` (S, 4) = (0, row, column, 0), ``txt_ids`` (L, 4) = (0, 0, 0, l) (host arrays)."""
        from xdit_jax.models.flux2 import image_ids, text_ids

        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        inputs = {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                  "embeds": rng.standard_normal((b, txt, int(t.get("joint_attention_dim", 15360))), dtype=np.float32),
                  "t": np.full((b,), FLUX2_TIMESTEP, dtype=np.float32)}
        if t.get("guidance_embeds", True):
            inputs["guidance"] = np.full((b,), self.guidance(w), dtype=np.float32)
        inputs["img_ids"] = image_ids(*self.grid(w))
        inputs["txt_ids"] = text_ids(txt)
        return inputs

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["img_ids"],
                inputs["txt_ids"], inputs.get("guidance"))

    def mesh_forward(self):
        """``xdit_jax.pipelines.flux2.transformer_over_mesh``: FLUX.1's two phases, as the pipeline."""
        from xdit_jax.pipelines.flux2 import transformer_over_mesh

        return transformer_over_mesh

    def analytic_flops(self, w):
        return flux2_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return Flux2TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# LTX-Video
# ============================================================================================

LTX_TEXT_VALID = PIXART_TEXT_VALID  # a typical prompt's T5 tokens (the same tokenizer as PixArt's)
LTX_TIMESTEP = 500.0  # the transformer's ``timestep``: LTXPipeline passes the scheduler's t (x 1000), mid-schedule
LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate (the RoPE's temporal scale: VAE ratio / frame rate)
LTX_TIME_PROJ = 256  # AdaLayerNormSingle's sinusoid width


def ltx_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one LTX-Video transformer forward (2 FLOPs per multiply-add).

    B = batch (both CFG halves), S = video tokens (the packed latents: (F)(h)(w), patches of 1), L = T5 tokens
    (all of them: the cross-attention masks the padding additively, as diffusers), d = heads x head_dim (2048),
    D_x = cross_attention_dim (d), D = caption_channels (T5, 4096), C = in_channels (128), N = layers. Per block:

        self-attention q, k, v, out                    8 B S d^2
        self-attention QK^T and PV                     4 B S^2 d
        cross-attention q, out                         4 B S d^2
        cross-attention k, v over the caption          4 B L D_x d
        cross-attention QK^T and PV                    4 B S L d
        feed-forward d -> 4d -> d (tanh-GELU)          16 B S d^2

    Plus, once: proj_in 2 B S C d; the timestep embedding 2 B (256 d + d^2) and its 6d modulation 12 B d^2; the
    caption projection 2 B L (D d + d^2); proj_out 2 B S d C_out. Norms, RoPE (tables and rotations), softmax and
    the modulations themselves are element-wise.
    """
    b, s, c = latent_shape
    t = transformer
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    dx = int(t.get("cross_attention_dim", d))
    dcap = int(t.get("caption_channels", 4096))
    layers = int(t["num_layers"])
    cout = int(t.get("out_channels") or c)
    txt = text_len
    attn = 4 * b * s * s * d + 4 * b * s * txt * d
    block = 8 * b * s * d * d + 4 * b * s * d * d + 4 * b * txt * dx * d + 16 * b * s * d * d + attn
    embed = 2 * b * s * c * d + 2 * b * (LTX_TIME_PROJ * d + d * d) + 12 * b * d * d + 2 * b * txt * (dcap * d + d * d)
    head = 2 * b * s * d * cout
    total = layers * block + embed + head
    return {"total": float(total), "per_block": float(block), "attention": float(layers * attn),
            "linear": float(total - layers * attn), "tokens": s}


class LTXTorchReference(TorchReference):
    """diffusers' ``LTXVideoTransformer3DModel`` called as ``LTXPipeline`` calls it: packed latents and T5 states
    in the model's dtype, the float32 timestep (B,), the caption mask, the latent grid (num_frames, height, width)
    and ``rope_interpolation_scale`` (VAE temporal ratio / frame rate, spatial ratio, spatial ratio)."""

    diffusers_class = "LTXVideoTransformer3DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x, self.enc, self.t, self.mask = put("latents", self.dtype), put("embeds", self.dtype), put("t"), \
            put("mask")
        self.grid = tuple(int(v) for v in inputs["grid"])
        self.scale = tuple(float(v) for v in inputs["rope_scale"])

    def _forward(self):
        return self.model(hidden_states=self.x, encoder_hidden_states=self.enc, timestep=self.t,
                          encoder_attention_mask=self.mask, num_frames=self.grid[0], height=self.grid[1],
                          width=self.grid[2], rope_interpolation_scale=self.scale, return_dict=False)[0]


class LTX(Family):
    name = "ltx"
    module_name = "xdit_jax.models.ltx"
    model_class_name = "LTXVideoTransformer3DModel"
    config_class_name = "LTXConfig"
    token_word = "video"
    title = "LTX-Video"
    host_inputs = ("grid", "rope_scale")

    def grid(self, w) -> tuple[int, int, int]:
        """The latent grid (frames, rows, columns): (F - 1) // 8 + 1 latent frames, H / 32 x W / 32."""
        return ((w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def latent_shape(self, w):
        f, h, ww = self.grid(w)
        return w.step_batch, f * h * ww, int(w.transformer.get("in_channels", 128))

    def tokens(self, w):
        return self.latent_shape(w)[1], self.text_len(w)

    def text_len(self, w):
        """T5 tokens: the pipeline's ``max_sequence_length`` (128; defaults.json's)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 128)

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or LTX_TEXT_VALID), self.text_len(w))

    def mask(self, w) -> np.ndarray:
        """(B, L) int32 caption mask: with CFG the negative prompt "" (1 token), then the prompt's."""
        return pixart_mask(w.step_batch, self.text_len(w), self.text_valid(w), w.cfg)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the video tokens; the caption is cross-attended, whole on every device

    def check(self, cfg, shape):
        if shape[2] != cfg.in_channels:
            raise ValueError(f"packed latents {shape}: this LTX-Video transformer takes {cfg.in_channels} channels.")

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.grid(w)[0], "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width, "num_frames": w.num_frames}

    def make_inputs(self, w, seed=0):
        """As ``LTXPipeline`` passes them: packed latents (B, S, C), T5 states (B, L, caption_channels), the caption
        mask (B, L), timesteps (B,) float, and (host arrays, constants of the trace) the latent grid and the RoPE
        scale at 25 fps."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                "embeds": rng.standard_normal((b, self.text_len(w), int(w.transformer.get("caption_channels", 4096))),
                                              dtype=np.float32),
                "mask": self.mask(w), "t": np.full((b,), LTX_TIMESTEP, dtype=np.float32),
                "grid": np.array(self.grid(w), np.int64),
                "rope_scale": np.array([w.vae_scale_temporal / LTX_FRAME_RATE, w.vae_scale_spatial,
                                        w.vae_scale_spatial], np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["mask"],
                *(int(v) for v in inputs["grid"]), tuple(float(v) for v in inputs["rope_scale"]))

    def analytic_flops(self, w):
        return ltx_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return LTXTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# CogView4
# ============================================================================================

COGVIEW4_TIMESTEP = 500.0  # the transformer's ``timestep``: the scheduler's, mid-schedule
COGVIEW4_TEXT_TOKENS = 128  # a typical prompt's GLM tokens, left-padded to a multiple of 16


def cogview4_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one CogView4 transformer forward (2 FLOPs per multiply-add).

    Latents (B, C, H, W); X = (H/p)(W/p) image tokens, L text tokens, S = X + L, d = heads x head_dim, T =
    time_embed_dim, c = condition_dim, D_txt = text_embed_dim, N blocks. Per block (one set of weights over text and
    image): q, k, v, out 8 B S d^2, attention QK^T and PV 4 B S^2 d, the feed-forward d -> 4d -> d 16 B S d^2, the
    modulation Linear T -> 12 d 24 B T d. Once: the patch embed 2 B X (p^2 C) d, the text projection 2 B L D_txt d,
    the timestep MLP 2 B (d T + T^2), the size conditions' MLP 2 B (6 c T + T^2), the output modulation 2 B T (2 d)
    and projection 2 B X d (p^2 C_out). Norms, RoPE (host tables), SiLU / GELU and the gates are element-wise."""
    b, c, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t.get("num_attention_heads", 32)) * int(t.get("attention_head_dim", 128))
    tdim, cdim = int(t.get("time_embed_dim", 512)), int(t.get("condition_dim", 256))
    dtxt, layers = int(t.get("text_embed_dim", 4096)), int(t.get("num_layers", 28))
    cout = int(t.get("out_channels") or c)
    x, length = (h // p) * (w // p), int(text_len)
    s = x + length
    attn = 4 * b * s * s * d
    block = 8 * b * s * d * d + attn + 16 * b * s * d * d + 24 * b * tdim * d
    once = 2 * b * x * p * p * c * d + 2 * b * length * dtxt * d + 2 * b * (d * tdim + tdim * tdim) \
        + 2 * b * (6 * cdim * tdim + tdim * tdim) + 2 * b * tdim * 2 * d + 2 * b * x * d * p * p * cout
    total = layers * block + once
    return {"total": float(total), "per_block": float(block), "attention": float(layers * attn),
            "linear": float(total - layers * attn), "tokens": x}


class CogView4TorchReference(TorchReference):
    """diffusers' ``CogView4Transformer2DModel`` called as ``CogView4Pipeline`` calls it: latents (B, C, h, w), the
    GLM states (B, L, text_embed_dim), the timestep, the size conditions (B, 2) each. With CFG the pipeline makes two
    calls (its halves at their own lengths); here both halves share the text length, one batch."""

    diffusers_class = "CogView4Transformer2DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x, self.enc = put("latents", self.dtype), put("embeds", self.dtype)
        self.t, sizes = put("t"), put("sizes", self.dtype)
        self.sizes = (sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6])

    def _forward(self):
        return self.model(self.x, self.enc, self.t, *self.sizes, return_dict=False)[0]


class CogView4(Family):
    name = "cogview4"
    module_name = "xdit_jax.models.cogview4"
    model_class_name = "CogView4Transformer2DModel"
    config_class_name = "CogView4Config"
    token_word = "image"
    title = "CogView4"

    def latent_shape(self, w):
        """(B, C, H/8, W/8), diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        p = int(w.transformer.get("patch_size", 2))
        return (h // p) * (ww // p), self.text_len(w)

    def text_len(self, w):
        return int(w.text_tokens or COGVIEW4_TEXT_TOKENS)

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the image tokens; the text joins as a context

    def check(self, cfg, shape):
        if shape[1] != cfg.in_channels or shape[2] % cfg.patch_size or shape[3] % cfg.patch_size:
            raise ValueError(f"latents {shape}: this CogView4 transformer takes {cfg.in_channels} channels and sizes "
                             f"that are multiples of {cfg.patch_size}.")

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "height": w.height,
                "width": w.width, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``CogView4Pipeline`` passes them: latents (B, C, h, w), the GLM states (B, L, text_embed_dim), the
        timestep (B,) and the size conditions (B, 6): original (h, w), target (h, w), crop (top, left)."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        embeds = rng.standard_normal((b, self.text_len(w), int(w.transformer.get("text_embed_dim", 4096))),
                                     dtype=np.float32)
        sizes = np.tile(np.asarray([w.height, w.width, w.height, w.width, 0, 0], np.float32), (b, 1))
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32), "embeds": embeds,
                "t": np.full((b,), COGVIEW4_TIMESTEP, dtype=np.float32), "sizes": sizes}

    def embed_args(self, inputs, dtype):
        sizes = inputs["sizes"]
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], sizes[:, 0:2],
                sizes[:, 2:4], sizes[:, 4:6])

    def analytic_flops(self, w):
        return cogview4_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return CogView4TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# HunyuanImage-2.1 (HunyuanVideo's double- + single-stream blocks on images, [ByT5; Qwen] as the masked context)
# ============================================================================================

# HunyuanImagePipeline's tokenizer_max_length: the Qwen states padded to it (after the template's drop)
HUNYUAN_IMAGE_TEXT_TOKENS = 1000
HUNYUAN_IMAGE_BYT5_TOKENS = 128  # its tokenizer_2_max_length: the ByT5 states, padded (zeros without quoted text)
HUNYUAN_IMAGE_GLYPH_VALID = 16  # real ByT5 tokens of a prompt with a quoted word (the negative prompt "": none)


def hunyuan_image_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                                 text_2_len: int = HUNYUAN_IMAGE_BYT5_TOKENS) -> dict[str, float]:
    """Matmul FLOPs of one HunyuanImage-2.1 transformer forward (2 FLOPs per multiply-add).

    Latents (B, C, H, W); S = (H/p_h)(W/p_w) image tokens, L = Qwen tokens (``text_len``: 1000), L2 = ByT5 tokens
    (128; none without ``text_embed_2_dim``), J = S + L + L2 (every text token computed; the padding masked as keys,
    not skipped), d = heads x head_dim (3584), m = int(d x mlp_ratio), D_t = text_embed_dim (3584), D_2 =
    text_embed_2_dim (1472), H_2 = 2048 (the ByT5 projection), N double-, M single-stream and R refiner blocks (20, 40,
    2). Per double-stream block (FLUX's): 24 B d^2 (modulations) + 8 B J d^2 (q, k, v, out of both streams) + 4 B J d m
    (the two MLPs) + 4 B J^2 d (the joint attention). Per single-stream block: 6 B d^2 + 8 B J d^2 + 4 B J d m +
    4 B J^2 d. Per refiner block (on the L Qwen tokens, MLP 4d as diffusers builds it): 8 B L d^2 + 4 B L^2 d +
    4 B L d (4d) + 4 B d^2. Plus, once: the patch embed 2 B S (C p_h p_w) d; the refiner's proj_in 2 B L D_t d, its
    timestep embedder 2 B (256 d + d^2) and its pooled-text embedder 2 B (D_t d + d^2); the model's timestep embedder
    2 B (256 d + d^2); the ByT5 projection 2 B L2 (D_2 H_2 + H_2^2 + H_2 d); the head 4 B d^2 + 2 B S d (p_h p_w
    C_out). Norms, RoPE (host tables), the masked mean and the activations are element-wise."""
    b, c, h, w = latent_shape
    t = transformer
    d = int(t.get("num_attention_heads", 28)) * int(t.get("attention_head_dim", 128))
    mlp = int(d * float(t.get("mlp_ratio", 4.0)))
    n, m, r = int(t.get("num_layers", 20)), int(t.get("num_single_layers", 40)), int(t.get("num_refiner_layers", 2))
    ph, pw = (int(p) for p in t.get("patch_size", (1, 1)))
    cout = int(t.get("out_channels") or c)
    dt, d2, h2 = int(t.get("text_embed_dim", 3584)), t.get("text_embed_2_dim"), HUNYUAN_VIDEO15_BYT5_HIDDEN
    s, txt, txt2 = (h // ph) * (w // pw), int(text_len), int(text_2_len) if d2 else 0
    j = s + txt + txt2
    attn = 4 * b * j * j * d
    double = 24 * b * d * d + 8 * b * j * d * d + 4 * b * j * d * mlp
    single = 6 * b * d * d + 8 * b * j * d * d + 4 * b * j * d * mlp
    refiner_attn = 4 * b * txt * txt * d
    refiner = 8 * b * txt * d * d + 4 * b * txt * d * (4 * d) + 4 * b * d * d
    time = 2 * b * (HUNYUAN_VIDEO_TIME_PROJ * d + d * d)
    embed = 2 * b * s * (c * ph * pw) * d + 2 * b * txt * dt * d + time + 2 * b * (dt * d + d * d) + time
    if d2:
        embed += 2 * b * txt2 * (int(d2) * h2 + h2 * h2 + h2 * d)
    head = 4 * b * d * d + 2 * b * s * d * (ph * pw * cout)
    total = n * (double + attn) + m * (single + attn) + r * (refiner + refiner_attn) + embed + head
    attention = (n + m) * attn + r * refiner_attn
    return {"total": float(total), "per_block": float(double + attn), "per_single_block": float(single + attn),
            "attention": float(attention), "linear": float(total - attention), "tokens": s}


class HunyuanImageTorchReference(KeywordTorchReference):
    """diffusers' ``HunyuanImageTransformer2DModel`` called as ``HunyuanImagePipeline`` calls it: latents (B, C, h, w),
    the timestep, the Qwen and ByT5 states with their masks (the model's dtype). The guider calls it once per CFG
    half; here once on both halves (the same work)."""

    diffusers_class = "HunyuanImageTransformer2DModel"

    call_args = {"hidden_states": LATENTS, "timestep": Arg("t"), "encoder_hidden_states": EMBEDS,
                 "encoder_attention_mask": Arg("mask", "model"),
                 "encoder_hidden_states_2": Arg("embeds_2", "model", optional=True),
                 "encoder_attention_mask_2": Arg("mask_2", "model", optional=True)}


class HunyuanImage(HunyuanVideo):
    """HunyuanImage-2.1 text-to-image: the guider's CFG (both halves per prompt by default), double- then
    single-stream blocks, the text [ByT5; Qwen] as the masked context; latents through the 32x VAE."""

    name = "hunyuanimage"
    module_name = "xdit_jax.models.hunyuanimage"
    model_class_name = "HunyuanImageTransformer2DModel"
    config_class_name = "HunyuanImageConfig"
    token_word = "image"
    title = "HunyuanImage-2.1"
    default_cfg = True

    def pipeline_call(self, w):
        return Family.pipeline_call(self, w)  # (guidance_scale: the guider's; 1.0 runs one pass)

    def latent_shape(self, w):
        """(B, C, H / 32, W / 32) (the VAE's factor: the workload's), diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 64)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def byt5_len(self, w) -> int:
        return HUNYUAN_IMAGE_BYT5_TOKENS if w.transformer.get("text_embed_2_dim") else 0

    def tokens(self, w):
        _, _, h, ww = self.latent_shape(w)
        ph, pw = (int(p) for p in w.transformer.get("patch_size", (1, 1)))
        return (h // ph) * (ww // pw), self.text_len(w) + self.byt5_len(w)

    def text_len(self, w):
        """Qwen tokens after the template's drop: the pipeline's ``max_sequence_length`` (1000)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or HUNYUAN_IMAGE_TEXT_TOKENS)

    def kv_text_tokens(self, w):
        return self.tokens(w)[1]  # the context [ByT5; Qwen]

    def check(self, cfg, shape):
        ph, pw = cfg.patch_size
        if shape[1] != cfg.in_channels or shape[2] < ph or shape[3] < pw:
            raise ValueError(f"latents {shape}: this HunyuanImage transformer takes {cfg.in_channels} channels and "
                             f"at least one {ph} x {pw} patch.")

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "layers": cfg.num_layers + cfg.num_single_layers, "double_layers": cfg.num_layers,
                "single_layers": cfg.num_single_layers, "heads": cfg.num_attention_heads,
                "head_dim": cfg.attention_head_dim, "height": w.height, "width": w.width, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``HunyuanImagePipeline`` passes them: latents (B, C, h, w), Qwen states (B, L, text_embed_dim) and mask
        (the prompt's valid tokens; with CFG the negative prompt's first), ByT5 states (B, 128, text_embed_2_dim) and
        mask (a quoted word's bytes in the prompt; none in the negative prompt ""), the timestep (B,) float32."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        inputs = {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                  "t": np.full((b,), HUNYUAN_VIDEO_TIMESTEP, dtype=np.float32),
                  "embeds": rng.standard_normal((b, self.text_len(w), int(t.get("text_embed_dim", 3584))),
                                                dtype=np.float32),
                  "mask": self.mask(w)}
        if self.byt5_len(w):
            l2 = self.byt5_len(w)
            inputs["embeds_2"] = rng.standard_normal((b, l2, int(t["text_embed_2_dim"])), dtype=np.float32)
            inputs["mask_2"] = pixart_mask(b, l2, HUNYUAN_IMAGE_GLYPH_VALID, False) * (
                np.arange(b)[:, None] >= (b // 2 if w.cfg else 0)).astype(np.int32)
        return inputs

    def embed_args(self, inputs, dtype):
        e2 = inputs.get("embeds_2")
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), inputs["mask"],
                None if e2 is None else e2.astype(dtype), inputs.get("mask_2"))

    def analytic_flops(self, w):
        return hunyuan_image_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w), self.byt5_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return HunyuanImageTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Kandinsky 5.0 (a text stack, then visual blocks: self-attention, cross-attention to the text, feed-forward)
# ============================================================================================

KANDINSKY5_TIMESTEP = 500.0  # the transformer's ``timestep``: the scheduler's t (0..1000), mid-schedule
# Qwen2.5-VL states after the template's 128: the prompt's own tokens, padded to the batch's longest (no fixed
# length); a typical prompt's count
KANDINSKY5_TEXT_TOKENS = 64
# the default negative prompt's tokens (an estimate: no Qwen tokenizer offline); the CFG batch pads them to the
# prompt's length with masked tokens (diffusers calls each half at its own length)
KANDINSKY5_NEGATIVE_TOKENS = 26


def kandinsky5_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one Kandinsky 5.0 transformer forward (2 FLOPs per multiply-add).

    Latents channels-last (B, F, H, W, C_v) (C_v = visual_embed_dim: 2 C + 1 with ``visual_cond``); S =
    (F/p_t)(H/p_h)(W/p_w) visual tokens, L text tokens (every one computed; the CFG batch's padding masked as keys),
    d = model_dim (1792), f = ff_dim (7168), T = time_dim (512), D_t = in_text_dim (3584), D_2 = in_text_dim2 (768),
    P = p_t p_h p_w, N visual and R text blocks (32, 2). Per visual block: self-attention q, k, v, out 8 B S d^2 and
    QK^T / PV 4 B S^2 d; cross-attention q and out 4 B S d^2, k and v on the text 4 B L d^2, QK^T / PV 4 B S L d; the
    feed-forward d -> f -> d 4 B S d f; the modulation T -> 9d 18 B T d. Per text block: q, k, v, out 8 B L d^2,
    attention 4 B L^2 d, feed-forward 4 B L d f, modulation T -> 6d 12 B T d. Plus, once: the timestep MLP
    (d -> T -> T) 2 B (d T + T^2), the pooled CLIP embedding 2 B D_2 T, the text embedding 2 B L D_t d, the visual
    embedding 2 B S (P C_v) d, the output modulation (T -> 2d) 4 B T d and projection 2 B S d (P C_out). Norms, RoPE,
    the sinusoids, GELU, SiLU and the gates are element-wise."""
    b, f, h, w, cv = latent_shape
    t = transformer
    d, ff, tdim = int(t.get("model_dim", 2048)), int(t.get("ff_dim", 5120)), int(t.get("time_dim", 512))
    dt, d2 = int(t.get("in_text_dim", 3584)), int(t.get("in_text_dim2", 768))
    pt, ph, pw = (int(p) for p in t.get("patch_size", (1, 2, 2)))
    n, r = int(t.get("num_visual_blocks", 32)), int(t.get("num_text_blocks", 2))
    cout = int(t.get("out_visual_dim", 4))
    s, txt, p = (f // pt) * (h // ph) * (w // pw), int(text_len), pt * ph * pw
    self_attn, cross_attn, text_attn = 4 * b * s * s * d, 4 * b * s * txt * d, 4 * b * txt * txt * d
    visual = 8 * b * s * d * d + 4 * b * s * d * d + 4 * b * txt * d * d + 4 * b * s * d * ff + 18 * b * tdim * d
    text = 8 * b * txt * d * d + 4 * b * txt * d * ff + 12 * b * tdim * d
    once = (2 * b * (d * tdim + tdim * tdim) + 2 * b * d2 * tdim + 2 * b * txt * dt * d + 2 * b * s * p * cv * d
            + 4 * b * tdim * d + 2 * b * s * d * p * cout)
    attention = n * (self_attn + cross_attn) + r * text_attn
    total = n * (visual + self_attn + cross_attn) + r * (text + text_attn) + once
    return {"total": float(total), "per_block": float(visual + self_attn + cross_attn), "attention": float(attention),
            "linear": float(total - attention), "tokens": s}


class Kandinsky5TorchReference(TorchReference):
    """diffusers' ``Kandinsky5Transformer3DModel`` called as ``Kandinsky5T2VPipeline`` calls it: one call per CFG half
    with that half's text at its own length (no text mask: the padded tokens of our batch cropped), the text RoPE at
    0..L-1, the visual RoPE at the latent grid's positions, the pipeline's RoPE scale factor; here one call per sample
    (the same work)."""

    diffusers_class = "Kandinsky5Transformer3DModel"

    def set_inputs(self, inputs, w):
        put = functools.partial(self._put, inputs)
        self.x, self.enc, self.pooled = put("latents", self.dtype), put("embeds", self.dtype), put("pooled", self.dtype)
        self.t = put("t", self.dtype)
        self.valid = [int(v) for v in inputs["mask"].sum(axis=1)]
        self.scale = tuple(float(v) for v in inputs["rope_scale"])
        pt, ph, pw = (int(p) for p in w.transformer.get("patch_size", (1, 2, 2)))
        _, f, h, ww, _ = inputs["latents"].shape
        self.visual_pos = [self.torch.arange(n, device=self.device) for n in (f // pt, h // ph, ww // pw)]

    def _forward(self):
        outs = [self.model(hidden_states=self.x[i:i + 1], encoder_hidden_states=self.enc[i:i + 1, :n],
                           timestep=self.t[i:i + 1], pooled_projections=self.pooled[i:i + 1],
                           visual_rope_pos=self.visual_pos, text_rope_pos=self.torch.arange(n, device=self.device),
                           scale_factor=self.scale, return_dict=False) for i, n in enumerate(self.valid)]
        # (return_dict=False: this model returns the tensor itself, not a tuple)
        return self.torch.cat(outs)


class Kandinsky5(Family):
    """Kandinsky 5.0 text-to-video (T2V): CFG (both halves per prompt, the default negative prompt), the text stack
    whole on every device, the visual blocks over the mesh."""

    name = "kandinsky5"
    module_name = "xdit_jax.models.kandinsky5"
    model_class_name = "Kandinsky5Transformer3DModel"
    config_class_name = "Kandinsky5Config"
    token_word = "video"
    title = "Kandinsky 5.0"
    host_inputs = ("rope_scale",)

    def with_layers(self, transformer, layers):
        """``--layers N``: N visual blocks (the 2 text blocks kept)."""
        return dict(transformer, num_visual_blocks=int(layers))

    def latent_shape(self, w):
        """Channels last, as diffusers': (B, (F - 1) // 4 + 1, H / 8, W / 8, C_v), C_v = 2 C + 1 with
        ``visual_cond`` (the zero condition latents and mask)."""
        t = w.transformer
        c = int(t.get("in_visual_dim", 4))
        return (w.step_batch, (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial, 2 * c + 1 if t.get("visual_cond") else c)

    def tokens(self, w):
        _, f, h, ww, _ = self.latent_shape(w)
        pt, ph, pw = (int(p) for p in w.transformer.get("patch_size", (1, 2, 2)))
        return (f // pt) * (h // ph) * (ww // pw), self.text_len(w)

    def text_len(self, w):
        return int(w.text_tokens or KANDINSKY5_TEXT_TOKENS)

    def negative_len(self, w) -> int:
        return min(int(w.text_valid or KANDINSKY5_NEGATIVE_TOKENS), self.text_len(w))

    def mask(self, w) -> np.ndarray:
        """(B, L) int32 text mask: with CFG the negative prompt's tokens first (padded to the prompt's), then the
        prompt's (all of them)."""
        b, n = w.step_batch, self.text_len(w)
        mask = np.ones((b, n), np.int32)
        if w.cfg:
            mask[:b // 2, self.negative_len(w):] = 0
        return mask

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # the visual tokens; the text joins the cross-attention as a context

    def check(self, cfg, shape):
        pt, ph, pw = cfg.patch_size
        if shape[-1] != cfg.visual_embed_dim or shape[1] % pt or shape[2] % ph or shape[3] % pw:
            raise ValueError(f"latents {shape}: this Kandinsky 5.0 transformer takes {cfg.visual_embed_dim} channels "
                             f"and a latent grid of whole {pt} x {ph} x {pw} patches.")

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st,
                "negative_text_tokens": self.negative_len(w) if w.cfg else None,
                "latent_frames": self.latent_shape(w)[1], "layers": cfg.num_visual_blocks,
                "text_layers": cfg.num_text_blocks, "heads": cfg.heads, "head_dim": cfg.head_dim, "height": w.height,
                "width": w.width, "num_frames": w.num_frames, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``Kandinsky5T2VPipeline`` passes them: channels-last latents (noise, then with ``visual_cond`` the zero
        condition latents and mask), Qwen states (B, L, in_text_dim) with their mask (our CFG batch's padding), the
        CLIP pooled vector (B, in_text_dim2), the timestep (B,) and the RoPE scale factor of the size (a host
        constant: diffusers' ``_get_scale_factor``)."""
        from xdit_jax.pipelines.kandinsky5 import scale_factor

        t = w.transformer
        rng = np.random.default_rng(seed)
        b = w.step_batch
        shape = self.latent_shape(w)
        c = int(t.get("in_visual_dim", 4))
        latents = np.zeros(shape, np.float32)
        latents[..., :c] = rng.standard_normal(shape[:-1] + (c,), dtype=np.float32)
        return {"latents": latents,
                "embeds": rng.standard_normal((b, self.text_len(w), int(t.get("in_text_dim", 3584))),
                                              dtype=np.float32),
                "t": np.full((b,), KANDINSKY5_TIMESTEP, dtype=np.float32),
                "pooled": rng.standard_normal((b, int(t.get("in_text_dim2", 768))), dtype=np.float32),
                "mask": self.mask(w),
                "rope_scale": np.asarray(scale_factor(w.height, w.width), np.float32)}

    def embed_args(self, inputs, dtype):
        scale = tuple(float(v) for v in np.asarray(inputs["rope_scale"]))
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"],
                inputs["pooled"].astype(dtype), scale, inputs["mask"])

    def analytic_flops(self, w):
        return kandinsky5_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return Kandinsky5TorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# SANA-Video (SANA's linear-attention blocks on video: Wan's 3-D RoPE in the numerator, GLUMBConv + a frame conv)
# ============================================================================================


def sana_video_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul and convolution FLOPs of one SANA-Video transformer forward (2 FLOPs per multiply-add):
    :func:`sana_analytic_flops`' terms on the video tokens, with what SANA-Video changes.

    Latents (B, C, F, h, w); S = (F/p_t)(h/p_h)(w/p_w) video tokens, P = p_t p_h p_w, d = heads x hd (2240),
    m = int(mlp_ratio d) (6720 at the release's 3.0). Per block, against SANA's:

        linear attention with RoPE (SanaLinearAttnProcessor3_0): K_rot^T V 2 B S d hd, Q_rot (K_rot^T V)
        2 B S d hd, the denominator Q . sum K 2 B S d (the key sum is a reduction)   2 B S d (2 hd + 1)
        (SANA's K^T [V; 1] and Q (.): 4 B S d (hd + 1))
        GLUMBTempConv's frame conv (kernel 3 over the frames, d -> d, no bias)       6 B S d^2

    the rest as SANA's (q, k, v, out 8 B S d^2; cross-attention 4 B S d^2 + 4 B L d_c d + 4 B S L d; GLUMBConv
    6 B S d m + 36 B S m, its 3x3 depthwise conv per frame). Once: the Conv3d patch embedding 2 B S (C P) d, the
    timestep embedding and its modulation, the caption projection, the output projection 2 B S d (P C_out)."""
    b, c, f, h, w = latent_shape
    t = transformer
    pt, ph, pw = (int(p) for p in t.get("patch_size", (1, 2, 2)))
    heads, hd = int(t.get("num_attention_heads", 20)), int(t.get("attention_head_dim", 112))
    d = heads * hd
    dc = int(t.get("cross_attention_dim") or d)
    m = int(float(t.get("mlp_ratio", 2.5)) * d)
    layers = int(t.get("num_layers", 20))
    cout, cap, p = int(t.get("out_channels") or c), int(t.get("caption_channels", 2304)), pt * ph * pw
    s, txt = (f // pt) * (h // ph) * (w // pw), int(text_len)
    self_proj, self_attn = 8 * b * s * d * d, 2 * b * s * d * (2 * hd + 1)
    cross_proj, cross_attn = 4 * b * s * d * d + 4 * b * txt * dc * d, 4 * b * s * txt * d
    ff = 6 * b * s * d * m + 36 * b * s * m + 6 * b * s * d * d
    tp = PIXART_TIME_PROJ
    embed = 2 * b * s * (c * p) * d + 2 * b * (tp * d + d * d) + 2 * b * d * 6 * d + 2 * b * txt * (cap * d + d * d)
    head = 2 * b * s * d * (p * cout)
    block = self_proj + self_attn + cross_proj + cross_attn + ff
    attention = self_attn + cross_attn
    total = layers * block + embed + head
    return {"total": float(total), "per_block": float(block), "attention": float(layers * attention),
            "linear": float(total - layers * attention), "tokens": s}


class SanaVideoTorchReference(KeywordTorchReference):
    """diffusers' ``SanaVideoTransformer3DModel`` called as ``SanaVideoPipeline`` calls it: latents (B, C, F, h, w),
    the Gemma states with their mask, the timestep expanded to the CFG batch (one call on both halves, as there)."""

    diffusers_class = "SanaVideoTransformer3DModel"

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t"),
                 "encoder_attention_mask": Arg("mask")}


class SanaVideo(Sana):
    """SANA-Video text-to-video: SANA's workload (a masked Gemma 2 caption of 300 tokens, CFG) on video latents through
    Wan's VAE (8x, 4x); under PipeFusion the token mixers' buffers with a halo of one frame (the frame conv)."""

    name = "sana_video"
    module_name = "xdit_jax.models.sana_video"
    model_class_name = "SanaVideoTransformer3DModel"
    config_class_name = "SanaVideoConfig"
    token_word = "video"
    title = "SANA-Video"

    @staticmethod
    def sprint(w) -> bool:
        return False

    def latent_shape(self, w):
        """(B, C, (F - 1) // 4 + 1, H / 8, W / 8), diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)),
                (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def grid(self, w) -> tuple[int, int, int]:
        _, _, f, h, ww = self.latent_shape(w)
        pt, ph, pw = (int(p) for p in w.transformer.get("patch_size", (1, 2, 2)))
        return f // pt, h // ph, ww // pw

    def tokens(self, w):
        f, h, ww = self.grid(w)
        return f * h * ww, self.text_len(w)

    def pipefusion_cache(self, cfg, mesh, layers, latent_shape, seq: int, dtype, patches: int, abstract: bool):
        from xdit_jax.parallel import pipefusion

        pt, ph, pw = cfg.patch_size
        h, ww = latent_shape[3] // ph, latent_shape[4] // pw
        slots = pipefusion.stack_sizes(layers)[0]
        return (pipefusion.init_mixing(mesh, slots, latent_shape[0], seq, ww, cfg.num_attention_heads,
                                       cfg.attention_head_dim, 2 * cfg.ff_hidden + cfg.inner_dim, dtype, patches,
                                       abstract=abstract, halo=max(ww + 1, h * ww)),)

    def check(self, cfg, shape):
        self.module.check_input_shape(cfg, shape[1], shape[2], shape[3], shape[4])

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.latent_shape(w)[2], "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim, "height": w.height,
                "width": w.width, "num_frames": w.num_frames}

    def analytic_flops(self, w):
        return sana_video_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return SanaVideoTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Wan VACE (Wan 2.1 + a stack of VACE blocks on the control latents, their hints added after every vace_layers' block)
# ============================================================================================


def wan_vace_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                            control_channels: int | None = None) -> dict[str, float]:
    """Matmul FLOPs of one Wan VACE transformer forward (2 FLOPs per multiply-add): :func:`wan_analytic_flops` (the
    main stack of N blocks, its embeddings and head) plus the VACE branch, as diffusers' ``WanVACETransformer3DModel``
    computes it. With S, L, d, F, P as there, V = len(vace_layers) (8 for 14B: every 5th layer), C_v =
    vace_in_channels (96): the control patch embedding (a Conv3d) 2 B S (C_v P) d; the first VACE block's
    ``proj_in`` 2 B S d^2; per VACE block a whole Wan block on the control tokens (8 B S d^2 + 4 B S^2 d + 4 B S d^2 +
    4 B L d^2 + 4 B S L d + 4 B S d F) and its ``proj_out`` (the hint) 2 B S d^2. The control tokens are as many as
    the video's (fewer control frames are zero-padded to S, and run). Adding the scaled hints is element-wise."""
    b, _, f, h, w = latent_shape
    t = transformer
    out = wan_analytic_flops(t, latent_shape, text_len)
    pt, ph, pw = (int(x) for x in t.get("patch_size", (1, 2, 2)))
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    ffn = int(t.get("ffn_dim", 13824))
    nv = len(t.get("vace_layers", (0, 5, 10, 15, 20, 25, 30, 35)))
    cv = int(control_channels or t.get("vace_in_channels", 96))
    s, txt = (f // pt) * (h // ph) * (w // pw), int(text_len)
    attn = 4 * b * s * s * d + 4 * b * s * txt * d
    block = 8 * b * s * d * d + 4 * b * s * d * d + 4 * b * txt * d * d + 4 * b * s * d * ffn + attn
    vace = 2 * b * s * (cv * pt * ph * pw) * d + 2 * b * s * d * d + nv * (block + 2 * b * s * d * d)
    total = out["total"] + vace
    attention = out["attention"] + nv * attn
    return dict(out, total=float(total), attention=float(attention), linear=float(total - attention),
                per_vace_block=float(block + 2 * b * s * d * d), vace=float(vace))


class WanVACETorchReference(WanTorchReference):
    """diffusers' ``WanVACETransformer3DModel`` called as ``WanVACEPipeline`` calls it: Wan's inputs plus the control
    latents (the same for both CFG halves) and the conditioning scale per VACE layer (1-D, the pipeline's)."""

    diffusers_class = "WanVACETransformer3DModel"

    def set_inputs(self, inputs, w):
        super().set_inputs(inputs, w)
        self.control = self._put(inputs, "control", self.dtype)
        self.scale = self._put(inputs, "control_scale", self.dtype)[0]

    def _forward(self):
        return self.model(hidden_states=self.x, timestep=self.t, encoder_hidden_states=self.enc,
                          control_hidden_states=self.control, control_hidden_states_scale=self.scale,
                          return_dict=False)[0]


class WanVACE(Wan):
    """Wan VACE (``WanVACEPipeline``): Wan 2.1's workload plus the control latents (random here: the inactive and
    reactive video latents and the folded mask, ``vace_in_channels``) at the video's frames, conditioning scale 1;
    the VACE stack then the main stack over the mesh (PipeFusion: both looped over the stages)."""

    name = "wan_vace"
    module_name = "xdit_jax.models.wan_vace"
    model_class_name = "WanVACETransformer3DModel"
    config_class_name = "WanVACEConfig"
    title = "Wan VACE"

    def with_layers(self, transformer, layers):
        """``--layers N``: N main blocks, the VACE layers cut to those below N (layer 0 kept)."""
        vace = [i for i in transformer.get("vace_layers", (0, 5, 10, 15, 20, 25, 30, 35)) if i < int(layers)]
        return dict(transformer, num_layers=int(layers), vace_layers=vace or [0])

    def image_tokens(self, w):
        return 0

    def check(self, cfg, shape):
        from xdit_jax.models import wan

        wan.check_input_shape(cfg, shape[2], shape[3], shape[4])

    def row_fields(self, w, cfg):
        return dict(super().row_fields(w, cfg), vace_layers=list(cfg.vace_layers),
                    control_channels=cfg.vace_in_channels)

    def make_inputs(self, w, seed=0):
        """Wan's (:meth:`Wan.make_inputs`) plus ``control`` (B, vace_in_channels, F, h, w) float32 random, the same
        for both CFG halves (as the pipeline repeats it), and ``control_scale`` (B, V) ones (conditioning_scale 1)."""
        out = super().make_inputs(w, seed)
        b, _, f, h, ww = self.latent_shape(w)
        t = w.transformer
        rng = np.random.default_rng(seed + 1)
        control = rng.standard_normal((1, int(t.get("vace_in_channels", 96)), f, h, ww), dtype=np.float32)
        nv = len(t.get("vace_layers", (0, 5, 10, 15, 20, 25, 30, 35)))
        return dict(out, control=np.repeat(control, b, axis=0), control_scale=np.ones((b, nv), np.float32))

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["embeds"].astype(dtype), None, None,
                inputs["control"].astype(dtype), inputs["control_scale"])

    def analytic_flops(self, w):
        return wan_vace_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return WanVACETorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# HiDream-I1 (FLUX-like double- then single-stream blocks, a mixture-of-experts feed-forward, a Llama layer per block)
# ============================================================================================

HIDREAM_TIME_PROJ = 256  # the sinusoidal timestep projection width
HIDREAM_TIMESTEP = 500.0  # the transformer's ``timesteps``: the scheduler's t (0..1000, float32), mid-schedule
HIDREAM_TEXT_TOKENS = 128  # HiDreamImagePipeline's max_sequence_length: T5 and Llama each padded to it


def hidream_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                           llama_len: int | None = None) -> dict[str, float]:
    """Matmul FLOPs of one HiDream-I1 transformer forward as :mod:`xdit_jax.models.hidream` computes it (2 FLOPs per
    multiply-add): the mixture of experts **dense**, every routed expert on every token (diffusers' ``moe_infer``
    runs each token through its top k only: ``moe_dense_excess`` is the difference).

    Latents (B, C, h, w); S = (h/p)(w/p) image tokens (a non-square latent: ``max_resolution``'s token count, the
    padding computed), L_t T5 and L_l Llama tokens (128 each: the pipeline pads both), the text stream C_t = L_t + L_l
    ([T5; the last block's Llama layer]), d = heads x hd (2560), E routed experts (4), k active (2), m =
    swiglu(4d) (6912: 2/3 of 4d rounded up to 256), m_s = swiglu(2d) (3584, the shared expert), N double- and M
    single-stream blocks (16, 32). The feed-forward of T tokens: MoE(T) = 2 T d E (gate) + 6 T E d m (the experts,
    dense) + 2 T E d (their gate-weighted sum, an einsum) + 6 T d m_s (the shared expert); SwiGLU(T) = 6 T d m.

    Per double-stream block (the text [stream; the block's Llama layer], C_t + L_l tokens, through its own weights
    and one joint attention with the image; the Llama rows computed to the end of the block, then dropped):

        adaLN (d -> 12d)                      24 B d^2
        image q, k, v, out                    8 B S d^2
        text q, k, v, out                     8 B (C_t + L_l) d^2
        joint attention QK^T and PV           4 B J^2 d,  J = S + C_t + L_l
        image MoE, text SwiGLU                B MoE(S) + B SwiGLU(C_t + L_l)

    Per single-stream block over the joint T = S + C_t tokens, the block's Llama layer joining as keys / values:

        adaLN (d -> 6d)                       12 B d^2
        q, k, v, out on T                     8 B T d^2
        k, v on the Llama layer               4 B L_l d^2  (its q is computed and dead: XLA drops it)
        attention QK^T and PV                 4 B T (T + L_l) d
        MoE                                   B MoE(T)

    Plus, once: x_embedder 2 B S (C p^2) d; the timestep embedder (256 -> d -> d) 2 B (256 d + d^2); the pooled
    embedder (P -> d -> d, P = text_emb_dim) 2 B (P d + d^2); the T5 projection 2 B L_t D_t5 d; each block's Llama
    projection 2 B (N + M) L_l D_l d; the head's modulation (d -> 2d) 4 B d^2 and projection 2 B S d (p^2 C_out).
    Norms, the q/k RMS norms, RoPE, the softmax gate's top k, SiLU and the gates are element-wise."""
    from xdit_jax.models.hidream import swiglu_dim

    b, c, h, w = latent_shape
    t = transformer
    p = int(t.get("patch_size", 2))
    d = int(t.get("num_attention_heads", 20)) * int(t.get("attention_head_dim", 128))
    n, mm = int(t.get("num_layers", 16)), int(t.get("num_single_layers", 32))
    e, k = int(t.get("num_routed_experts", 4)), int(t.get("num_activated_experts", 2))
    d5, dl = (int(x) for x in t.get("caption_channels", (4096, 4096)))
    pooled, cout = int(t.get("text_emb_dim", 2048)), int(t.get("out_channels") or c)
    m, ms = swiglu_dim(4 * d), swiglu_dim(2 * d)
    if h == w:
        s = (h // p) * (w // p)
    else:
        res = t.get("max_resolution", (128, 128))
        s = int(res[0]) * int(res[1]) // p ** 2
    lt = int(text_len)
    ll = lt if llama_len is None else int(llama_len)
    ct = lt + ll

    def swiglu(tokens):
        return 6 * b * tokens * d * m

    def moe(tokens):
        if e == 0:
            return swiglu(tokens)
        return 2 * b * tokens * d * e + 6 * b * tokens * e * d * m + 2 * b * tokens * e * d + 6 * b * tokens * d * ms

    jd, js = s + ct + ll, s + ct
    attn_d, attn_s = 4 * b * jd * jd * d, 4 * b * js * (js + ll) * d
    double = 24 * b * d * d + 8 * b * s * d * d + 8 * b * (ct + ll) * d * d + moe(s) + swiglu(ct + ll)
    single = 12 * b * d * d + 8 * b * js * d * d + 4 * b * ll * d * d + moe(js)
    tp = HIDREAM_TIME_PROJ
    embed = (2 * b * s * (c * p * p) * d + 2 * b * (tp * d + d * d) + 2 * b * (pooled * d + d * d)
             + 2 * b * lt * d5 * d + 2 * b * (n + mm) * ll * dl * d)
    head = 4 * b * d * d + 2 * b * s * d * (p * p * cout)
    total = n * (double + attn_d) + mm * (single + attn_s) + embed + head
    attention = n * attn_d + mm * attn_s
    excess = 6 * b * (e - k) * d * m * (n * s + mm * js) if e else 0
    return {"total": float(total), "per_block": float(double + attn_d), "per_single_block": float(single + attn_s),
            "attention": float(attention), "linear": float(total - attention), "tokens": s,
            "moe_dense_excess": float(excess)}


class HiDreamTorchReference(KeywordTorchReference):
    """diffusers' ``HiDreamImageTransformer2DModel`` called as ``HiDreamImagePipeline`` calls it: latents (B, C, h,
    w), the timestep (B,) float32, the T5 states, the Llama states (layers, B, L, d_llama: every layer stacked, as the
    pipeline's ``prompt_embeds_llama3``) and the pooled CLIP embedding in the model's dtype; one call on both CFG
    halves (as there)."""

    diffusers_class = "HiDreamImageTransformer2DModel"

    call_args = {"hidden_states": LATENTS, "timesteps": Arg("t"),
                 "encoder_hidden_states_t5": Arg("t5", "model"),
                 "encoder_hidden_states_llama3": Arg("llama", "model"), "pooled_embeds": Arg("pooled", "model")}

    def set_inputs(self, inputs, w):
        super().set_inputs(inputs, w)
        self.kwargs["encoder_hidden_states_llama3"] = self.kwargs["encoder_hidden_states_llama3"].transpose(0, 1)


class HiDream(Family):
    """HiDream-I1 text-to-image (Full's CFG: both halves per prompt): double-stream blocks over the image tokens with
    the text whole as their attention's context, then single-stream blocks over [image; T5; Llama], each block's
    Llama layer as extra keys / values (:func:`xdit_jax.pipelines.hidream.transformer_over_mesh`); PipeFusion: both
    stacks looped over the stages, each patch carrying the whole text stream."""

    name = "hidream"
    module_name = "xdit_jax.models.hidream"
    model_class_name = "HiDreamImageTransformer2DModel"
    config_class_name = "HiDreamConfig"
    token_word = "image"
    title = "HiDream-I1"

    def with_layers(self, transformer, layers):
        """``--layers N``: N double- and N single-stream blocks, each keeping its Llama layer."""
        n = int(layers)
        ll = list(transformer.get("llama_layers", ()))
        nd = int(transformer.get("num_layers", 16))
        return dict(transformer, num_layers=n, num_single_layers=n, llama_layers=ll[:n] + ll[nd:nd + n])

    def latent_shape(self, w):
        """(B, C, H / 8, W / 8), diffusers' layout."""
        return (w.step_batch, int(w.transformer.get("in_channels", 16)), w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def image_tokens(self, w) -> int:
        """The model's image tokens: the patches of a square latent, ``max_resolution``'s count for another."""
        _, _, h, ww = self.latent_shape(w)
        t = w.transformer
        p = int(t.get("patch_size", 2))
        if h == ww:
            return (h // p) * (ww // p)
        res = t.get("max_resolution", (128, 128))
        return int(res[0]) * int(res[1]) // p ** 2

    def text_len(self, w):
        """T5 tokens (the Llama's as many): the pipeline's ``max_sequence_length`` (128)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or HIDREAM_TEXT_TOKENS)

    def llama_layers(self, w) -> int:
        """The Llama hidden layers the inputs hold: the highest the blocks read, + 1 (32: Llama-3.1-8B's)."""
        return max(int(i) for i in w.transformer["llama_layers"]) + 1

    def tokens(self, w):
        return self.image_tokens(w), 2 * self.text_len(w)  # the text stream [T5; Llama]

    def attention_tokens(self, w):
        return self.image_tokens(w)  # PipeFusion's buffers: the image tokens; the text joins as a context

    def check(self, cfg, shape):
        from xdit_jax.models import hidream

        if shape[1] != cfg.in_channels:
            raise ValueError(f"latents {shape}: this HiDream transformer takes {cfg.in_channels} channels.")
        hidream.patch_layout(cfg, shape[2], shape[3])

    def row_fields(self, w, cfg):
        si, st = self.tokens(w)
        return {"family": self.name, "image_tokens": si, "text_tokens": st, "t5_tokens": self.text_len(w),
                "llama_tokens": self.text_len(w), "layers": cfg.num_layers + cfg.num_single_layers,
                "double_layers": cfg.num_layers, "single_layers": cfg.num_single_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "routed_experts": cfg.num_routed_experts, "active_experts": cfg.num_activated_experts,
                "height": w.height, "width": w.width, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As ``HiDreamImagePipeline`` passes them: latents (B, C, h, w), the T5 states (B, L, caption_channels[0]),
        the Llama states batch first (B, layers, L, caption_channels[1]: the step swaps them to the model's (layers, B,
        L, d)), the pooled CLIP pair (B, text_emb_dim), the timestep (B,) float32. No text masks (the pipeline passes
        none to the transformer)."""
        t = w.transformer
        rng = np.random.default_rng(seed)
        b, lt = w.step_batch, self.text_len(w)
        d5, dl = (int(x) for x in t.get("caption_channels", (4096, 4096)))
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                "t5": rng.standard_normal((b, lt, d5), dtype=np.float32),
                "llama": rng.standard_normal((b, self.llama_layers(w), lt, dl), dtype=np.float32),
                "pooled": rng.standard_normal((b, int(t.get("text_emb_dim", 2048))), dtype=np.float32),
                "t": np.full((b,), HIDREAM_TIMESTEP, dtype=np.float32)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["t"], inputs["t5"].astype(dtype),
                inputs["llama"].astype(dtype).swapaxes(0, 1), inputs["pooled"].astype(dtype))

    def mesh_forward(self):
        """``xdit_jax.pipelines.hidream.transformer_over_mesh``: the double-stream blocks over the image tokens (the
        text whole), then the single-stream blocks over [image; text], as the pipeline."""
        from xdit_jax.pipelines.hidream import transformer_over_mesh

        return transformer_over_mesh

    def prepare_pipeline(self, pipe, w):
        """diffusers' size rule rescales every size to ``default_sample_size`` x 8 squared pixels (a pipeline
        attribute, 128: 1024 x 1024): set to the workload's area (the tiny preset's 8: 64 x 64, as its tests)."""
        import math

        pipe.default_sample_size = math.isqrt(w.height * w.width) // w.vae_scale_spatial

    def analytic_flops(self, w):
        return hidream_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return HiDreamTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# Cosmos-Predict2 (Text2Image / Video2World: Wan-like self- + cross-attention blocks, adaLN-LoRA, 3D RoPE)
# ============================================================================================

COSMOS_TIMESTEP = 0.5  # the transformer's ``timestep``: sigma / (sigma + 1) of the Cosmos2 pipelines at sigma 1
COSMOS_TEXT_VALID = PIXART_TEXT_VALID  # a typical prompt's T5 tokens (the pipelines zero the states after them)
COSMOS_FPS = 16  # Cosmos2VideoToWorldPipeline's default fps (the RoPE's frame positions x 24 / fps)
COSMOS_COND_FRAMES = 1  # Video2World from one image: its first latent frame conditioned


def cosmos_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int,
                          per_frame: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one Cosmos-Predict2 transformer forward as :mod:`xdit_jax.models.cosmos` computes it (2 FLOPs
    per multiply-add).

    Latents (B, C, F, h, w); S = (F/p_t)(h/p)(w/p) video tokens, L T5 tokens (512), d = heads x head_dim (2048 for
    2B), D_t = text_embed_dim (1024), r = adaln_lora_dim (256), m = mlp_ratio d, C_in = (in_channels + 1: the padding
    mask) p_t p^2, C_out = out_channels p_t p^2, R = the timestep rows per sample (1; Video2World: F, a timestep per
    latent frame, so every modulation is computed per frame). Per block:

        three adaLN-LoRA modulations (d -> r -> 3d)   3 x 2 B R (d r + 3 r d)   = 24 B R d r
        self-attention q, k, v, out                   8 B S d^2
        self-attention QK^T and PV                    4 B S^2 d
        cross-attention q, out                        4 B S d^2
        cross-attention k, v on the caption           4 B L D_t d
        cross-attention QK^T and PV                   4 B S L d
        MLP d -> m -> d                               4 B S d m

    Plus, once: the patch embedding 2 B S C_in d; the timestep embedder (d -> d -> 3d) 8 B R d^2; the head's
    modulation (d -> r -> 2d) 6 B R d r and projection 2 B S d C_out. Norms, RoPE, the learnable positions, the
    per-token gathers of the per-frame tables, GELU and the gates are element-wise."""
    b, c, f, h, w = latent_shape
    t = transformer
    pt, ph, pw = (int(x) for x in t.get("patch_size", (1, 2, 2)))
    d = int(t.get("num_attention_heads", 32)) * int(t.get("attention_head_dim", 128))
    n = int(t.get("num_layers", 28))
    dt, r = int(t.get("text_embed_dim", 1024)), int(t.get("adaln_lora_dim", 256))
    m = int(d * float(t.get("mlp_ratio", 4.0)))
    cin = (int(t.get("in_channels", 16)) + (1 if t.get("concat_padding_mask", True) else 0)) * pt * ph * pw
    cout = int(t.get("out_channels") or c) * pt * ph * pw
    s = (f // pt) * (h // ph) * (w // pw)
    rows = f if per_frame else 1
    lt = int(text_len)
    attn = 4 * b * s * s * d + 4 * b * s * lt * d
    block = 24 * b * rows * d * r + 8 * b * s * d * d + 4 * b * s * d * d + 4 * b * lt * dt * d + 4 * b * s * d * m
    embed = 2 * b * s * cin * d + 8 * b * rows * d * d
    head = 6 * b * rows * d * r + 2 * b * s * d * cout
    total = n * (block + attn) + embed + head
    return {"total": float(total), "per_block": float(block + attn), "attention": float(n * attn),
            "linear": float(total - n * attn), "tokens": s}


class CosmosTorchReference(KeywordTorchReference):
    """diffusers' ``CosmosTransformer3DModel`` called as the Cosmos2 pipelines call it: the preconditioned latents
    and the timestep in the model's dtype (Video2World: (B, 1, F, 1, 1), the conditioned frames' tiny one, with the
    condition mask and ``fps``), the T5 states, the all-zero padding mask; one call on both CFG halves (the pipelines
    call it per half: the same work)."""

    diffusers_class = "CosmosTransformer3DModel"

    call_args = {"hidden_states": LATENTS, "timestep": Arg("t", "model"), "encoder_hidden_states": EMBEDS,
                 "condition_mask": Arg("condition_mask", "model", optional=True)}

    def _make_model(self, cfg):
        from diffusers.models.transformers import transformer_cosmos

        if not hasattr(transformer_cosmos, "transforms"):  # torchvision absent: its padding-mask resize is needed
            torch = self.torch  # (the mask is given at the latents' size: a nearest resize to the same size)

            class _Functional:
                @staticmethod
                def resize(x, size, interpolation=None):
                    return torch.nn.functional.interpolate(x, size=list(size), mode="nearest")

            transformer_cosmos.transforms = type("transforms", (), {
                "functional": _Functional, "InterpolationMode": type("InterpolationMode", (), {"NEAREST": "nearest"})})
        return super()._make_model(cfg)

    def set_inputs(self, inputs, w):
        super().set_inputs(inputs, w)
        t = self.kwargs["timestep"]
        if t.ndim == 2:  # a timestep per latent frame: diffusers' (B, 1, F, 1, 1)
            self.kwargs["timestep"] = t[:, None, :, None, None]
        h, ww = inputs["latents"].shape[-2:]
        self.kwargs["padding_mask"] = self.torch.zeros((1, 1, h, ww), device=self.device, dtype=self.dtype)
        if "fps" in inputs:
            self.kwargs["fps"] = int(inputs["fps"])


class Cosmos(Family):
    """Cosmos-Predict2 Text2Image (one latent frame) and Video2World (its transformer takes the condition-mask
    channel: ``in_channels`` = latent channels + 1; a timestep per latent frame, the first conditioned, and the fps
    in the RoPE), both with CFG (two halves per prompt): self-attention over the video tokens, cross-attention to the
    T5 caption; the step is ``embed`` -> ``run_blocks`` -> ``head``, as :mod:`xdit_jax.pipelines.cosmos`."""

    name = "cosmos"
    module_name = "xdit_jax.models.cosmos"
    model_class_name = "CosmosTransformer3DModel"
    config_class_name = "CosmosConfig"
    token_word = "video"
    title = "Cosmos-Predict2"
    host_inputs = ("fps",)

    @staticmethod
    def video_to_world(w) -> bool:
        """Video2World: the transformer takes the condition mask as one more input channel."""
        t = w.transformer
        return int(t.get("in_channels", 16)) > int(t.get("out_channels") or t.get("in_channels", 16))

    def latent_shape(self, w):
        """(B, C, F, h, w), the pipelines' latents: (num_frames - 1) // 4 + 1 latent frames (1 for Text2Image)."""
        t = w.transformer
        return (w.step_batch, int(t.get("out_channels") or t.get("in_channels", 16)),
                (w.num_frames - 1) // w.vae_scale_temporal + 1, w.height // w.vae_scale_spatial,
                w.width // w.vae_scale_spatial)

    def tokens(self, w):
        _, _, f, h, ww = self.latent_shape(w)
        pt, ph, pw = (int(x) for x in w.transformer.get("patch_size", (1, 2, 2)))
        return (f // pt) * (h // ph) * (ww // pw), self.text_len(w)

    def text_len(self, w):
        """T5 tokens: the pipelines' ``max_sequence_length`` (512)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or 512)

    def text_valid(self, w) -> int:
        return min(int(w.text_valid or COSMOS_TEXT_VALID), self.text_len(w))

    def attention_tokens(self, w):
        return self.tokens(w)[0]  # self-attention over the video tokens; the caption is a cross-attention context

    def check(self, cfg, shape):
        _, c, f, h, w = shape
        if c != cfg.out_ch:
            raise ValueError(f"latents {shape}: this Cosmos transformer takes {cfg.out_ch} latent channels.")
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latents {shape}: frames x height x width must be multiples of the patch "
                             f"{cfg.patch_size}.")
        grid = (f // pt, h // ph, w // pw)
        if any(g > mx for g, mx in zip(grid, cfg.max_patches)):
            raise ValueError(f"latents {shape}: {grid} patches exceed max_size {cfg.max_size} ({cfg.max_patches}).")

    def row_fields(self, w, cfg):
        sv, st = self.tokens(w)
        return {"family": self.name, "video_tokens": sv, "text_tokens": st, "text_valid_tokens": self.text_valid(w),
                "latent_frames": self.latent_shape(w)[2], "layers": cfg.num_layers,
                "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
                "video_to_world": self.video_to_world(w), "height": w.height, "width": w.width,
                "num_frames": w.num_frames, "cfg": w.cfg}

    def make_inputs(self, w, seed=0):
        """As the Cosmos2 pipelines pass them: latents (B, C, F, h, w), the timestep (B,) float32 (Video2World: (B,
        F), the first latent frame's sigma_conditioning / (1 + sigma_conditioning)), T5 states (B, L, text_embed_dim)
        zero after each caption's tokens; Video2World also the condition mask (B, 1, F, h, w) (ones on the
        conditioned frame) and the fps (a host value: the RoPE's frame positions)."""
        rng = np.random.default_rng(seed)
        b = w.step_batch
        shape = self.latent_shape(w)
        latents = rng.standard_normal(shape, dtype=np.float32)
        embeds = wan_text_states(rng, b, self.text_len(w), int(w.transformer.get("text_embed_dim", 1024)),
                                 self.text_valid(w), w.cfg)
        out = {"latents": latents, "embeds": embeds}
        if self.video_to_world(w):
            f = shape[2]
            nc = min(COSMOS_COND_FRAMES, f)
            t_cond = np.float32(1e-4) / (np.float32(1e-4) + np.float32(1))
            t = np.full((b, f), COSMOS_TIMESTEP, np.float32)
            t[:, :nc] = t_cond
            mask = np.zeros((b, 1) + shape[2:], np.float32)
            mask[:, :, :nc] = 1
            out.update(t=t, condition_mask=mask, fps=np.float32(COSMOS_FPS))
        else:
            out["t"] = np.full((b,), COSMOS_TIMESTEP, np.float32)
        return out

    def embed_args(self, inputs, dtype):
        fps = float(inputs["fps"]) if "fps" in inputs else None
        mask = inputs["condition_mask"].astype(dtype) if "condition_mask" in inputs else None
        return (inputs["latents"].astype(dtype), inputs["t"].astype(dtype), inputs["embeds"].astype(dtype), fps, mask)

    def analytic_flops(self, w):
        return cosmos_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w),
                                     per_frame=self.video_to_world(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return CosmosTorchReference(transformer, dtype, seed=seed, device=device)


# ============================================================================================
# LongCat-Image (FLUX.1's blocks; no pooled text or guidance embedding; Qwen2.5-VL text, rotated too)
# ============================================================================================

LONGCAT_TEXT_TOKENS = 512  # LongCatImagePipeline's tokenizer_max_length: the text's tokens, also the image ids' start


def longcat_analytic_flops(transformer: dict, latent_shape: tuple[int, ...], text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one LongCat-Image transformer forward: :func:`flux_analytic_flops` (the same double- and
    single-stream blocks, context embedder, x embedder and head; D_j = 3584, Qwen2.5-VL) without the pooled-text
    embedder 2 B (P d + d^2) and without a guidance embedder (the timestep embedder alone: 2 B (256 d + d^2))."""
    t = dict(transformer, guidance_embeds=False, pooled_projection_dim=0)
    f = flux_analytic_flops(t, latent_shape, text_len)
    b = latent_shape[0]
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    cut = 2.0 * b * d * d  # the pooled embedder's second linear (its first: P = 0 above)
    return dict(f, total=f["total"] - cut, linear=f["linear"] - cut)


class LongCatImageTorchReference(KeywordTorchReference):
    """diffusers' ``LongCatImageTransformer2DModel`` called as ``LongCatImagePipeline`` calls it: the packed latents
    and the Qwen2.5-VL states in the model's dtype, ``timestep`` = t / 1000, ``img_ids`` (1, 512 + row, 512 + column)
    and ``txt_ids`` (0, i, i); one call on both CFG halves (the pipeline calls it per half: the same work)."""

    diffusers_class = "LongCatImageTransformer2DModel"

    call_args = {"hidden_states": LATENTS, "encoder_hidden_states": EMBEDS, "timestep": Arg("t", "model"),
                 "img_ids": Arg("img_ids", "model"), "txt_ids": Arg("txt_ids", "model")}


class LongCatImage(Flux):
    """LongCat-Image text-to-image with CFG (two halves per prompt): FLUX.1's two block phases
    (:func:`xdit_jax.pipelines.flux.transformer_over_mesh` runs its model: the same ``embed`` / ``double_blocks`` /
    ``single_blocks`` / ``head``), the text from Qwen2.5-VL, no pooled text and no guidance embedding."""

    name = "longcat_image"
    module_name = "xdit_jax.models.longcat_image"
    model_class_name = "LongCatImageTransformer2DModel"
    config_class_name = "LongCatImageConfig"
    title = "LongCat-Image"
    default_cfg = True

    def pipeline_call(self, w):
        return Family.pipeline_call(self, w)

    def text_len(self, w):
        """Qwen2.5-VL tokens: the pipeline's ``tokenizer_max_length`` (512)."""
        return int(w.text_tokens or w.defaults.get("max_sequence_length") or LONGCAT_TEXT_TOKENS)

    def reference_tokens(self, w) -> int:
        return 0

    def row_fields(self, w, cfg):
        return dict(super().row_fields(w, cfg), guidance_embeds=False, true_cfg=False, cfg=w.cfg)

    def make_inputs(self, w, seed=0):
        """As ``LongCatImagePipeline`` passes them: packed latents (B, S, in_channels), Qwen2.5-VL states (B, L,
        joint_attention_dim), the timestep t / 1000 (B,) float and the host ids: ``img_ids`` (S, 3) = (1, 512 + row,
        512 + column) (the start: the text's length) and ``txt_ids`` (L, 3) = (0, i, i)."""
        from xdit_jax.models import longcat_image as lc

        t = w.transformer
        rng = np.random.default_rng(seed)
        b, txt = w.step_batch, self.text_len(w)
        gh, gw = self.grid(w)
        return {"latents": rng.standard_normal(self.latent_shape(w), dtype=np.float32),
                "embeds": rng.standard_normal((b, txt, int(t.get("joint_attention_dim", 3584))), dtype=np.float32),
                "t": np.full((b,), FLUX_TIMESTEP, dtype=np.float32),
                "img_ids": lc.image_ids(gh, gw, txt), "txt_ids": lc.text_ids(txt)}

    def embed_args(self, inputs, dtype):
        return (inputs["latents"].astype(dtype), inputs["embeds"].astype(dtype), inputs["t"], inputs["img_ids"],
                inputs["txt_ids"])

    def analytic_flops(self, w):
        return longcat_analytic_flops(w.transformer, self.latent_shape(w), self.text_len(w))

    def torch_reference(self, transformer, dtype, seed=0, device=None):
        return LongCatImageTorchReference(transformer, dtype, seed=seed, device=device)


FAMILIES: dict[str, Family] = {f.name: f for f in (CogVideoX(), PixArt(), HunyuanDiT(), Mochi(), Flux(),
                                                          SD3(), Wan(), SkyReelsV2(), Latte(), HunyuanVideo(),
                                                          HunyuanVideo15(), QwenImage(), ZImage(), Sana(), Chroma(),
                                                          Lumina2(), Flux2(), LTX(), ConsisID(), CogView3(),
                                                          CogView4(), HunyuanImage(), Kandinsky5(), SanaVideo(),
                                                          WanVACE(), HiDream(), Cosmos(),
                                                          LongCatImage())}
CONSISID_CLASS_NAMES = ("ConsisIDTransformer3DModel",)
CHROMA_CLASS_NAMES = ("ChromaTransformer2DModel",)
PIXART_CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")
HUNYUANDIT_CLASS_NAMES = ("HunyuanDiT2DModel",)
MOCHI_CLASS_NAMES = ("MochiTransformer3DModel",)
FLUX_CLASS_NAMES = ("FluxTransformer2DModel",)
SD3_CLASS_NAMES = ("SD3Transformer2DModel",)
WAN_CLASS_NAMES = ("WanTransformer3DModel",)
SKYREELS_V2_CLASS_NAMES = ("SkyReelsV2Transformer3DModel",)
LATTE_CLASS_NAMES = ("LatteTransformer3DModel",)
HUNYUAN_VIDEO_CLASS_NAMES = ("HunyuanVideoTransformer3DModel",)
HUNYUAN_VIDEO15_CLASS_NAMES = ("HunyuanVideo15Transformer3DModel",)
QWEN_IMAGE_CLASS_NAMES = ("QwenImageTransformer2DModel",)
ZIMAGE_CLASS_NAMES = ("ZImageTransformer2DModel",)
SANA_CLASS_NAMES = ("SanaTransformer2DModel",)
LUMINA2_CLASS_NAMES = ("Lumina2Transformer2DModel",)
FLUX2_CLASS_NAMES = ("Flux2Transformer2DModel",)
LTX_CLASS_NAMES = ("LTXVideoTransformer3DModel",)
COGVIEW3_CLASS_NAMES = ("CogView3PlusTransformer2DModel",)
COGVIEW4_CLASS_NAMES = ("CogView4Transformer2DModel",)
HUNYUAN_IMAGE_CLASS_NAMES = ("HunyuanImageTransformer2DModel",)
KANDINSKY5_CLASS_NAMES = ("Kandinsky5Transformer3DModel",)
SANA_VIDEO_CLASS_NAMES = ("SanaVideoTransformer3DModel",)
WAN_VACE_CLASS_NAMES = ("WanVACETransformer3DModel",)
HIDREAM_CLASS_NAMES = ("HiDreamImageTransformer2DModel",)
COSMOS_CLASS_NAMES = ("CosmosTransformer3DModel",)
LONGCAT_IMAGE_CLASS_NAMES = ("LongCatImageTransformer2DModel",)


def family_of_config(transformer: dict) -> str:
    """The family of a diffusers transformer ``config.json``: HunyuanVideo by its class name or its
    ``num_single_layers`` with ``num_refiner_layers``; Qwen-Image by its class name or ``axes_dims_rope`` without
    ``num_single_layers`` (FLUX has both); FLUX by its class name or its
    ``num_single_layers`` (no other family but HunyuanVideo has one); HunyuanDiT by its class name or its
    ``text_len_t5``; Mochi by its class name or, without one, ``pooled_projection_dim`` together with
    ``time_embed_dim`` (of the others, HunyuanDiT and FLUX have the first, only CogVideoX the second);
    PixArt by its class name (the hub's PixArt checkpoints say ``Transformer2DModel``) or its
    ``ada_norm_single`` norm; SD3 / SD3.5 by its class name or ``caption_projection_dim`` together with
    ``pos_embed_max_size`` (no other family has the first); Wan by its class name or ``ffn_dim`` together with
    ``freq_dim`` (no other family has either), SkyReels-V2 (before Wan) by its class name or
    ``inject_sample_info``; Latte by its class name or ``ada_norm_single`` with ``video_length``;
    SANA by its class name or ``cross_attention_head_dim`` with ``mlp_ratio`` (no other family has the first);
    Chroma by its class name or ``approximator_num_channels`` (before FLUX: it has ``num_single_layers`` too);
    Lumina 2 by its class name or ``cap_feat_dim`` with ``num_refiner_layers`` and ``multiple_of`` (Z-Image has the
    first and ``n_refiner_layers``, HunyuanVideo the second without the others);
    FLUX.2 by its class name or ``num_single_layers`` with ``timestep_guidance_channels`` (checked before FLUX.1,
    whose ``num_single_layers`` it shares); LTX-Video by its class name or ``caption_channels`` with ``patch_size_t``
    and ``qk_norm`` (PixArt has the first only); ConsisID by its class name or ``is_train_face``;
    HunyuanVideo-1.5 by its class name or ``text_embed_2_dim`` (no other family has it); CogView4 by its class name
    or ``condition_dim`` with ``rope_axes_dim``; CogView3-Plus by its class name or ``condition_dim`` alone (no other
    family has either); HunyuanImage-2.1 by its class name or ``num_single_layers`` with ``text_embed_2_dim`` or a
    2-D ``rope_axes_dim`` (before HunyuanVideo-1.5, which has the second only, and HunyuanVideo: 3-D RoPE);
    Kandinsky 5.0 by its class name or ``in_visual_dim`` (no other family has it); SANA-Video (before SANA) by its
    class name or ``cross_attention_head_dim`` with ``rope_max_seq_len`` (SANA has the first only, Wan the second);
    Wan VACE (before Wan) by its class name or ``vace_layers``; HiDream-I1 (before FLUX and HunyuanImage) by its class
    name or ``llama_layers`` (no other family has it); Cosmos-Predict2 by its class name or ``adaln_lora_dim`` (no
    other family has it); LongCat-Image (before FLUX) by its class name or ``num_single_layers`` with a 3584-wide
    ``joint_attention_dim`` and no ``guidance_embeds`` (FLUX.1's configs say it, its T5 is 4096 wide); else
    CogVideoX."""
    if transformer.get("_class_name") in HIDREAM_CLASS_NAMES or "llama_layers" in transformer:
        return "hidream"
    if transformer.get("_class_name") in COSMOS_CLASS_NAMES or "adaln_lora_dim" in transformer:
        return "cosmos"
    if transformer.get("_class_name") in LONGCAT_IMAGE_CLASS_NAMES or (
            "num_single_layers" in transformer and int(transformer.get("joint_attention_dim", 0)) == 3584
            and "guidance_embeds" not in transformer):
        return "longcat_image"
    if transformer.get("_class_name") in SANA_VIDEO_CLASS_NAMES or (
            "cross_attention_head_dim" in transformer and "rope_max_seq_len" in transformer):
        return "sana_video"
    if transformer.get("_class_name") in WAN_VACE_CLASS_NAMES or "vace_layers" in transformer:
        return "wan_vace"
    if transformer.get("_class_name") in HUNYUAN_IMAGE_CLASS_NAMES or ("num_single_layers" in transformer and (
            "text_embed_2_dim" in transformer or len(transformer.get("rope_axes_dim") or ()) == 2)):
        return "hunyuanimage"
    if transformer.get("_class_name") in KANDINSKY5_CLASS_NAMES or "in_visual_dim" in transformer:
        return "kandinsky5"
    if transformer.get("_class_name") in COGVIEW4_CLASS_NAMES or (
            "condition_dim" in transformer and "rope_axes_dim" in transformer):
        return "cogview4"
    if transformer.get("_class_name") in COGVIEW3_CLASS_NAMES or "condition_dim" in transformer:
        return "cogview3"
    if transformer.get("_class_name") in HUNYUAN_VIDEO15_CLASS_NAMES or "text_embed_2_dim" in transformer:
        return "hunyuan_video15"
    if transformer.get("_class_name") in LTX_CLASS_NAMES or (
            "caption_channels" in transformer and "patch_size_t" in transformer and "qk_norm" in transformer):
        return "ltx"
    if transformer.get("_class_name") in SANA_CLASS_NAMES or (
            "cross_attention_head_dim" in transformer and "mlp_ratio" in transformer):
        return "sana"
    if transformer.get("_class_name") in LUMINA2_CLASS_NAMES or (
            "cap_feat_dim" in transformer and "num_refiner_layers" in transformer and "multiple_of" in transformer):
        return "lumina2"
    if transformer.get("_class_name") in ZIMAGE_CLASS_NAMES or (
            "cap_feat_dim" in transformer and "n_refiner_layers" in transformer):
        return "zimage"
    if transformer.get("_class_name") in SKYREELS_V2_CLASS_NAMES or "inject_sample_info" in transformer:
        return "skyreels_v2"
    if transformer.get("_class_name") in WAN_CLASS_NAMES or ("ffn_dim" in transformer and "freq_dim" in transformer):
        return "wan"
    if transformer.get("_class_name") in QWEN_IMAGE_CLASS_NAMES or (
            "axes_dims_rope" in transformer and "num_single_layers" not in transformer):
        return "qwenimage"
    if transformer.get("_class_name") in FLUX2_CLASS_NAMES or (
            "num_single_layers" in transformer and "timestep_guidance_channels" in transformer):
        return "flux2"
    if transformer.get("_class_name") in CHROMA_CLASS_NAMES or "approximator_num_channels" in transformer:
        return "chroma"
    if transformer.get("_class_name") in HUNYUAN_VIDEO_CLASS_NAMES or (
            "num_single_layers" in transformer and "num_refiner_layers" in transformer):
        return "hunyuanvideo"
    if transformer.get("_class_name") in FLUX_CLASS_NAMES or "num_single_layers" in transformer:
        return "flux"
    if transformer.get("_class_name") in SD3_CLASS_NAMES or (
            "caption_projection_dim" in transformer and "pos_embed_max_size" in transformer):
        return "sd3"
    if transformer.get("_class_name") in HUNYUANDIT_CLASS_NAMES or "text_len_t5" in transformer:
        return "hunyuandit"
    if transformer.get("_class_name") in MOCHI_CLASS_NAMES or (
            "pooled_projection_dim" in transformer and "time_embed_dim" in transformer):
        return "mochi"
    if transformer.get("_class_name") in LATTE_CLASS_NAMES or (
            transformer.get("norm_type") == "ada_norm_single" and "video_length" in transformer):
        return "latte"
    if transformer.get("_class_name") in PIXART_CLASS_NAMES or transformer.get("norm_type") == "ada_norm_single":
        return "pixart"
    if transformer.get("_class_name") in CONSISID_CLASS_NAMES or "is_train_face" in transformer:
        return "consisid"
    return "cogvideox"


def family_of_model(cfg: Any) -> Family:
    """The family of a model config dataclass (``CogVideoXConfig``, ``PixArtConfig``, ``HunyuanDiTConfig``,
    ``MochiConfig``, ``FluxConfig``, ``SD3Config``, ``WanConfig``)."""
    for fam in FAMILIES.values():
        if type(cfg).__name__ == fam.config_class_name:
            return fam
    raise TypeError(f"No benchmark family for a {type(cfg).__name__}.")
