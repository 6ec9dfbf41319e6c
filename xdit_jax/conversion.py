"""Diffusers-layout folder -> converted folder (orbax params + configs); no torch needed.

A diffusers pipeline folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) becomes::

    OUT/xdit_jax.json                  marker: format version, source, per-component classes
    OUT/model_index.json               copied
    OUT/<component>/config.json        copied
    OUT/<component>/params/            orbax checkpoint of the Flax params (model components)
    OUT/tokenizer/, OUT/scheduler/     copied as they are

The work happens in a temporary folder next to OUT that is renamed at the end: a failure (a
missing, extra or misshaped tensor, a corrupt file) leaves nothing behind, and an existing OUT is
only replaced with ``overwrite=True``.

CLI: ``python convert/convert_checkpoint.py SRC OUT [--dtype bfloat16] [--variant bf16] [--overwrite]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from xdit_jax.safetensors_io import CheckpointError, load_component_weights

FORMAT_VERSION = 1
MARKER = "xdit_jax.json"

# diffusers/transformers class name -> (module, config class). Each module provides
# ``params_from_torch(flat, cfg, dtype)`` and ``build(cfg, params, dtype)``.
MODEL_CLASSES = {
    "CogVideoXTransformer3DModel": ("xdit_jax.models.cogvideox", "CogVideoXConfig"),
    "AutoencoderKLCogVideoX": ("xdit_jax.models.vae_cogvideox", "CogVideoXVAEConfig"),
    # ConsisID: CogVideoX-5B-I2V's transformer with the face extractor and cross-attentions
    "ConsisIDTransformer3DModel": ("xdit_jax.models.consisid", "ConsisIDConfig"),
    # CogView3-Plus: CogVideoX's blocks with weight-free norms, 2D positions and size conditions
    "CogView3PlusTransformer2DModel": ("xdit_jax.models.cogview3plus", "CogView3PlusConfig"),
    "T5EncoderModel": ("xdit_jax.models.t5", "T5Config"),
    "UMT5EncoderModel": ("xdit_jax.models.t5", "UMT5Config"),  # Wan 2.1: T5 with a bias table per block
    "PixArtTransformer2DModel": ("xdit_jax.models.pixart", "PixArtConfig"),
    # the PixArt checkpoints on the hub name their transformer so (diffusers maps it to PixArt for
    # norm_type "ada_norm_single"; PixArtConfig refuses the other Transformer2DModel kinds)
    "Transformer2DModel": ("xdit_jax.models.pixart", "PixArtConfig"),
    "AutoencoderKL": ("xdit_jax.models.vae_kl", "AutoencoderKLConfig"),
    "BertModel": ("xdit_jax.models.bert", "BertConfig"),
    "HunyuanDiT2DModel": ("xdit_jax.models.hunyuandit", "HunyuanDiTConfig"),
    "MochiTransformer3DModel": ("xdit_jax.models.mochi", "MochiConfig"),
    "AutoencoderKLMochi": ("xdit_jax.models.vae_mochi", "MochiVAEConfig"),
    "LTXVideoTransformer3DModel": ("xdit_jax.models.ltx", "LTXConfig"),
    "AutoencoderKLLTXVideo": ("xdit_jax.models.vae_ltx", "LTXVAEConfig"),
    "WanTransformer3DModel": ("xdit_jax.models.wan", "WanConfig"),
    "AutoencoderKLWan": ("xdit_jax.models.vae_wan", "WanVAEConfig"),
    # Wan VACE: Wan 2.1's transformer plus the VACE blocks that turn a control video into hints
    "WanVACETransformer3DModel": ("xdit_jax.models.wan_vace", "WanVACEConfig"),
    # SkyReels-V2: Wan 2.1's transformer with per-frame timesteps, the fps embedding and the causal block mask
    "SkyReelsV2Transformer3DModel": ("xdit_jax.models.skyreels_v2", "SkyReelsV2Config"),
    # ChronoEdit: Wan 2.1 I2V's transformer with its own RoPE (two frames at positions 0 and rope_temporal_skip_len - 1)
    "ChronoEditTransformer3DModel": ("xdit_jax.models.chronoedit", "ChronoEditConfig"),
    # Kandinsky 5.0: a text stack, then visual blocks cross-attending to it (HunyuanVideo's VAE, Qwen2.5-VL + CLIP)
    "Kandinsky5Transformer3DModel": ("xdit_jax.models.kandinsky5", "Kandinsky5Config"),
    "AutoencoderKLQwenImage": ("xdit_jax.models.vae_qwenimage", "QwenImageVAEConfig"),  # the Wan 2.1 VAE
    "AutoencoderKLHunyuanVideo": ("xdit_jax.models.vae_hunyuan_video", "HunyuanVideoVAEConfig"),
    "FluxTransformer2DModel": ("xdit_jax.models.flux", "FluxConfig"),
    "ChromaTransformer2DModel": ("xdit_jax.models.chroma", "ChromaConfig"),
    "LatteTransformer3DModel": ("xdit_jax.models.latte", "LatteConfig"),
    "HunyuanVideoTransformer3DModel": ("xdit_jax.models.hunyuan_video", "HunyuanVideoConfig"),
    # HunyuanVideo-1.5: its transformer, VAE and text_encoder (a bare Qwen2_5_VLTextModel save); text_encoder_2 is
    # ByT5 (T5EncoderModel above)
    "HunyuanVideo15Transformer3DModel": ("xdit_jax.models.hunyuan_video15", "HunyuanVideo15Config"),
    "AutoencoderKLHunyuanVideo15": ("xdit_jax.models.vae_hunyuan_video15", "HunyuanVideo15VAEConfig"),
    "Qwen2_5_VLTextModel": ("xdit_jax.models.qwen2_5_vl", "Qwen25VLTextConfig"),
    # HunyuanVideo-1.5 image-to-video's image_encoder (siglip-so400m-patch14-384's vision tower)
    "SiglipVisionModel": ("xdit_jax.models.siglip", "SiglipVisionConfig"),
    # HunyuanImage-2.1: its transformer and VAE (its text encoders: Qwen2.5-VL's and ByT5, as HunyuanVideo-1.5's)
    "HunyuanImageTransformer2DModel": ("xdit_jax.models.hunyuanimage", "HunyuanImageConfig"),
    "AutoencoderKLHunyuanImage": ("xdit_jax.models.vae_hunyuanimage", "HunyuanImageVAEConfig"),
    "SD3Transformer2DModel": ("xdit_jax.models.sd3", "SD3Config"),
    "QwenImageTransformer2DModel": ("xdit_jax.models.qwenimage", "QwenImageConfig"),
    # one module, four config classes: the config's class picks the tower and whether it has the projection
    "CLIPTextModel": ("xdit_jax.models.clip", "CLIPTextConfig"),
    "CLIPTextModelWithProjection": ("xdit_jax.models.clip", "CLIPTextWithProjectionConfig"),
    # the vision tower (Wan 2.1 image-to-video's image_encoder); a CLIPVisionModel also reads weights saved
    # with the projection (ignored, as transformers does)
    "CLIPVisionModel": ("xdit_jax.models.clip", "CLIPVisionConfig"),
    "CLIPVisionModelWithProjection": ("xdit_jax.models.clip", "CLIPVisionWithProjectionConfig"),
    # HunyuanVideo's text_encoder (llava-llama-3-8b's text part); a LlamaForCausalLM's model.* keys load too
    "LlamaModel": ("xdit_jax.models.llama", "LlamaConfig"),
    # Qwen-Image's text_encoder: the language model of Qwen2.5-VL (text path; visual.* and lm_head not read)
    "Qwen2_5_VLForConditionalGeneration": ("xdit_jax.models.qwen2_5_vl", "Qwen25VLTextConfig"),
    "ZImageTransformer2DModel": ("xdit_jax.models.zimage", "ZImageConfig"),
    # Z-Image's text_encoder (Qwen3-4B): Llama with q/k norms; a Qwen3ForCausalLM's model.* keys load too
    "Qwen3Model": ("xdit_jax.models.qwen3", "Qwen3Config"),
    "Qwen3ForCausalLM": ("xdit_jax.models.qwen3", "Qwen3Config"),
    # SANA: its transformer, Gemma 2 text encoder (gemma-2-2b-it's Gemma2Model) and DC-AE
    "SanaTransformer2DModel": ("xdit_jax.models.sana", "SanaConfig"),
    "Gemma2Model": ("xdit_jax.models.gemma2", "Gemma2Config"),
    "AutoencoderDC": ("xdit_jax.models.vae_dc", "AutoencoderDCConfig"),
    # SANA-Video (its text encoder: Gemma2Model above; its VAE: AutoencoderKLWan)
    "SanaVideoTransformer3DModel": ("xdit_jax.models.sana_video", "SanaVideoConfig"),
    # Lumina-Image 2.0 (its text encoder: Gemma2Model above; its VAE: FLUX's AutoencoderKL)
    "Lumina2Transformer2DModel": ("xdit_jax.models.lumina2", "Lumina2Config"),
    # CogView4: its transformer and text_encoder (glm-4-9b's GlmModel; a GlmForCausalLM's model.* keys load too); its
    # VAE: AutoencoderKL with 16 latent channels (above)
    "CogView4Transformer2DModel": ("xdit_jax.models.cogview4", "CogView4Config"),
    "GlmModel": ("xdit_jax.models.glm", "GlmConfig"),
    "GlmForCausalLM": ("xdit_jax.models.glm", "GlmConfig"),
    # FLUX.2: its transformer and VAE (AutoencoderKL with 32 latent channels and the latents' batch-norm statistics);
    # klein's text encoder is Qwen3ForCausalLM (above)
    "Flux2Transformer2DModel": ("xdit_jax.models.flux2", "Flux2Config"),
    "AutoencoderKLFlux2": ("xdit_jax.models.vae_flux2", "AutoencoderKLFlux2Config"),
    # FLUX.2-dev's text_encoder: Mistral 3's language model (vision tower, projector and lm_head not read)
    "Mistral3ForConditionalGeneration": ("xdit_jax.models.mistral3", "Mistral3TextConfig"),
    # HiDream-I1: its transformer; its text_encoder_4 (Llama-3.1-8B-Instruct, a LlamaForCausalLM: model.* keys)
    "HiDreamImageTransformer2DModel": ("xdit_jax.models.hidream", "HiDreamConfig"),
    "LlamaForCausalLM": ("xdit_jax.models.llama", "LlamaConfig"),
    # Cosmos-Predict2 (Text2Image / Video2World): its transformer; T5 and the Wan VAE above
    "CosmosTransformer3DModel": ("xdit_jax.models.cosmos", "CosmosConfig"),
    # LongCat-Image: FLUX.1's blocks with a timestep-only embedding (its text encoder: Qwen2.5-VL above)
    "LongCatImageTransformer2DModel": ("xdit_jax.models.longcat_image", "LongCatImageConfig"),
    # Ovis-Image: its transformer (its text_encoder: Qwen3Model above; its VAE: FLUX's AutoencoderKL)
    "OvisImageTransformer2DModel": ("xdit_jax.models.ovis_image", "OvisImageConfig"),
    # HunyuanVideo image-to-video's text_encoder (llava-llama-3-8b: CLIP vision tower + projector + Llama; no lm_head)
    "LlavaForConditionalGeneration": ("xdit_jax.models.llava", "LlavaConfig"),
}
COPIED_COMPONENTS = ("tokenizer", "scheduler", "tokenizer_2", "tokenizer_3", "image_processor", "processor",
                     "guider", "feature_extractor", "ocr_guider")  # (HunyuanVideo-1.5's ClassifierFreeGuidance: a
# config; its I2V's SiglipImageProcessor; HunyuanImage-2.1's AdaptiveProjectedMixGuidance guider and ocr_guider)
COPIED_COMPONENTS += ("tokenizer_4",)  # HiDream-I1's Llama-3.1 tokenizer
COPIED_COMPONENTS += ("text_processor",)  # LongCat-Image's Qwen2VLProcessor (prompt rewriting, the edit's images)


def model_class(class_name: str):
    """(module, config class) for a diffusers/transformers model class name."""
    if class_name not in MODEL_CLASSES:
        raise CheckpointError(f"Model class {class_name!r} is not supported (supported: {sorted(MODEL_CLASSES)}).")
    mod_name, cfg_name = MODEL_CLASSES[class_name]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cfg_name)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def model_components(folder: Path) -> dict[str, str]:
    """{component: class name} for the model components a diffusers pipeline folder lists."""
    index = read_json(folder / "model_index.json")
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        if name in COPIED_COMPONENTS:
            continue
        if name == "safety_checker":  # (Cosmos' cosmos_guardrail: not run here, not converted)
            continue
        out[name] = spec[1]
    return out


def is_converted(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).exists()


def _source_dtype(flat: dict) -> np.dtype:
    floats = [a.dtype for a in flat.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"]
    if not floats:
        return np.dtype(np.float32)
    names, counts = np.unique([d.name for d in floats], return_counts=True)
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    return np.dtype(names[np.argmax(counts)])


@contextlib.contextmanager
def staged_folder(out: Path):
    """A temporary folder next to ``out``: on success it replaces ``out`` (renamed, so readers never
    see half a folder); on an error it is removed and ``out`` is left as it was."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_component(src: Path, class_name: str, *, dtype=None, variant=None, extras: dict | None = None,
                      pipeline: str | None = None):
    """Read one diffusers component folder: returns (config dict, params pure dict). A module with
    ``extra_params_from_torch(flat, cfg, dtype) -> {name: params}`` (the Wan VAE's encoder) adds those trees to
    ``extras``, saved next to ``params`` under their names; one that names ``config_dict`` / ``pipeline`` in its
    signature gets the component's config dict / the folder's pipeline class (``pipeline``: model_index.json's
    ``_class_name``, None when unknown)."""
    mod, cfg_cls = model_class(class_name)
    cfg_dict = read_json(src / "config.json")
    cfg = cfg_cls.from_dict(cfg_dict)
    flat = load_component_weights(src, variant)
    target = np.dtype(dtype) if dtype is not None else _source_dtype(flat)
    params = mod.params_from_torch(flat, cfg, dtype=target)
    if extras is not None and hasattr(mod, "extra_params_from_torch"):
        import inspect

        names = inspect.signature(mod.extra_params_from_torch).parameters
        more = {k: v for k, v in (("config_dict", cfg_dict), ("pipeline", pipeline)) if k in names}
        extras.update(mod.extra_params_from_torch(flat, cfg, dtype=target, **more))
    return cfg_dict, params


def convert_pipeline(src: str | os.PathLike, out: str | os.PathLike, *, dtype=None, variant=None,
                     overwrite: bool = False, log=print) -> Path:
    """Convert the diffusers folder ``src`` into ``out`` (see the module docstring)."""
    from xdit_jax.checkpoint import save_params

    src, out = Path(src), Path(out)
    if not (src / "model_index.json").exists():
        raise CheckpointError(f"{src} is not a diffusers pipeline folder (no model_index.json).")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it.")
    comps = model_components(src)
    with staged_folder(out) as tmp:
        classes = {}
        for name, cls in comps.items():
            t0 = time.perf_counter()
            extras = {}
            cfg_dict, params = convert_component(src / name, cls, dtype=dtype, variant=variant, extras=extras,
                                                 pipeline=read_json(src / "model_index.json").get("_class_name"))
            (tmp / name).mkdir()
            with open(tmp / name / "config.json", "w") as f:
                json.dump(cfg_dict, f, indent=2)
            save_params(tmp / name / "params", params)
            for extra, tree in extras.items():
                save_params(tmp / name / extra, tree)
            n = sum(int(np.prod(a.shape)) for a in _leaves(params))
            log(f"converted {name} ({cls}): {n / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s")
            classes[name] = cls
        for name in COPIED_COMPONENTS:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        shutil.copy(src / "model_index.json", tmp / "model_index.json")
        with open(tmp / MARKER, "w") as f:
            json.dump({"format": FORMAT_VERSION, "source": str(src.absolute()), "components": classes,
                       "dtype": None if dtype is None else np.dtype(dtype).name}, f, indent=2)
    return out


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert a diffusers pipeline folder to an xdit_jax folder.")
    ap.add_argument("src", help="diffusers folder (model_index.json, transformer/, vae/, ...) or hub id")
    ap.add_argument("out", help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="store parameters in this dtype (default: the checkpoint's own)")
    ap.add_argument("--variant", default=None, help="weights variant to read, e.g. bf16 or fp16")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    from xdit_jax.hub import resolve_model

    try:
        src = resolve_model(args.src)
        dtype = None if args.dtype is None else np.dtype(__import__("ml_dtypes").bfloat16
                                                           if args.dtype == "bfloat16" else args.dtype)
        convert_pipeline(src, args.out, dtype=dtype, variant=args.variant, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:  # ValueError: a bad config
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
