"""The shared denoise loop and pipeline plumbing every model family uses.

The loop is plain Python over a jitted step: it drives the progress bar and never pulls
a value back to the host between steps (the arrays stay on device; only the final
``block_until_ready`` waits).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class StageTimer:
    """Wall-clock seconds per stage ("text_encoding", "denoising", "decoding"...)."""

    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def denoise_loop(step: Callable[[Any, int], Any], carry: Any, num_steps: int, *, progress: bool = True,
                 desc: str = "denoising") -> Any:
    """``carry = step(carry, i)`` for i in range(num_steps), with a tqdm bar; returns the carry."""
    from tqdm.auto import tqdm

    show = progress and jax.process_index() == 0
    for i in tqdm(range(num_steps), desc=desc, disable=not show, unit="step"):
        carry = step(carry, i)
    return jax.block_until_ready(carry)


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the local devices (max over devices), where the backend reports it."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:  # backends without stats
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def as_numpy(x) -> np.ndarray:
    """Fetch a (possibly sharded, possibly multi-process) array to the host as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Loading and the per-pipeline plumbing every family shares (dtype, mesh, backend, text, batch)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def parse_dtype(dtype):
    """'float32' / 'bfloat16' / 'float16' (or a dtype) -> the jnp scalar type; None -> float32."""
    import jax.numpy as jnp

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
        return getattr(jnp, DTYPES[dtype])
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


# The seed of PipelineBase.from_config's random weights while it builds a pipeline (None: read checkpoints).
_RANDOM_WEIGHTS: contextvars.ContextVar[int | None] = contextvars.ContextVar("xdit_jax_random_weights",
                                                                            default=None)


def load_component(folder, name: str, dtype, sharding, prepare=None):
    """(config, module) of the converted component ``folder/name``; ``prepare(params)`` may re-lay
    the parameters (e.g. PipeFusion's padded stack) before the module is built. Under
    ``PipelineBase.from_config``: :func:`random_component` instead."""
    from pathlib import Path

    from xdit_jax.checkpoint import restore_params
    from xdit_jax.conversion import MARKER, model_class, read_json

    if _RANDOM_WEIGHTS.get() is not None:
        return random_component(folder, name, dtype, sharding, prepare, seed=_RANDOM_WEIGHTS.get())
    folder = Path(folder)
    cls = read_json(folder / MARKER)["components"][name]
    mod, cfg_cls = model_class(cls)
    cfg = cfg_cls.from_dict(read_json(folder / name / "config.json"))
    params = restore_params(folder / name / "params", dtype=dtype, sharding=sharding)
    if prepare is not None:
        params = prepare(params)
    return cfg, mod.build(cfg, params, dtype)


def random_component(folder, name: str, dtype, sharding, prepare=None, seed: int = 0):
    """(config, module) of the component ``name`` of a diffusers-layout folder of configs (model_index.json
    names its class, ``name/config.json`` its config; no weights are read) with random parameters drawn on
    the device (:func:`xdit_jax.tiny.random_params_on_device`) and placed as :func:`load_component` places
    a checkpoint's."""
    import zlib
    from pathlib import Path

    from flax import nnx

    from xdit_jax import tiny
    from xdit_jax.conversion import model_class, model_components, read_json
    from xdit_jax.keymap import to_pure_dict

    folder = Path(folder)
    components = model_components(folder)
    if name not in components:
        raise ValueError(f"{folder}/model_index.json lists no {name!r} (it lists {', '.join(sorted(components))}).")
    mod, cfg_cls = model_class(components[name])
    cfg = cfg_cls.from_dict(read_json(folder / name / "config.json"))
    abstract = to_pure_dict(nnx.state(mod.build(cfg, {}, dtype), nnx.Param))  # shapes only: nothing allocated
    params = tiny.random_params_on_device(abstract, seed + zlib.crc32(name.encode()), dtype, sharding)
    if prepare is not None:
        params = prepare(params)
    return cfg, mod.build(cfg, params, dtype)


def load_vae_encoder(folder, vae_config, dtype, sharding, module):
    """The VAE's encoder (image-to-video) of a converted folder, ``vae/encoder_params`` (conversion writes it:
    ``extra_params_from_torch``), built by ``module`` (``build(vae_config, params, dtype)``); random under
    :meth:`PipelineBase.from_config`."""
    params = load_extra_params(folder, "vae/encoder_params", "the VAE's encoder (an older xdit_jax, or a checkpoint "
                               "without encoder tensors)", lambda: module.build(vae_config, {}, dtype), "vae_encoder",
                               dtype, sharding)
    return module.build(vae_config, params, dtype)


def load_extra_params(folder, subpath: str, missing: str, abstract_model, tag: str, dtype, sharding) -> dict:
    """Parameters conversion writes beside a component (``subpath`` of the converted folder: a VAE's encoder, a
    vision tower), or random ones of ``abstract_model()``'s shapes under :meth:`PipelineBase.from_config` (seeded by
    ``tag``); a clear error naming ``missing`` where the folder lacks them."""
    import zlib
    from pathlib import Path

    from flax import nnx

    from xdit_jax.checkpoint import restore_params
    from xdit_jax.keymap import to_pure_dict
    from xdit_jax.safetensors_io import CheckpointError

    if _RANDOM_WEIGHTS.get() is not None:
        from xdit_jax import tiny

        abstract = to_pure_dict(nnx.state(nnx.eval_shape(abstract_model), nnx.Param))
        return tiny.random_params_on_device(abstract, _RANDOM_WEIGHTS.get() + zlib.crc32(tag.encode()), dtype,
                                            sharding)
    path = Path(folder) / subpath
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this folder was converted without {missing}; convert the "
                              "diffusers folder again (delete the cached conversion).")
    return restore_params(path, dtype=dtype, sharding=sharding)


def rgb_image(image):
    """An image input checked and made RGB: a PIL image in RGB (transparency put on white, as transformers'
    ``convert_to_rgb`` does; palette and grey images converted), or an array (H, W, 3) of uint8 or of floats in
    [0, 1] (float32); anything else refused."""
    if hasattr(image, "convert") and hasattr(image, "resize"):  # a PIL image
        from PIL import Image

        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA"):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: a PIL image or an array (height, width, 3); got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f" and array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"image: a float array must hold values in [0, 1] (got {array.min()} .. {array.max()}).")
    if array.dtype.kind != "f":
        raise ValueError(f"image array of {array.dtype}: give uint8 (0-255) or floats in [0, 1].")
    return array.astype(np.float32)


def preprocess_image(image, height: int, width: int) -> jax.Array:
    """An image as diffusers' ``VideoProcessor.preprocess`` makes it for the VAE: a PIL image (:func:`rgb_image`)
    resized to ``width`` x ``height`` (Lanczos, as diffusers' default), or an array (H, W, 3) of that size (uint8, or
    floats in [0, 1]); -> (1, 3, height, width) float32 in [-1, 1]."""
    image = rgb_image(image)
    if not isinstance(image, np.ndarray):
        from PIL import Image

        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        array = np.asarray(image, np.float32) / 255.0
    else:
        if image.shape[:2] != (height, width):
            raise ValueError(f"image array {image.shape[:2]} is not {height} x {width}; resize it first (or pass a PIL "
                             "image, resized as diffusers does).")
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
    return jnp.asarray(array.transpose(2, 0, 1)[None] * 2.0 - 1.0)


def load_tokenizer(folder, name: str = "tokenizer"):
    """The tokenizer ``folder/name``; under ``PipelineBase.from_config`` a small stand-in of the kind
    model_index.json names (:func:`xdit_jax.tiny.stand_in_tokenizer`)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from xdit_jax.conversion import read_json

    if _RANDOM_WEIGHTS.get() is not None:
        from xdit_jax import tiny

        index = read_json(Path(folder) / "model_index.json")
        spec = index.get(name) or [None, "T5Tokenizer"]
        encoder = index.get(name.replace("tokenizer", "text_encoder")) or [None, ""]
        return tiny.stand_in_tokenizer(str(spec[1]), str(encoder[1]), str(index.get("_class_name", "")))
    return AutoTokenizer.from_pretrained(Path(folder) / name)


def converted_cache_dir(src, cache_dir=None):
    """Where the converted copy of the diffusers folder ``src`` lives (keyed by path and weights)."""
    import hashlib
    import os
    from pathlib import Path

    src = Path(src)
    root = Path(cache_dir or os.environ.get("XDIT_JAX_CACHE") or Path.home() / ".cache" / "xdit_jax") / "converted"
    h = hashlib.sha256(str(src.resolve()).encode())
    for p in sorted(src.rglob("*")):
        if p.is_file() and (p.suffix in (".json", ".safetensors")):
            st = p.stat()
            h.update(f"{p.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return root / f"{src.resolve().name}-{h.hexdigest()[:16]}"


def converted_folder(model, *, cache_dir=None, variant=None, revision=None):
    """A converted xdit_jax folder for ``model`` (a converted folder, a diffusers folder — converted on
    first use into the cache, by process 0 — or a hub id)."""
    import logging

    from xdit_jax.conversion import MARKER, is_converted
    from xdit_jax.distributed import call_on_process_zero
    from xdit_jax.hub import resolve_model
    from xdit_jax.safetensors_io import CheckpointError

    if _RANDOM_WEIGHTS.get() is not None:  # PipelineBase.from_config: the configs are all it reads
        from pathlib import Path

        folder = Path(model)
        if not (folder / "model_index.json").exists():
            raise CheckpointError(f"{folder} holds no model_index.json: from_config needs a folder of configs in "
                                  f"diffusers' layout (model_index.json, each component's config.json, the "
                                  f"scheduler's), as configs/ in this repository holds.")
        return folder
    folder = resolve_model(model, revision=revision)
    if is_converted(folder):
        return folder
    if not (folder / "model_index.json").exists():
        raise CheckpointError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a "
                              f"converted xdit_jax folder ({MARKER}).")
    target = converted_cache_dir(folder, cache_dir)
    if not is_converted(target):
        if jax.process_index() == 0:
            logging.getLogger("xdit_jax").warning("converting %s to %s (first use; cached for later runs)",
                                                  folder, target)
        call_on_process_zero("xdit_jax.conversion", "convert_pipeline", "xdit_jax_convert", src=str(folder),
                             out=str(target), variant=variant, overwrite=target.exists())
    return target


def pipeline_class_name(folder) -> str:
    """The diffusers pipeline class a folder holds (``model_index.json``'s ``_class_name``)."""
    from pathlib import Path

    from xdit_jax.conversion import read_json

    return str(read_json(Path(folder) / "model_index.json").get("_class_name", ""))


def prompt_batch(prompt, prompt_embeds, output_type: str, embeds_need: str = "") -> tuple[list[str] | None, int]:
    """The checks every family's call makes first (a prompt or its embeddings, not both, not none; the output
    type): the prompts as a list (None where embeddings are given) and the batch. ``embeds_need``: what else
    the embeddings need, for the message."""
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}.")
    if prompt is None and prompt_embeds is None:
        raise ValueError(f"Give a prompt or prompt_embeds{' ' + embeds_need if embeds_need else ''}.")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Give either prompt or prompt_embeds, not both.")
    prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
    batch = len(prompts) if prompts is not None else int(np.shape(prompt_embeds)[0])
    if batch < 1:
        raise ValueError("Give at least one prompt (an empty list or empty prompt_embeds makes nothing).")
    return prompts, batch


def per_prompt(n, name: str = "num_images_per_prompt") -> int:
    """diffusers' ``num_images_per_prompt`` / ``num_videos_per_prompt``, checked: a positive integer."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {n!r}.")
    return int(n)


def check_size_and_mesh(height: int, width: int, multiple: int, num_layers: int, batch: int, mesh_spec,
                        guidance_scale: float) -> None:
    """The checks every family makes before any heavy work: image size, and what the mesh needs
    (guidance for ``cfg=2``, PipeFusion's stages; any number of prompts fits ``data``: the transformer's
    batch is padded, :meth:`PipelineBase._model_batch`)."""
    from xdit_jax.mesh import MeshSpec
    from xdit_jax.parallel import pipefusion

    m = multiple
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {m}; got {height}x{width} "
                         f"(e.g. {max(m, height // m * m)}x{max(m, width // m * m)}).")
    ms = MeshSpec.parse(mesh_spec)
    if ms.cfg == 2 and guidance_scale <= 1.0:
        raise ValueError("Mesh cfg=2 splits the two halves of classifier-free guidance, which needs "
                         "guidance_scale > 1; drop cfg=2 from the mesh or raise the guidance scale.")
    if ms.pipefusion > 1:
        pipefusion.check_mesh(ms, num_layers)


AUTO_TILING_SHARE = 0.9  # of the device's free memory an untiled decode may plan to use


def device_free_bytes(device) -> int | None:
    """The device allocator's limit minus what it holds, or None where the backend does not report it
    (the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (backends without memory stats raise or return None)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def compile_decode(fn, state, latents):
    """The untiled decode compiled for ``latents`` (on a GPU this runs XLA's autotuner on the device)."""
    return fn.lower(state, latents).compile()


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (also inside XLA's autotuner, which then
    reports that every config of a fusion failed)."""
    text = str(error)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "All configs failed during profiling"))


def decode_bytes(compiled) -> int | None:
    """What a compiled decode adds to the device's memory: its temporaries and output (XLA's memory
    analysis, per device), or None where the backend gives no analysis."""
    from xdit_jax.hlo import memory_analysis_bytes

    m = memory_analysis_bytes(compiled)
    return None if m is None else m.get("temp_size_in_bytes", 0) + m.get("output_size_in_bytes", 0)


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) as diffusers makes them: padded to max length, truncated with a warning."""
    enc = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    warn_if_truncated(tokenizer, prompts, max_sequence_length)
    return enc.input_ids, enc.attention_mask


def warn_if_truncated(tokenizer, prompts: list[str], max_sequence_length: int) -> None:
    """diffusers' warning where a prompt has more tokens than ``max_sequence_length`` (the part cut off)."""
    import logging

    full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if full.shape[-1] > max_sequence_length:
        removed = tokenizer.batch_decode(full[:, max_sequence_length - 1: -1])
        logging.getLogger("xdit_jax").warning(
            "The following part of your input was truncated because `max_sequence_length` is set to %d tokens: %s",
            max_sequence_length, removed)


def negative_prompts(negative_prompt, batch: int) -> list[str]:
    """diffusers' rule: one string for every prompt (default ""), or one per prompt."""
    neg = negative_prompt or ""
    neg = [neg] * batch if isinstance(neg, str) else list(neg)
    if len(neg) != batch:
        raise ValueError(f"negative_prompt has {len(neg)} entries for {batch} prompts.")
    return neg


def masked_text_for_cfg(pipe, prompts, batch: int, width: int, do_cfg: bool, max_sequence_length: int,
                        prompt_embeds=None, prompt_attention_mask=None, negative_prompt=None,
                        negative_prompt_embeds=None, negative_prompt_attention_mask=None):
    """A masked text as the step takes it (Mochi's, LTX-Video's T5): ``(states (B, L, width) in the pipeline's dtype,
    mask (B, L) int32)``, encoded by ``pipe.encode_prompt(prompts, length) -> (states, mask)`` where not given; with
    CFG the negative prompt's first (encoded at the prompt's length), ``[negative; positive]``. States of another
    width or a mask of another shape are refused."""
    import jax.numpy as jnp

    if prompt_embeds is None:
        prompt_embeds, prompt_attention_mask = pipe.encode_prompt(prompts, max_sequence_length)
    emb, mask = jnp.asarray(prompt_embeds, pipe.dtype), jnp.asarray(prompt_attention_mask, jnp.int32)
    if emb.ndim != 3 or emb.shape[2] != width or mask.shape != emb.shape[:2]:
        raise ValueError(f"prompt_embeds {tuple(emb.shape)} with mask {tuple(mask.shape)}: this model takes "
                         f"(batch, tokens, {width}) and a (batch, tokens) mask.")
    if not do_cfg:
        return emb, mask
    if negative_prompt_embeds is None:
        negative_prompt_embeds, negative_prompt_attention_mask = pipe.encode_prompt(
            negative_prompts(negative_prompt, batch), emb.shape[1])
    nemb = jnp.asarray(negative_prompt_embeds, pipe.dtype)
    nmask = jnp.asarray(negative_prompt_attention_mask, jnp.int32)
    if nemb.shape != emb.shape or nmask.shape != mask.shape:
        raise ValueError(f"negative_prompt_embeds {nemb.shape} with mask {nmask.shape} must have the "
                         f"shapes of prompt_embeds {emb.shape} and its mask {mask.shape}.")
    return jnp.concatenate([nemb, emb]), jnp.concatenate([nmask, mask])


class PipelineBase:
    """What every family's pipeline shares: its parts, compute dtype, attention backend, the mesh,
    PipeFusion's settings, the jitted text encoder, how batches are laid over the mesh, the
    transformer's block stack over the mesh and the loop over the jitted steps."""

    # What the decode falls back to where its one-pass plan does not fit (:meth:`_auto_tiling`): "tiles"
    # (diffusers' enable_tiling), or a value the family's decode takes as its ``tiling`` argument for an exact
    # low-memory decode of its own (Wan: "frame by frame", a causal VAE's frames one latent frame at a time).
    LOW_MEMORY_DECODE = "tiles"

    # What a family's loading differs in (one ``__init__`` / ``from_pretrained`` serves every family that sets
    # these; a family with more parts overrides :meth:`_extra_parts` and takes them in its ``__init__``):
    PIPELINE_CLASSES: tuple[str, ...] = ()  # the diffusers pipeline classes (model_index.json) its folders hold
    CONFIG = None  # its transformer's config class (``from_dict``)
    MORE_TEXT_ENCODERS: tuple[str, ...] = ()  # suffixes of more (text_encoder_N, tokenizer_N) pairs, e.g. ("_2",)
    SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)  # the diffusers schedulers it runs with

    STACKED = None  # the Flax name of a one-stack family's stacked blocks (all num_layers of them)

    @classmethod
    def stacks(cls, transformer_config) -> dict:
        """:meth:`_init_parts`' stack arguments (``stacked``, ``stacked_layers``, ``final_block``, ...) for a
        transformer config: the family's block stacks as PipeFusion and the sequence-parallel loop see them.
        Here the one stack :attr:`STACKED`; families with more set their model module's ``pipefusion_stacks``."""
        return {"stacked": cls.STACKED}

    def __init__(self, *, transformer, transformer_config, vae, vae_config, text_encoder, tokenizer,
                 scheduler_config, dtype=jnp.float32, mesh=None, attention_backend: str = "auto",
                 pipefusion_patches: int | None = None, pipefusion_warmup_steps: int = 1, **more_encoders):
        """The parts as :meth:`from_pretrained` loads them; ``more_encoders``: ``text_encoder_N`` / ``tokenizer_N``
        of the family's :attr:`MORE_TEXT_ENCODERS` (None where a folder lacks an optional one)."""
        names = [f"{part}{suffix}" for suffix in self.MORE_TEXT_ENCODERS for part in ("text_encoder", "tokenizer")]
        unknown = sorted(set(more_encoders) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected parts {unknown}; it takes {names or 'no more'}.")
        for name in names:
            setattr(self, name, more_encoders.get(name))
        self._init_parts(transformer=transformer, transformer_config=transformer_config, vae=vae,
                         vae_config=vae_config, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler_config=scheduler_config, dtype=dtype, mesh=mesh,
                         attention_backend=attention_backend, pipefusion_patches=pipefusion_patches,
                         pipefusion_warmup_steps=pipefusion_warmup_steps, **self.stacks(transformer_config))

    @classmethod
    def from_pretrained(cls, model, *, mesh=None, dtype="float32", cache_dir=None, variant: str | None = None,
                        revision: str | None = None, attention_backend: str = "auto",
                        pipefusion_patches: int | None = None, pipefusion_warmup_steps: int = 1):
        """Load a converted folder, a diffusers folder (converted on first use and cached), or a hub id.
        ``mesh``: a ``jax.sharding.Mesh`` or a spec such as ``"cfg=2,ulysses=2"``; ``pipefusion_patches`` /
        ``pipefusion_warmup_steps``: PipeFusion's patches per step (default: the ``pipefusion`` degree) and exact
        steps before the patched ones (default 1), xDiT's ``--num_pipeline_patch`` / ``--warmup_steps``."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.conversion import read_json
        from xdit_jax.mesh import build_mesh

        dtype = parse_dtype(dtype)
        folder, kind = cls._pipeline_folder(model, cls.PIPELINE_CLASSES, cache_dir=cache_dir, variant=variant,
                                            revision=revision)
        mesh_obj = mesh if hasattr(mesh, "axis_names") else build_mesh(mesh)
        tc = cls.CONFIG.from_dict(read_json(folder / "transformer" / "config.json"))
        stacks = cls.stacks(tc)
        scheduler = cls._scheduler_parts(folder)  # (the folder's own checks before the weights load)
        extra = cls._extra_parts(folder, mesh_obj, dtype, kind)
        parts = cls._load_parts(folder, mesh_obj, dtype, stacks["stacked"],
                                stacks.get("stacked_layers", tc.num_layers), cls._transformer_names(folder))
        for suffix in cls.MORE_TEXT_ENCODERS:
            parts[f"text_encoder{suffix}"] = load_component(folder, f"text_encoder{suffix}", dtype,
                                                            NamedSharding(mesh_obj, P()))[1]
            parts[f"tokenizer{suffix}"] = load_tokenizer(folder, f"tokenizer{suffix}")
        return cls(**parts, **scheduler, **extra, dtype=dtype, mesh=mesh_obj, attention_backend=attention_backend,
                   pipefusion_patches=pipefusion_patches, pipefusion_warmup_steps=pipefusion_warmup_steps)

    @classmethod
    def _scheduler_parts(cls, folder) -> dict:
        """``__init__``'s ``scheduler_config``: ``folder/scheduler``'s, one of the family's :attr:`SCHEDULERS`."""
        from xdit_jax.conversion import read_json
        from xdit_jax.schedulers import scheduler_from_config

        sched = read_json(folder / "scheduler" / "scheduler_config.json")
        if sched.get("_class_name") not in cls.SCHEDULERS:
            raise ValueError(f"{folder}/scheduler uses {sched.get('_class_name')!r}; {cls.__name__} runs with "
                             f"{' or '.join(cls.SCHEDULERS)} here (the schedulers its checkpoints ship with).")
        return {"scheduler_config": scheduler_from_config(sched)[1]}

    @classmethod
    def _transformer_names(cls, folder) -> tuple[str, ...]:
        """The folder's transformer components, each loaded and placed alike (Wan 2.2 A14B: two experts)."""
        return ("transformer",)

    @classmethod
    def _extra_parts(cls, folder, mesh, dtype, kind: str) -> dict:
        """More ``__init__`` arguments a family reads from its folder (a VAE encoder, a flag of
        model_index.json); ``kind``: the folder's diffusers pipeline class."""
        return {}

    def _init_parts(self, *, transformer, transformer_config, vae, vae_config, text_encoder, tokenizer,
                    scheduler_config, dtype, mesh, attention_backend: str, pipefusion_patches: int | None,
                    pipefusion_warmup_steps: int, stacked, stacked_layers=None,
                    final_block: bool = False, stack_attentions=None, tail_attentions: int = 1,
                    text_keys: tuple = ()) -> None:
        """``stacked``: the Flax name of the stacked blocks, ``stacked_layers`` how many (default: the
        config's ``num_layers``), or tuples of both for a model with several stacks (FLUX); ``final_block``:
        the model ends its stack with one more block (:func:`xdit_jax.parallel.pipefusion.final_block`),
        which PipeFusion gives K/V buffers too; ``stack_attentions`` (per stack) / ``tail_attentions``: the
        attentions each block makes where more than one (SD3.5 Medium's dual attention), one buffer each;
        ``text_keys``: the ``cond`` keys of a two-stream model's text, which PipeFusion slices with the
        patches (:func:`xdit_jax.parallel.pipefusion.run_pipefusion`'s ``text``) and sequence parallelism
        shards over the sequence group (:func:`xdit_jax.parallel.sequence.run_blocks`' ``text``)."""
        self.transformer, self.transformer_config = transformer, transformer_config
        self.vae, self.vae_config = vae, vae_config
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.stacked = stacked
        self.stacked_layers = transformer_config.num_layers if stacked_layers is None else (
            int(stacked_layers) if isinstance(stacked_layers, int) else tuple(int(n) for n in stacked_layers))
        self.final_block = bool(final_block)
        self.stack_attentions, self.tail_attentions = stack_attentions, int(tail_attentions)
        self.text_keys = tuple(text_keys)
        self._setup(dtype, mesh, attention_backend)
        self._setup_pipefusion(pipefusion_patches, pipefusion_warmup_steps)
        self._step_cache = {}
        self._decode_cache = {}
        self.vae_tiling, self.vae_slicing = "auto", False

    @staticmethod
    def _load_parts(folder, mesh, dtype, stacked, num_layers, transformers=("transformer",)) -> dict:
        """The transformer (its stacked blocks laid out for PipeFusion's stages on a pipefusion mesh),
        VAE, text encoder and tokenizer of a converted folder, as keyword arguments of ``__init__``;
        ``transformers``: the transformer components (a two-expert model's ``transformer_2`` too), each
        placed alike, as ``name`` and ``name_config``."""
        from pathlib import Path

        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from xdit_jax.parallel import pipefusion

        folder = Path(folder)
        tsharding, prepare = pipefusion.stacked_placement(mesh, num_layers, stacked)
        parts = {}
        for name in transformers:
            parts[f"{name}_config"], parts[name] = load_component(folder, name, dtype, tsharding, prepare)
        replicated = NamedSharding(mesh, P())
        vcfg, vae = load_component(folder, "vae", dtype, replicated)
        _, text_encoder = load_component(folder, "text_encoder", dtype, replicated)
        return dict(parts, vae=vae, vae_config=vcfg, text_encoder=text_encoder, tokenizer=load_tokenizer(folder))

    @classmethod
    def from_config(cls, folder, *, seed: int = 0, **kwargs):
        """A pipeline of ``folder``'s configs with random weights drawn on the device: benchmarks and trials
        at full size without a checkpoint. ``folder``: diffusers' layout without weights (model_index.json,
        each component's config.json, the scheduler's config), as ``configs/<model>`` in this repository;
        the tokenizers are small stand-ins of the kinds it names (the token ids differ from the real
        tokenizers', the shapes do not). ``kwargs``: ``from_pretrained``'s (mesh, dtype, attention_backend,
        PipeFusion's settings)."""
        token = _RANDOM_WEIGHTS.set(int(seed))
        try:
            return cls.from_pretrained(folder, **kwargs)
        finally:
            _RANDOM_WEIGHTS.reset(token)

    @staticmethod
    def _pipeline_folder(model, accepted, *, cache_dir=None, variant=None, revision=None):
        """(converted folder, diffusers pipeline class) of ``model``; a clear error when the folder holds a
        pipeline other than the ``accepted`` class names."""
        folder = converted_folder(model, cache_dir=cache_dir, variant=variant, revision=revision)
        kind = pipeline_class_name(folder)
        if kind not in accepted:
            from xdit_jax.pipelines import PIPELINES

            hint = f"; load it with xdit_jax.{PIPELINES[kind][1]}" if kind in PIPELINES else ""
            raise ValueError(f"{folder} holds a {kind or 'unknown'} pipeline, not {' or '.join(accepted)}{hint}.")
        return folder, kind

    def _jit_decode(self, key, decode, post=None):
        """``fn(latents)``: the jitted VAE decode over the whole mesh (spatially split,
        :mod:`xdit_jax.parallel.vae`): ``decode(vae, latents, tiling=, slicing=, mesh=)`` -> pixels in [-1, 1]
        channels first ((B, C, H, W) or (B, C, F, H, W)); ``post`` (float32, same layout) before the
        clip to [0, 1]; returned channels last, replicated (it goes to the host next: the decoder's own
        split need not be a sharding of the pipeline's mesh, e.g. cfg=2,ring=4 over a 4 x 2 grid).
        Cached under ``key``. With ``vae_tiling == "auto"`` (the default) the decode runs in tiles where its
        untiled plan would not fit the device's free memory (:meth:`_auto_tiling`)."""
        if key in self._decode_cache:
            return self._decode_cache[key]
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        graphdef, state = nnx.split(self.vae)
        mesh, slicing = self.mesh, self.vae_slicing

        def build(tiling):
            def dec(state, latents):
                x = decode(nnx.merge(graphdef, state), latents, tiling=tiling, slicing=slicing,
                           mesh=mesh if mesh.size > 1 else None).astype(jnp.float32)
                x = post(x) if post is not None else x
                return jnp.moveaxis(jnp.clip(x / 2 + 0.5, 0.0, 1.0), 1, -1)

            return jax.jit(dec, out_shardings=NamedSharding(mesh, P()))

        if self.vae_tiling != "auto":
            dec = build(self.vae_tiling)
            self._decode_cache[key] = fn = lambda latents: dec(state, latents)
            return fn
        chosen = {}  # per latent shape: the untiled decode, or the tiled one where it would not fit

        def fn(latents):
            shape = (tuple(latents.shape), str(latents.dtype))
            if shape not in chosen:
                chosen[shape] = self._auto_tiling(build, state, latents)
            return chosen[shape](state, latents)

        self._decode_cache[key] = fn
        return fn

    def _auto_tiling(self, build, state, latents):
        """The decode for ``latents``: untiled where its compiled plan (XLA's memory analysis: temporaries and
        output per device) fits in 90% of the device's free memory (the least over the processes of a
        multi-process run), or where the backend does not say how much is free (the CPU); else, or where
        compiling it already runs out of device memory (XLA's GPU autotuner: seen with Mochi's 163-frame
        decode beside its transformer and T5-XXL on one H100), tiled with the VAE's default tiles, and a
        warning that says so (a long denoising is not lost to an out-of-memory decode;
        ``enable_vae_tiling(False)`` refuses tiles)."""
        import logging

        plain = build(None)
        free = device_free_bytes(self.mesh.devices.flat[0])
        if jax.process_count() > 1:  # one decision for all processes (different programs would hang)
            from jax.experimental import multihost_utils

            mib = np.float32(-1 if free is None else free / 2 ** 20)  # (int64 would become int32 without x64)
            got = np.asarray(multihost_utils.process_allgather(mib))
            free = None if (got < 0).any() else int(got.min() * 2 ** 20)
        if free is None:
            return plain
        try:
            compiled = compile_decode(plain, state, latents)
        except Exception as e:  # noqa: BLE001 (XLA's GPU autotuner profiles each fusion in scratch buffers:
            if not out_of_memory(e):  # a decode that does not fit can fail already while it compiles)
                raise
            compiled, why = None, f"its compile ran out of device memory ({str(e).splitlines()[0][:160]})"
        else:
            need = decode_bytes(compiled)
            why = None if need is None or need <= AUTO_TILING_SHARE * free else \
                f"it needs about {need / 2 ** 30:.1f} GiB per device"
        if jax.process_count() > 1:  # tiled if any process would not fit (one program everywhere)
            from jax.experimental import multihost_utils

            if np.asarray(multihost_utils.process_allgather(np.int32(why is not None))).any() and why is None:
                why = "another process's does not fit"
        if why is None:
            return compiled
        if self.LOW_MEMORY_DECODE != "tiles":  # the family's own exact low-memory decode (Wan: frame chunks)
            logging.getLogger("xdit_jax").warning(
                "The VAE decode of latents %s in one pass does not fit: %s, and %.1f GiB are free: decoding %s "
                "(the same video; --vae-tiling decodes in tiles instead).", tuple(latents.shape), why,
                free / 2 ** 30, self.LOW_MEMORY_DECODE)
            return build(self.LOW_MEMORY_DECODE)
        logging.getLogger("xdit_jax").warning(
            "The VAE decode of latents %s untiled does not fit: %s, and %.1f GiB are free: decoding in tiles "
            "(diffusers' enable_tiling; pipe.enable_vae_tiling(False) turns tiling off, --vae-tiling forces it).",
            tuple(latents.shape), why, free / 2 ** 30)
        return build(True)

    def enable_vae_tiling(self, tiling=True) -> None:
        """diffusers' ``vae.enable_tiling``: decode in overlapping blended tiles (``True``: diffusers'
        defaults, or a :class:`xdit_jax.parallel.vae.TilingConfig`; ``None``/``False`` turns it off, even
        where the untiled decode would not fit; ``"auto"``, the default: tiles only where it would not)."""
        self.vae_tiling = "auto" if tiling == "auto" else (tiling or None)
        self._decode_cache.clear()

    def enable_vae_slicing(self, slicing: bool = True) -> None:
        """diffusers' ``vae.enable_slicing``: decode one sample of the batch at a time."""
        self.vae_slicing = bool(slicing)
        self._decode_cache.clear()

    def _initial_latents(self, latents, shape: tuple, key, init_noise_sigma: float, layout: str):
        """Gaussian latents of ``shape`` from ``key`` (or the given ones, checked against ``shape``,
        whose axes ``layout`` names), times the scheduler's initial sigma, the batch over ``data``."""
        if latents is None:
            latents = jax.random.normal(key, shape, jnp.float32)
        else:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != tuple(shape):
                raise ValueError(f"latents have shape {latents.shape}; expected {tuple(shape)} ({layout}).")
        return jax.device_put(latents * init_noise_sigma, self._latent_sharding(latents.shape))

    def _padded_batch(self, batch: int) -> int:
        """The transformer's batch for ``batch`` prompts: the next multiple of the ``data`` degree."""
        d = self.mesh_spec.data
        return -(-batch // d) * d

    def _put_batch(self, x, do_cfg: bool, per_prompt: int = 1):
        """A text input of the step (``B`` rows, or ``2B`` for CFG: [negative; prompt]) placed as the
        transformer's batch: each row repeated ``per_prompt`` times (diffusers' ``num_images_per_prompt``:
        the samples of a prompt next to each other), each half padded to :meth:`_padded_batch` rows (copies
        of its last row, dropped again after the transformer), split over (cfg, data)."""
        x = jnp.asarray(x)
        halves = 2 if do_cfg else 1
        x = x.reshape((halves, -1) + x.shape[1:])
        if per_prompt > 1:
            x = jnp.repeat(x, per_prompt, axis=1)
        pad = self._padded_batch(x.shape[1]) - x.shape[1]
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
        x = x.reshape((-1,) + x.shape[2:])
        return jax.device_put(x, self._batch_sharding(x.ndim, do_cfg))

    def _put_condition(self, c, rows: int, do_cfg: bool):
        """A per-video input of the step (image-to-video's condition, one row) placed as :meth:`_put_batch` places the
        text: repeated to ``rows``, the same in both CFG halves (the unconditional half sees the image too, as in
        diffusers)."""
        c = jnp.repeat(jnp.asarray(c), rows, axis=0)
        return self._put_batch(jnp.concatenate([c, c]) if do_cfg else c, do_cfg)

    def _model_batch(self, latents, do_cfg: bool):
        """(Traced.) The transformer's batch: ``[latents; latents]`` for CFG, built as (2, B, ...) over
        (cfg, data) so that no data moves, else the latents; the batch over (data[, cfg]). Where ``data``
        does not divide B, the latents are padded to :meth:`_padded_batch` rows first (copies of the last;
        :meth:`_real_rows` drops them from the prediction): the padded rows cost compute, never change
        the real ones (each sample's forward is independent of the others)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        x = latents
        pad = self._padded_batch(latents.shape[0]) - latents.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        if do_cfg:
            x = jnp.broadcast_to(x[None], (2,) + x.shape)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P("cfg", "data")))
            x = x.reshape((-1,) + latents.shape[1:])
        return jax.lax.with_sharding_constraint(x, self._batch_sharding(x.ndim, do_cfg))

    def _real_rows(self, pred, batch: int, do_cfg: bool):
        """(Traced.) The transformer's output for the ``batch`` real samples (each CFG half): the rows
        :meth:`_model_batch` padded dropped."""
        halves = 2 if do_cfg else 1
        if pred.shape[0] == halves * batch:
            return pred
        return pred.reshape((halves, -1) + pred.shape[1:])[:, :batch].reshape((halves * batch,) + pred.shape[1:])

    def _step_out(self, latents, sched_state, i, kv):
        """(Traced.) The step's result ``(latents, sched_state, i + 1, kv)``, the latents and the
        scheduler's latent-shaped state laid out as they entered (batch over ``data``): else XLA may
        return them split as the head computed them (e.g. over ``ring``) and step 1 would compile the
        whole step a second time. The next index stays on the device (the loop sends nothing)."""
        place = lambda x: jax.lax.with_sharding_constraint(x, self._latent_sharding(x.shape))  # noqa: E731
        state = jax.tree.map(lambda x: place(x) if x.shape == latents.shape else x, sched_state)
        return place(latents.astype(jnp.float32)), state, i + 1, kv

    def _blocks_over_mesh(self, blocks, tstate, x, tokens, cond, kv, warmup: bool):
        """(Traced.) ``blocks(params, x, tokens, cond)`` over the mesh: sequence parallel
        (:func:`xdit_jax.parallel.sequence.run_blocks`), or PipeFusion where ``kv`` holds its K/V
        buffers (``warmup``: an exact step over the whole sequence). Returns (x, kv)."""
        from xdit_jax.parallel import pipefusion
        from xdit_jax.parallel.sequence import run_blocks

        if kv is None:
            return run_blocks(blocks, tstate, x, tokens, cond, self.mesh, backend=self.attention_backend,
                              text=self.text_keys or None), None
        return pipefusion.run_pipefusion(blocks, tstate, x, tokens, cond, kv, self.mesh,
                                         patches=self.pipefusion_patches, warmup=warmup, stacked=self.stacked,
                                         backend=self.attention_backend, num_layers=self.stacked_layers,
                                         text=self._pipefusion_text())

    def _pipefusion_buffers(self, step_batch: int, seq: int, abstract: bool = False, text_len: int | None = None):
        """PipeFusion's zero K/V buffers (``abstract``: ShapeDtypeStructs) for a step batch of ``step_batch``
        and a sequence of ``seq`` tokens: one slot per layer of the stack padded to equal stages, the
        sequence padded to the patches, and a final block's where the model has one; with
        ``text_keys``, the text's too (``text_len`` tokens); None without PipeFusion."""
        from xdit_jax.parallel import pipefusion

        if not self.uses_pipefusion:
            return None
        tc = self.transformer_config
        slots = pipefusion.stack_slots(self.stacked_layers, self.mesh_spec.pipefusion)
        return pipefusion.init_cache(self.mesh, slots, step_batch, seq, tc.num_attention_heads, tc.attention_head_dim,
                                     self.dtype, self.pipefusion_patches, tail=self.final_block, abstract=abstract,
                                     attentions=self.stack_attentions, tail_attentions=self.tail_attentions,
                                     text_len=text_len if self._pipefusion_text() else None)

    def _pipefusion_text(self):
        """The text keys PipeFusion slices with the patches on this mesh (None: each patch carries it whole)."""
        from xdit_jax.parallel import pipefusion

        return self.text_keys or None if pipefusion.slices_text(self.mesh) else None

    def _jit_step(self, key, step):
        """``jax.jit(step)`` cached under ``key``; the carry (latents, scheduler state, K/V buffers)
        donated where the backend supports donation (not on the CPU)."""
        donate = (1, 2, 4) if jax.default_backend() != "cpu" else ()
        self._step_cache[key] = fn = jax.jit(step, donate_argnums=donate)
        return fn

    def _denoise(self, do_cfg: bool, latents, sched_state, kv, args: tuple, num_steps: int, progress: bool,
                 step_for=None, stages=None):
        """The loop over the jitted step ``self._step_fn(do_cfg, warmup)(tstate, latents, sched_state, i,
        kv, *args) -> (latents, sched_state, i + 1, kv)``: PipeFusion's exact warm-up steps first, then
        the patched ones; ``step_for(n)``: another step of the same signature for step ``n``, or None
        (SD3's skip-layer guidance steps). ``stages``: ``[(first step, tstate, args), ...]`` in step order, a
        two-expert model's (Wan 2.2 A14B) transformers — the same program, other parameters and arguments from
        each stage's first step on; PipeFusion's warm-up steps start again there (its K/V buffers hold the
        previous expert's activations). Returns the final latents."""
        from flax import nnx

        if stages is None:
            stages = [(0, nnx.split(self.transformer)[1], args)]
        warm_fn = self._step_fn(do_cfg)
        step_fn = self._step_fn(do_cfg, warmup=False) if kv is not None else warm_fn
        warmup = self.pipefusion_warmup_steps

        def one(carry, n):
            lat, st, i, kv = carry
            first, tstate, stage_args = next(s for s in reversed(stages) if s[0] <= n)
            fn = (step_for(n) if step_for is not None else None) or (warm_fn if kv is None or n - first < warmup
                                                                      else step_fn)
            return fn(tstate, lat, st, i, kv, *stage_args)

        # The carry is placed as the step returns it, so that step 0 and the later steps share one
        # executable; the step index stays on the device (the loop sends nothing to it).
        carry = (latents, sched_state, jax.device_put(np.int32(0), self._replicated()), kv)
        return denoise_loop(one, carry, num_steps, progress=progress)[0]

    def _flow_step_fn(self, do_cfg: bool, warmup: bool, embed_args, skip_layers: tuple = (), scheduler=None,
                      combine=None, embed_step: bool = False):
        """The jitted step of a flow-matching family whose model runs embed -> blocks over the mesh -> head
        (Mochi, SD3): ``(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng) -> (latents,
        sched_state, i + 1, kv)``; ``embed_args(x, texts, t)``: ``model.embed``'s arguments. CFG and the
        Euler step in float32.

        ``skip_layers`` (with CFG; SD3's skip-layer guidance, as diffusers'): one more pass of the prompt's
        half with those blocks left out, ``pred += (text - skipped) * scale``; ``guidance`` is then
        ``(cfg scale, skip-layer scale)``. On a ``cfg=2`` mesh the pass runs on the prompt's half twice,
        once per cfg group (the time of one pass; a batch of its own would not split over cfg).
        ``scheduler``: the scheduler module whose ``step(sched, i, pred, latents, state[, noise])`` updates the
        latents (default :mod:`xdit_jax.schedulers.flow_match`; Wan's UniPC is another). ``combine(uncond, text,
        guidance, i)``: the guided prediction of another guider (default ``uncond + guidance * (text - uncond)``;
        HunyuanVideo-1.5's :func:`~xdit_jax.pipelines.hunyuan_video15.guided`). ``embed_step``: ``embed_args`` also
        takes the step index and the schedule (``embed_args(x, texts, t, i, sched)``; a MeanFlow model's next
        timestep). A :class:`~xdit_jax.schedulers.flow_match.KeptRegion` at the end of ``texts`` (inpainting) is
        applied after each update."""
        from flax import nnx

        from xdit_jax.schedulers import flow_match

        scheduler = flow_match if scheduler is None else scheduler

        key = (do_cfg, warmup, tuple(skip_layers), combine)
        if key in self._step_cache:
            return self._step_cache[key]
        graphdef, _ = nnx.split(self.transformer)
        dtype = self.dtype

        def blocks(params, x, tokens, cond):  # on a local shard (xdit_jax.parallel.sequence)
            return nnx.merge(graphdef, params).blocks(x, tokens, cond)

        def skipping(params, x, tokens, cond):
            return nnx.merge(graphdef, params).blocks(x, tokens, cond, skip_layers=skip_layers)

        def predict(model, tstate, x, texts, i, sched, blocks, kv):
            t = jnp.broadcast_to(sched.timesteps[i], (x.shape[0],))
            args = embed_args(x.astype(dtype), texts, t, *((i, sched) if embed_step else ()))
            tokens_x, tokens, cond = model.embed(*args)
            tokens_x, kv = self._blocks_over_mesh(blocks, tstate, tokens_x, tokens, cond, kv, warmup)
            return model.head(tokens_x, cond, x.shape).astype(jnp.float32), kv

        def step(tstate, latents, sched_state, i, kv, texts, sched, guidance, rng):
            texts, kept = flow_match.split_kept(texts)  # (inpainting's kept region)
            model = nnx.merge(graphdef, tstate)
            scale, slg_scale = guidance if skip_layers else (guidance, None)
            pred, kv = predict(model, tstate, self._model_batch(latents, do_cfg), texts, i, sched, blocks, kv)
            pred = self._real_rows(pred, latents.shape[0], do_cfg)
            if do_cfg:
                uncond, text = jnp.split(pred, 2)
                pred = uncond + scale * (text - uncond) if combine is None else combine(uncond, text, guidance, i)
                if skip_layers:  # the prompt's half (the second) of every text input, as the batch
                    b = latents.shape[0]
                    halves = jax.tree.map(lambda a: a[a.shape[0] // 2:], texts)
                    if self.mesh_spec.cfg == 2:
                        halves = jax.tree.map(lambda a: jnp.concatenate([a, a]), halves)
                    skipped, _ = predict(model, tstate, self._model_batch(latents, self.mesh_spec.cfg == 2),
                                         halves, i, sched, skipping, None)
                    pred = pred + (text - skipped[:b]) * slg_scale
            if getattr(sched, "needs_noise", False):
                noise = jax.random.normal(jax.random.fold_in(rng, i), latents.shape, jnp.float32)
                latents, sched_state = scheduler.step(sched, i, pred, latents, sched_state, noise)
            else:
                latents, sched_state = scheduler.step(sched, i, pred, latents, sched_state)
            if kept is not None:  # inpainting: outside the mask, the image at the next sigma
                latents = kept.apply(sched, i, latents)
            return self._step_out(latents, sched_state, i, kv)

        return self._jit_step(key, step)

    def _denoise_and_decode(self, timer: StageTimer, do_cfg: bool, latents, sched_state, args: tuple,
                            num_steps: int, progress: bool, output_type: str, decode, kv=None, step_for=None,
                            stages=None, finish=None):
        """The denoising loop (:meth:`_denoise`; ``kv``: PipeFusion's buffers or None) timed as "denoising",
        then, unless ``output_type == "latent"``, ``decode(latents)`` timed as "decoding"; the result on the
        host."""
        with timer.stage("denoising"):
            latents = self._denoise(do_cfg, latents, sched_state, kv, args, num_steps, progress, step_for, stages)
            if finish is not None:  # (a last touch of the latents, e.g. TI2V's given first frame)
                latents = finish(latents)
        if output_type == "latent":
            return as_numpy(latents)
        with timer.stage("decoding"):
            return as_numpy(jax.block_until_ready(decode(latents)))

    def _setup(self, dtype, mesh, attention_backend: str) -> None:
        import logging

        from xdit_jax.mesh import MeshSpec, build_mesh
        from xdit_jax.parallel.attention import resolve_backend

        self.dtype = dtype
        self.attention_backend = resolve_backend(attention_backend, dtype)
        if self.attention_backend in ("pallas", "mosaic") and jax.default_backend() != "gpu":
            stand_in = "Pallas' interpreter" if self.attention_backend == "pallas" else "jax's reference kernel"
            logging.getLogger("xdit_jax").warning(
                f"attention_backend={self.attention_backend!r} off a GPU runs in {stand_in}: correct but very "
                "slow (meant for tests); 'auto' picks the XLA kernel here.")
        self.mesh_spec = MeshSpec.parse(dict(mesh.shape) if hasattr(mesh, "axis_names") else mesh)
        self.mesh = mesh if hasattr(mesh, "axis_names") else build_mesh(self.mesh_spec)

    def _setup_pipefusion(self, patches: int | None, warmup_steps: int) -> None:
        """PipeFusion (xdit_jax.parallel.pipefusion): on a pipefusion mesh, or on any mesh when patches
        are asked for (one device: the sequential reference of the same rule). xDiT's defaults: as
        many patches as stages, one warm-up step."""
        from flax import nnx

        from xdit_jax.parallel import pipefusion

        pf = self.mesh_spec.pipefusion
        self.pipefusion_patches = int(patches or pf)
        self.pipefusion_warmup_steps = int(warmup_steps)
        self.uses_pipefusion = pf > 1 or self.pipefusion_patches > 1
        if self.pipefusion_patches < 1 or self.pipefusion_warmup_steps < 1:
            raise ValueError(f"pipefusion_patches ({self.pipefusion_patches}) and pipefusion_warmup_steps "
                             f"({self.pipefusion_warmup_steps}) must be >= 1: the first step fills the K/V buffers.")
        if self.uses_pipefusion:
            pipefusion.check_mesh(self.mesh_spec, self.stacked_layers)
            sizes = pipefusion.stack_sizes(self.stacked_layers)
            for name, size, slots in zip(pipefusion.stack_names(self.stacked), sizes,
                                         pipefusion.stack_slots(sizes, pf)):
                held = jax.tree.leaves(nnx.state(getattr(self.transformer, name)))[0].shape[0]
                if held != slots:
                    raise ValueError(f"Mesh {self.mesh_spec}: the transformer holds {held} stacked layers in {name}, "
                                     f"PipeFusion's stages need {slots} ({size} padded to equal stages); "
                                     "load it with from_pretrained(..., mesh=...), which lays them out.")

    def _batch_sharding(self, ndim: int, cfg_major: bool):
        """Batch axis over data (and cfg, for the doubled CFG batch); the rest replicated."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        axes = ("cfg", "data") if cfg_major else "data"
        return NamedSharding(self.mesh, P(axes, *([None] * (ndim - 1))))

    def _latent_sharding(self, shape: tuple):
        """The latents' (and the scheduler state's) layout: the batch over ``data`` where it divides it,
        else replicated (the transformer's batch is then padded, :meth:`_model_batch`)."""
        return self._batch_sharding(len(shape), False) if shape[0] % self.mesh_spec.data == 0 else self._replicated()

    def _replicated(self):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return NamedSharding(self.mesh, P())

    def _text_encoder_fn(self, name: str = "text_encoder"):
        """``fn(ids, mask or None) -> (B, L, d)`` hidden states of the text encoder ``self.<name>``,
        jitted once."""
        fns = self.__dict__.setdefault("_text_fns", {})
        if name not in fns:
            from flax import nnx

            graphdef, state = nnx.split(getattr(self, name))

            @jax.jit
            def enc(state, ids, mask):
                return nnx.merge(graphdef, state)(ids, attention_mask=mask)

            fns[name] = lambda ids, mask=None: enc(state, ids, mask)
        return fns[name]

    def _put_replicated(self, x):
        return jax.device_put(x, self._replicated())
