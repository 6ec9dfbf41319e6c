"""``scripts/generate.py``: text-to-video and text-to-image from the command line (the main job).

    python scripts/generate.py --model THUDM/CogVideoX-2b --prompt "..." --mesh cfg=2 --output out.mp4
    python scripts/generate.py --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --prompt "..." --output cat.png
    python scripts/generate.py                     # a tiny random CogVideoX, made on the spot
    python scripts/generate.py --model tiny-pixart # a tiny random PixArt-Sigma (tiny-hunyuandit, tiny-mochi, tiny-flux,
                                                   # tiny-sd3, tiny-wan, tiny-latte, tiny-hunyuanvideo,
                                                   # tiny-qwenimage, tiny-zimage, tiny-flux-kontext, tiny-sana,
                                                   # tiny-sana-sprint, tiny-chroma, tiny-lumina2, tiny-flux2-klein,
                                                   # tiny-qwenimage-edit(-plus) with --image, tiny-skyreels-v2,
                                                   # tiny-ltx (--image: image-to-video),
                                                   # tiny-consisid with --image and --id-embeds,
                                                   # tiny-cogview3, tiny-cogview4, tiny-hunyuanimage, tiny-kandinsky5,
                                                   # tiny-sana-video, tiny-hidream, tiny-longcat)

jax is imported only after the arguments are checked, so that a CPU-only machine can simulate the
devices a mesh needs (``--xla_force_host_platform_device_count``) and bad flags fail at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_PROMPT = "A small dog running on a beach at sunset."
VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _binned_by_sample_size(mod, tc, height: int, width: int, on: bool) -> tuple[int, int]:
    """PixArt, SANA: the closest trained aspect-ratio bin of the checkpoint's sample size (when ``on``)."""
    return mod.binned_size(height, width, tc.sample_size) if on else (height, width)


def _binned_sana_sprint(mod, tc, height: int, width: int, on: bool) -> tuple[int, int]:
    """Sana Sprint: the 1024 px bins for sample size 32 (its pipeline's only table; when ``on``)."""
    return mod.sprint_binned_size(height, width, tc.sample_size) if on else (height, width)


def _sana_sprint_request(mod, model, tc, args, height: int, width: int, guidance):
    """Sana Sprint: the guidance is embedded, never a CFG batch (a cfg axis is refused)."""
    if args.negative_prompt is not None:
        raise ValueError("--negative-prompt: Sana Sprint has no negative prompt (its guidance is embedded).")
    mod.check_sprint_mesh(mesh_spec_from_args(args))
    return height, width, 1.0


def _binned_hunyuandit(mod, tc, height: int, width: int, on: bool) -> tuple[int, int]:
    """HunyuanDiT: its fixed trained sizes (when ``on``), else the size floored to 16."""
    return mod.binned_size(height, width) if on else (height // 16 * 16, width // 16 * 16)


def _wan_request(mod, model, tc, args, height: int, width: int, guidance):
    """Wan 2.2 A14B: the larger of its two experts' scales (--guidance-scale-2 only with two experts); Wan 2.1
    image-to-video: FLF2V needs --last-image, I2V takes none."""
    from xdit_jax.conversion import read_json

    two = mod.pipeline_settings(read_json(Path(model) / "model_index.json"), model)["boundary_ratio"]
    if args.guidance_scale_2 is not None and two is None:
        raise ValueError("--guidance-scale-2 is for a two-expert Wan 2.2 A14B model (transformer_2 and "
                         f"boundary_ratio); {model} has one transformer.")
    if args.image is not None:
        mod.check_last_image(tc, args.last_image is not None)
    return height, width, max(guidance, args.guidance_scale_2 or 0.0)


def _hunyuan_video15_request(mod, model, tc, args, height: int, width: int, guidance):
    """HunyuanVideo-1.5 image-to-video takes its size from the image, and one image."""
    if getattr(args, "kind", None) == "HunyuanVideo15ImageToVideoPipeline":
        if args.height or args.width:
            raise ValueError("--height / --width: HunyuanVideo-1.5 image-to-video sizes the video from the image (the "
                             "target_size bucket nearest its aspect ratio), as diffusers; drop them.")
        if args.last_image is not None:
            raise ValueError("--last-image: HunyuanVideo-1.5 image-to-video takes the first frame only.")
    return height, width, guidance


def _hunyuanimage_request(mod, model, tc, args, height: int, width: int, guidance):
    """HunyuanImage-2.1: whether the guider the prompts pick (the OCR guider for quoted text) runs CFG."""
    return height, width, mod.request_guidance(model, args.prompts, args.guidance_scale)


def _hunyuanimage_call(args) -> dict:
    """HunyuanImage-2.1: --guidance-scale overrides the picked guider's scale; unset, the guider's own."""
    return {"guidance_scale": args.guidance_scale}


def _flux_request(mod, model, tc, args, height: int, width: int, guidance):
    """FLUX.1 Kontext makes the aspect ratio at max_area, floored to 16."""
    if getattr(args, "kontext", False):
        height, width = mod.kontext_output_size(height, width, args.max_area or 1024 ** 2)
    return height, width, guidance


def _flux2_request(mod, model, tc, args, height: int, width: int, guidance):
    """FLUX.2: whether CFG runs (a klein base model only; FLUX.2 dev and the step-distilled klein: none)."""
    from xdit_jax.pipelines.denoise import pipeline_class_name

    cfg_possible = pipeline_class_name(model) == "Flux2KleinPipeline" and not mod.is_distilled(model)
    return height, width, guidance > 1 and cfg_possible


def _consisid_request(mod, model, tc, args, height: int, width: int, guidance):
    """ConsisID: the face's embeddings from --id-embeds (made by face models outside xdit_jax), read and checked."""
    _consisid_call(args)
    return height, width, guidance


def _consisid_call(args) -> dict:
    """ConsisID's call arguments id_cond / id_vit_hidden from --id-embeds FILE.npz; refused without it."""
    from xdit_jax.pipelines.consisid import ID_EMBEDS_HELP, load_id_embeds

    if args.id_embeds is None:
        raise ValueError("ConsisID needs the face's embeddings: --id-embeds FILE.npz with the arrays id_cond and "
                         "id_vit_hidden (and --image, the aligned face image). " + ID_EMBEDS_HELP)
    id_cond, id_vit_hidden = load_id_embeds(args.id_embeds)
    return {"id_cond": id_cond, "id_vit_hidden": id_vit_hidden}


@dataclasses.dataclass(frozen=True)
class Family:
    """What the command line knows of one model family: its defaults, the flags it takes and how its size and
    mesh are checked before any weights load. The family's pipeline module (``xdit_jax.pipelines.<module>``)
    offers ``read_configs``, ``default_video`` (videos) or ``default_size`` (images) and ``check_request``
    (``tc, vc, height, width, [num_frames,] batch, mesh, guidance[, max_sequence_length]``)."""

    video: bool
    guidance_scale: float | None  # --guidance-scale's default; None: the family takes none (true CFG instead)
    steps: int  # --steps' default (real checkpoints)
    tiny_steps: int = 4  # ... for the tiny model
    module: str | None = None  # xdit_jax.pipelines.<module> where it is not the family's name
    tiny_size: tuple[int, int] | None = None  # the tiny model's (height, width) where the real default is slow
    tiny_frames: int | None = None  # the tiny model's frames where the real default is slow
    max_sequence_length: int | None = None  # the call's prompt tokens (None: the pipeline's own)
    tiny_max_sequence_length: str | None = "MAX_SEQUENCE_LENGTH"  # the tiny model's: a constant of xdit_jax.tiny
    # the tiny model's default_sample_size (a constant of xdit_jax.tiny) where the pipeline's size rule rescales every
    # size to that area (HiDream-I1: diffusers' 128, 1024 x 1024 pixels), set on the pipeline and in the early check
    tiny_sample_size: str | None = None
    fixed_text_length: str | None = None  # why --max-sequence-length is refused (then the call is not given one)
    binning: Callable | None = None  # (module, tc, h, w, on) -> the size generated; takes --no-resolution-binning
    true_cfg: str | None = None  # its name where it takes --true-cfg-scale (the check's guidance: true CFG's)
    true_cfg_scale: float = 1.0  # --true-cfg-scale's default
    call_flags: tuple[str, ...] = ()  # arguments passed to the call as they are (under their own names)
    check_max_sequence_length: bool = False  # check_request takes the prompt tokens too
    check_hook: Callable | None = None  # (module, model, tc, args, h, w, guidance) -> (h, w, guidance to check)
    distilled_steps: int | None = None  # a step-distilled checkpoint's --steps and --guidance-scale defaults
    distilled_guidance_scale: float | None = None
    image_pipeline: str | None = None  # the diffusers class --image loads a text-to-video folder as (its I2V)
    fps_call_arg: str | None = None  # the call argument --fps also sets (the model conditions on the frame rate)
    call_hook: Callable | None = None  # (args) -> more call arguments (ConsisID: the face's embeddings)

    @property
    def output(self) -> str:
        return "output.mp4" if self.video else "output.png"


FAMILIES = {
    "cogvideox": Family(video=True, guidance_scale=6.0, steps=50, max_sequence_length=226,
                        call_flags=("use_dynamic_cfg",)),
    "pixart": Family(video=False, guidance_scale=4.5, steps=20, binning=_binned_by_sample_size),
    # CogView3-Plus: 50 steps, the model card's guidance 7 (diffusers' call default: 5); 224 T5 tokens
    "cogview3": Family(video=False, guidance_scale=7.0, steps=50, tiny_steps=2, max_sequence_length=224,
                       tiny_max_sequence_length="COGVIEW3_MAX_SEQUENCE_LENGTH"),
    "hunyuandit": Family(video=False, guidance_scale=5.0, steps=50, binning=_binned_hunyuandit,
                         fixed_text_length="HunyuanDiT's text lengths are the model's: 77 + 256",
                         call_flags=("guidance_rescale",)),
    "mochi": Family(video=True, guidance_scale=4.5, steps=64, tiny_size=(32, 48), tiny_frames=7,
                    max_sequence_length=256),
    "flux": Family(video=False, guidance_scale=3.5, steps=28, tiny_size=(48, 64), max_sequence_length=512,
                   true_cfg="FLUX", check_hook=_flux_request),
    "sd3": Family(video=False, guidance_scale=7.0, steps=28, max_sequence_length=256,
                  call_flags=("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                              "skip_layer_guidance_stop")),
    "wan": Family(video=True, guidance_scale=5.0, steps=50, tiny_size=(32, 48), tiny_frames=9, max_sequence_length=512,
                  check_hook=_wan_request),
    # diffusers' SkyReelsV2Pipeline / SkyReelsV2DiffusionForcingPipeline defaults
    "skyreels_v2": Family(video=True, guidance_scale=6.0, steps=50, tiny_size=(32, 48), tiny_frames=9,
                          max_sequence_length=512),
    # diffusers' LTXPipeline defaults; --image: LTXImageToVideoPipeline on the same folder; --fps: its frame_rate
    "ltx": Family(video=True, guidance_scale=3.0, steps=50, tiny_steps=2, tiny_size=(64, 96), tiny_frames=9,
                  max_sequence_length=128, call_flags=("guidance_rescale",),
                  image_pipeline="LTXImageToVideoPipeline", fps_call_arg="frame_rate"),
    "latte": Family(video=True, guidance_scale=7.5, steps=50, tiny_frames=4,
                    fixed_text_length="Latte's T5 length is fixed: 120, as diffusers'"),
    # (HunyuanVideo's guidance_scale is embedded; true CFG: --negative-prompt with --true-cfg-scale > 1)
    "hunyuanvideo": Family(video=True, guidance_scale=6.0, steps=50, module="hunyuan_video", tiny_size=(32, 32),
                           tiny_frames=5, max_sequence_length=256, true_cfg="HunyuanVideo"),
    # HunyuanVideo-1.5 (T2V): CFG by the guider (its release scale 6.0 as --guidance-scale's default; the negative
    # prompt "" as diffusers'), 1000 Qwen tokens after the template's 108
    "hunyuan_video15": Family(video=True, guidance_scale=6.0, steps=50, tiny_steps=2, tiny_size=(32, 48),
                              tiny_frames=5, max_sequence_length=1000,
                              tiny_max_sequence_length="HUNYUAN_VIDEO15_MAX_SEQUENCE_LENGTH",
                              call_flags=("guidance_rescale",), check_hook=_hunyuan_video15_request),
    # Kandinsky 5.0 T2V: diffusers' Kandinsky5T2VPipeline defaults (512 x 768, 121 frames, 50 steps, CFG 5 with its
    # default negative prompt, 512 Qwen tokens after the template's 128)
    "kandinsky5": Family(video=True, guidance_scale=5.0, steps=50, tiny_steps=2, tiny_size=(32, 32), tiny_frames=5,
                         max_sequence_length=512),
    # Kandinsky 5.0 T2I: diffusers' Kandinsky5T2IPipeline defaults (1024 x 1024, 50 steps, CFG 3.5, negative prompt "")
    "kandinsky5-t2i": Family(video=False, guidance_scale=3.5, steps=50, tiny_steps=2, module="kandinsky5_t2i",
                             max_sequence_length=512),
    # HunyuanImage-2.1: CFG / APG by the guiders (their configs' scales unless --guidance-scale; the negative prompt ""
    # as diffusers'), 1000 Qwen tokens after the template's 34, 2048 x 2048 by default (a 64 x 64 toy for the tiny)
    "hunyuanimage": Family(video=False, guidance_scale=3.5, steps=50, tiny_steps=2, tiny_size=(64, 64),
                           max_sequence_length=1000, tiny_max_sequence_length="HUNYUAN_VIDEO15_MAX_SEQUENCE_LENGTH",
                           check_hook=_hunyuanimage_request, call_hook=_hunyuanimage_call),
    # (Qwen-Image: no guidance_scale; true CFG 4 with --negative-prompt, diffusers' default)
    "qwenimage": Family(video=False, guidance_scale=None, steps=50, tiny_size=(48, 80), max_sequence_length=512,
                        true_cfg="Qwen-Image", true_cfg_scale=4.0),
    # diffusers' CogView4Pipeline defaults (CFG 5 with the negative prompt "" by default; the prompt's GLM tokens up to
    # 1024, padded to the batch's longest only: the tiny model's are the real ones)
    "cogview4": Family(video=False, guidance_scale=5.0, steps=50, tiny_steps=2, tiny_size=(64, 64),
                       max_sequence_length=1024, tiny_max_sequence_length=None),
    # Z-Image-Turbo's settings (diffusers' ZImagePipeline defaults are 50 steps, CFG 5)
    "zimage": Family(video=False, guidance_scale=0.0, steps=9, tiny_steps=2, tiny_size=(64, 64),
                     max_sequence_length=512, tiny_max_sequence_length=None),
    "sana": Family(video=False, guidance_scale=4.5, steps=20, max_sequence_length=300, binning=_binned_by_sample_size),
    # Sana Sprint: diffusers' SanaSprintPipeline defaults (2 steps, guidance 4.5 embedded; SCM angles 1.5708, 1.3)
    "sana-sprint": Family(video=False, guidance_scale=4.5, steps=2, tiny_steps=2, module="sana",
                          max_sequence_length=300, binning=_binned_sana_sprint, check_hook=_sana_sprint_request),
    # SANA-Video: diffusers' SanaVideoPipeline defaults (480 x 832, 81 frames, 50 steps, CFG 6, 300 Gemma tokens;
    # resolution binning for sample sizes 30 / 22); --image: SanaImageToVideoPipeline on the same folder
    "sana-video": Family(video=True, guidance_scale=6.0, steps=50, tiny_steps=2, module="sana_video",
                         tiny_size=(32, 64), tiny_frames=9, max_sequence_length=300, binning=_binned_by_sample_size,
                         image_pipeline="SanaImageToVideoPipeline"),
    # Chroma: real CFG (negative prompt default ""), diffusers' ChromaPipeline defaults
    "chroma": Family(video=False, guidance_scale=5.0, steps=35, tiny_steps=2, tiny_size=(48, 64),
                     max_sequence_length=512),
    # diffusers' Lumina2Pipeline defaults (CFG normalized, not truncated); the tiny model's prompt tokens are the
    # real ones (its system prompt alone is ~95 stand-in tokens)
    "lumina2": Family(video=False, guidance_scale=4.0, steps=30, tiny_steps=2, max_sequence_length=256,
                      tiny_max_sequence_length=None, check_max_sequence_length=True),
    # FLUX.2 klein: diffusers' defaults (50 steps, CFG 4) for the base models; a step-distilled checkpoint
    # (is_distilled: FLUX.2-klein-4B / -9B) runs its model card's 4 steps at guidance 1 (--guidance-scale None)
    "flux2": Family(video=False, guidance_scale=4.0, steps=50, tiny_steps=2, tiny_size=(64, 64),
                    max_sequence_length=512, tiny_max_sequence_length="FLUX2_MAX_SEQUENCE_LENGTH",
                    distilled_steps=4, distilled_guidance_scale=1.0, check_hook=_flux2_request),
    # ConsisID (CogVideoX-5B-I2V + the face branch): diffusers' ConsisIDPipeline defaults; --image (the aligned face)
    # and --id-embeds (its embeddings, from face models outside xdit_jax) required
    "consisid": Family(video=True, guidance_scale=6.0, steps=50, max_sequence_length=226,
                       call_flags=("use_dynamic_cfg",), check_hook=_consisid_request, call_hook=_consisid_call),
    # HiDream-I1: diffusers' HiDreamImagePipeline defaults (50 steps, CFG 5 with the negative prompt "", 128 tokens for
    # each text encoder; the size's aspect ratio at 1024 x 1024 pixels). The model cards' settings differ per variant
    # (HiDream-I1's inference script: Full 50 steps at CFG 5, Dev 28 and Fast 16 at guidance 0): give --steps and
    # --guidance-scale.
    "hidream": Family(video=False, guidance_scale=5.0, steps=50, tiny_steps=2, max_sequence_length=128,
                      tiny_sample_size="HIDREAM_SAMPLE_SIZE"),
    # ChronoEdit: diffusers' ChronoEditPipeline defaults (480 x 832, 50 steps, CFG 5, 512 UMT5 tokens); --image: the
    # image to edit (required), resized to the output size; the edit (the last of its 5 frames) is written
    "chronoedit": Family(video=False, guidance_scale=5.0, steps=50, tiny_steps=2, tiny_size=(32, 48),
                         max_sequence_length=512),
    # Cosmos-Predict2: diffusers' Cosmos2TextToImagePipeline / Cosmos2VideoToWorldPipeline defaults (35 steps, CFG 7
    # with Cosmos' long default negative prompt, 512 T5 tokens); Video2World: --image (the first frame), --fps (16)
    "cosmos": Family(video=False, guidance_scale=7.0, steps=35, tiny_steps=2, tiny_size=(32, 32),
                     max_sequence_length=512),
    "cosmos-v2w": Family(video=True, guidance_scale=7.0, steps=35, tiny_steps=2, module="cosmos_v2w",
                         tiny_size=(32, 32), tiny_frames=9, max_sequence_length=512, fps_call_arg="fps"),
    # LongCat-Image: diffusers' LongCatImagePipeline defaults (50 steps, CFG 4.5 with cfg_renorm, the negative prompt
    # ""); its prompt rewriting (diffusers' default) is not run: the prompt is used as given
    "longcat": Family(video=False, guidance_scale=4.5, steps=50, tiny_steps=2, tiny_size=(48, 80),
                      module="longcat_image",
                      fixed_text_length="LongCat-Image pads its text to 512 tokens, as diffusers'"),
    # Ovis-Image: diffusers' OvisImagePipeline defaults (1024 x 1024, 50 steps, CFG 5 with the negative prompt "", 256
    # Qwen3 tokens after the template's 28)
    "ovis-image": Family(video=False, guidance_scale=5.0, steps=50, tiny_steps=2, module="ovis_image",
                         tiny_size=(32, 64), max_sequence_length=256,
                         tiny_max_sequence_length="OVIS_IMAGE_MAX_SEQUENCE_LENGTH"),
}
# per family: default output, guidance scale, steps (real / tiny), ...: the table as plain dicts
DEFAULTS = {name: {"output": f.output, **dataclasses.asdict(f)} for name, f in FAMILIES.items()}
VIDEO_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.video)
TRUE_CFG_FAMILIES = {name: f.true_cfg for name, f in FAMILIES.items() if f.true_cfg}  # --true-cfg-scale
# text-to-image pipelines whose folders --image runs image-to-image (diffusers' class for it): SDEdit, --strength
IMAGE_TO_IMAGE = {"FluxPipeline": "FluxImg2ImgPipeline", "StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline",
                  "FluxImg2ImgPipeline": "FluxImg2ImgPipeline",
                  "StableDiffusion3Img2ImgPipeline": "StableDiffusion3Img2ImgPipeline",
                  "ChromaPipeline": "ChromaImg2ImgPipeline", "ChromaImg2ImgPipeline": "ChromaImg2ImgPipeline",
                  "QwenImagePipeline": "QwenImageImg2ImgPipeline",
                  "QwenImageImg2ImgPipeline": "QwenImageImg2ImgPipeline"}
# ... and --mask inpainting
INPAINT = {"FluxPipeline": "FluxInpaintPipeline", "StableDiffusion3Pipeline": "StableDiffusion3InpaintPipeline",
           "FluxInpaintPipeline": "FluxInpaintPipeline",
           "StableDiffusion3InpaintPipeline": "StableDiffusion3InpaintPipeline",
           "ChromaPipeline": "ChromaInpaintPipeline", "ChromaInpaintPipeline": "ChromaInpaintPipeline",
           "QwenImagePipeline": "QwenImageInpaintPipeline", "QwenImageInpaintPipeline": "QwenImageInpaintPipeline"}
IMAGE_TO_VIDEO = ("WanImageToVideoPipeline", "CogVideoXImageToVideoPipeline",  # (diffusers class names)
                  "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                  "LTXImageToVideoPipeline", "ConsisIDPipeline", "HunyuanVideo15ImageToVideoPipeline",
                  "SanaImageToVideoPipeline", "Kandinsky5I2VPipeline", "Cosmos2VideoToWorldPipeline",
                  "HunyuanVideoImageToVideoPipeline")
DIFFUSION_FORCING = ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                     "SkyReelsV2DiffusionForcingVideoToVideoPipeline")
VIDEO_TO_VIDEO = "SkyReelsV2DiffusionForcingVideoToVideoPipeline"  # --video: the video to extend (a DF checkpoint)
WAN_V2V = "WanVideoToVideoPipeline"  # --video on a Wan text-to-video folder: video-to-video (SDEdit), --strength
WAN_VACE = "WanVACEPipeline"  # a Wan VACE folder: --video / --mask (videos) / --reference-image, all optional
# LTX-Video 0.9.5+'s condition pipeline: a folder of that class, or --condition-frame-index on an LTX folder;
# --image / --video (optional) conditions the video at --condition-frame-index (default 0)
LTX_CONDITION = "LTXConditionPipeline"
# SkyReels-V2 diffusion forcing's flags (diffusers' argument names), for its DF pipelines only
DF_FLAGS = {"ar_step": "--ar-step", "causal_block_size": "--causal-block-size", "base_num_frames": "--base-num-frames",
            "overlap_history": "--overlap-history", "addnoise_condition": "--addnoise-condition"}
QWEN_EDIT = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")  # --image: the image(s) to edit, required
FLUX_FILL = "FluxFillPipeline"  # a FLUX.1 Fill folder: --image and --mask, both required (inpainting; --strength)
FLUX_CONTROL = "FluxControlPipeline"  # a FLUX.1 Canny / Depth folder: --control-image, required
CHRONOEDIT = "ChronoEditPipeline"  # --image: the image to edit, required (the output: the edited image)
INPAINT[FLUX_FILL] = FLUX_FILL
# a Control folder with --image: image-to-image (and --mask: inpainting) guided by the control image
CONTROL = (FLUX_CONTROL, "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline")
COGVIEW4_CONTROL = "CogView4ControlPipeline"  # a CogView4 Control folder: --control-image, required
IMAGE_TO_IMAGE.update({c: "FluxControlImg2ImgPipeline" for c in CONTROL[:2]})
INPAINT.update({c: "FluxControlInpaintPipeline" for c in (CONTROL[0], CONTROL[2])})
INPAINT["FluxKontextPipeline"] = "FluxKontextInpaintPipeline"  # a Kontext folder with --image --mask
QWEN_EDIT_INPAINT = "QwenImageEditInpaintPipeline"  # a Qwen-Image-Edit folder with --image --mask
INPAINT.update({"QwenImageEditPipeline": QWEN_EDIT_INPAINT, QWEN_EDIT_INPAINT: QWEN_EDIT_INPAINT})
IMAGE_TO_IMAGE.update({"ZImagePipeline": "ZImageImg2ImgPipeline", "ZImageImg2ImgPipeline": "ZImageImg2ImgPipeline"})
INPAINT.update({"ZImagePipeline": "ZImageInpaintPipeline", "ZImageInpaintPipeline": "ZImageInpaintPipeline"})
NO_MASK_CROP = (FLUX_FILL, "FluxControlInpaintPipeline", "FluxKontextInpaintPipeline", QWEN_EDIT_INPAINT)  # (not taken / refused here)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="diffusers folder, converted xdit_jax folder, hub id, or 'tiny' / 'tiny-pixart' / "
                         "'tiny-hunyuandit' / 'tiny-mochi' / 'tiny-flux' / 'tiny-sd3' / 'tiny-wan' / 'tiny-latte' / "
                         "'tiny-hunyuanvideo' / 'tiny-flux-kontext' / 'tiny-qwenimage' / 'tiny-qwenimage-edit' / "
                         "'tiny-qwenimage-edit-plus' / 'tiny-zimage' / 'tiny-sana' / 'tiny-sana-sprint' / "
                         "'tiny-chroma' / 'tiny-lumina2' / 'tiny-flux2-klein' / 'tiny-skyreels-v2' / 'tiny-consisid' / "
                         "'tiny-cogview3' / 'tiny-cogview4' / 'tiny-hunyuanimage' / 'tiny-kandinsky5' / "
                         "'tiny-sana-video' / 'tiny-hidream' / 'tiny-longcat' (random, no download)")
    ap.add_argument("--prompt", default=None, action="append", dest="prompts",
                    help="text prompt; repeat the flag for a batch of prompts")
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--image", default=None, metavar="PATH", action="append",
                    help="image-to-video (a CogVideoX or Wan I2V model, Wan 2.2 TI2V-5B): the first frame, resized to "
                         "--width x --height; FLUX.1 Kontext: the image to edit (optional), resized as diffusers does; "
                         "FLUX.1 (dev / schnell), SD3, Chroma and Qwen-Image: image-to-image from it (resized to the "
                         "output size; --strength); "
                         "FLUX.2 klein: a reference image (optional); Qwen-Image-Edit: the image to edit (required; "
                         "Edit-2509 / 2511: repeat the flag for several images)")
    ap.add_argument("--video", default=None, metavar="PATH",
                    help="SkyReels-V2 diffusion forcing: a video to extend (.mp4 / .gif, or a folder of frames in name "
                         "order), resized to --width x --height; conditions on its last --overlap-history frames; the "
                         "output is the video followed by --num-frames new ones (diffusers' video-to-video pipeline); "
                         "Wan text-to-video: video-to-video from it (diffusers' WanVideoToVideoPipeline; --strength; "
                         "the output has its frames)")
    ap.add_argument("--condition-frame-index", default=None, type=int, metavar="N",
                    help="LTX-Video (0.9.5+): run diffusers' LTXConditionPipeline with the --image / --video condition "
                         "at frame N (an LTXConditionPipeline folder runs it anyway, N default 0)")
    ap.add_argument("--id-embeds", default=None, metavar="FILE.npz",
                    help="ConsisID: the face's embeddings, arrays id_cond (1, 1280) and id_vit_hidden (5, 1, 577, "
                         "1024), made with diffusers' consisid_utils.process_face_embeddings_infer (face models "
                         "outside xdit_jax); --image: the aligned face image it returns")
    ap.add_argument("--strength", type=float, default=None,
                    help="image-to-image (FLUX.1, SD3, Chroma, Qwen-Image or Z-Image with --image): how far the image "
                         "is noised, the last fraction of the --steps that run, in (0, 1] (diffusers' strength; "
                         "default 0.6, Chroma 0.9, FLUX.1 Fill and Z-Image inpainting 1); Wan with --video: video-to-video's (int(steps x S) steps "
                         "run; default 0.8)")
    ap.add_argument("--mask", default=None, metavar="PATH",
                    help="inpainting (a FLUX.1, SD3, Chroma, Qwen-Image or Z-Image model with --image; a FLUX.1 Fill "
                         "model needs it): white repaints, black keeps (diffusers' FluxInpaintPipeline / "
                         "FluxFillPipeline / StableDiffusion3InpaintPipeline / ZImageInpaintPipeline / "
                         "ChromaInpaintPipeline / QwenImageInpaintPipeline; --strength as image-to-image's, default "
                         "0.6)")
    ap.add_argument("--padding-mask-crop", type=int, default=None, metavar="PX",
                    help="inpainting (--mask): repaint only the region around the mask, grown by PX pixels and "
                         "widened to the output's aspect ratio, at the output size, then paste it back into the "
                         "picture (diffusers' padding_mask_crop; the output is the picture's size)")
    ap.add_argument("--control-image", default=None, metavar="PATH",
                    help="FLUX.1 Control (Canny / Depth, a FluxControlPipeline folder) and CogView4 Control (a "
                         "CogView4ControlPipeline folder): the edge or depth map to follow (made outside xdit_jax, "
                         "as with diffusers), resized to the output size")
    ap.add_argument("--reference-image", default=None, metavar="PATH", action="append", dest="reference_images",
                    help="Wan VACE: a reference image (repeat the flag for several), fitted into the frame; with "
                         "--video (the control video) and --mask (a video or folder of frames: white generates, black "
                         "keeps the control video), both optional (diffusers' WanVACEPipeline)")
    ap.add_argument("--conditioning-scale", type=float, default=None,
                    help="Wan VACE: the control hints' scale (diffusers' conditioning_scale; default 1)")
    ap.add_argument("--last-image", default=None, metavar="PATH",
                    help="image-to-video: the last frame too (first-last-frame: Wan 2.1 FLF2V, Wan 2.2 I2V-A14B)")
    ap.add_argument("--num-images-per-prompt", "--num-videos-per-prompt", type=int, default=1, dest="per_prompt",
                    metavar="N", help="samples per prompt (diffusers' num_images_per_prompt / num_videos_per_prompt); "
                    "written as OUTPUT_0, OUTPUT_1, ... when there are several")
    ap.add_argument("--num-frames", type=int, default=None, help="frames to generate (CogVideoX 8k+1, Mochi 6k+1, Wan and HunyuanVideo 4k+1; model default)")
    ap.add_argument("--height", type=int, default=None, help="multiple of 16 (model default)")
    ap.add_argument("--width", type=int, default=None, help="multiple of 16 (model default)")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps (CogVideoX 50, PixArt 20, HunyuanDiT 50, Mochi 64, FLUX 28, SD3 28, Wan 50, "
                         "HunyuanVideo 50, Qwen-Image 50, Z-Image-Turbo 9, Chroma 35; 4 for "
                         "the tiny models)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="CFG scale (CogVideoX 6, PixArt 4.5, HunyuanDiT 5, Mochi 4.5, SD3 7, Wan 5; FLUX.1-dev: its "
                         "embedded guidance, 3.5; HunyuanVideo: its embedded guidance, 6; Z-Image-Turbo 0: no CFG, "
                         "Z-Image runs CFG for any scale > 0; Chroma 5, real CFG for > 1 (--negative-prompt, default ''); "
                         "not Qwen-Image's: --true-cfg-scale)")
    ap.add_argument("--guidance-scale-2", type=float, default=None,
                    help="Wan 2.2 A14B, VACE too (two experts): the CFG scale of the low-noise expert's steps "
                         "(default: --guidance-scale; the model card's: 4 then 3)")
    ap.add_argument("--ar-step", type=int, default=None,
                    help="SkyReels-V2 diffusion forcing: diffusers' ar_step (0 = synchronous, the default; > 0: each "
                         "causal block that many steps behind the one before, e.g. 5 with --causal-block-size 5)")
    ap.add_argument("--causal-block-size", type=int, default=None,
                    help="SkyReels-V2 diffusion forcing: latent frames per causal block (default: the checkpoint's "
                         "num_frame_per_block); the latent frames must be a multiple of it")
    ap.add_argument("--base-num-frames", type=int, default=None,
                    help="SkyReels-V2 diffusion forcing: the frames of one window (diffusers' default 97; 121 for "
                         "720P); a longer --num-frames runs the long-video loop (with --overlap-history)")
    ap.add_argument("--overlap-history", type=int, default=None,
                    help="SkyReels-V2 diffusion forcing: frames shared by consecutive windows of a long video "
                         "(diffusers' overlap_history; 17 or 37 recommended)")
    ap.add_argument("--addnoise-condition", type=float, default=None,
                    help="SkyReels-V2 diffusion forcing: noise added to a long video's condition frames "
                         "(diffusers' addnoise_condition, 20 recommended; long videos only)")
    ap.add_argument("--true-cfg-scale", type=float, default=None,
                    help="FLUX, HunyuanVideo, Qwen-Image: diffusers' true CFG with --negative-prompt (> 1 runs "
                         "both halves; default 1 = off, Qwen-Image 4)")
    ap.add_argument("--guidance-rescale", type=float, default=None,
                    help="HunyuanDiT's, LTX-Video's and HunyuanVideo-1.5's guidance_rescale (0 = off, the default; "
                         "HunyuanVideo-1.5: its guider's)")
    ap.add_argument("--max-area", type=int, default=None, metavar="PIXELS",
                    help="FLUX.1 Kontext: the output's pixels (the --height x --width aspect ratio at this area, as "
                         "diffusers' max_area; default 1048576 = 1024 x 1024)")
    ap.add_argument("--no-auto-resize", action="store_true",
                    help="FLUX.1 Kontext: keep the --image's own size (floored to 16) instead of the trained "
                         "resolution of the nearest aspect ratio (diffusers' _auto_resize=False)")
    ap.add_argument("--skip-guidance-layers", type=int, nargs="+", default=None, metavar="BLOCK",
                    help="SD3: skip-layer guidance over these blocks (SD3.5 Medium: 7 8 9), as diffusers'")
    ap.add_argument("--skip-layer-guidance-scale", type=float, default=2.8,
                    help="SD3: the skip-layer guidance scale (with --skip-guidance-layers; default 2.8)")
    ap.add_argument("--skip-layer-guidance-start", type=float, default=0.01,
                    help="SD3: skip-layer guidance from this fraction of the steps (default 0.01)")
    ap.add_argument("--skip-layer-guidance-stop", type=float, default=0.2,
                    help="SD3: skip-layer guidance until this fraction of the steps (default 0.2)")
    ap.add_argument("--no-resolution-binning", action="store_true",
                    help="images: generate at the size asked, not at the model's closest trained size "
                         "(diffusers' use_resolution_binning=False; always off for the tiny models)")
    ap.add_argument("--use-dynamic-cfg", action="store_true", help="CogVideoX's dynamic guidance schedule")
    ap.add_argument("--max-sequence-length", type=int, default=None,
                    help="prompt tokens (CogVideoX 226, PixArt-alpha 120, PixArt-Sigma 300, SANA 300, Mochi 256, Wan 512; 16 for "
                         "the tiny models)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--output", default=None, help="video: .mp4, .gif, or a folder for .png frames "
                    "(output.mp4); image: .png or .jpg (output.png)")
    ap.add_argument("--fps", type=int, default=None,
                    help="frames per second (model default: CogVideoX 8, 1.5 16; Mochi 30; Wan 16; SkyReels-V2 24, "
                         "which diffusion forcing also gives its fps embedding: 16 or other)")
    ap.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    ap.add_argument("--mesh", default=None, help="device mesh, e.g. 'cfg=2' or 'data=2,cfg=2' "
                    "(axes: data, cfg, pipefusion, ring, ulysses)")
    ap.add_argument("--attention-backend", choices=["auto", "xla", "cudnn", "pallas", "mosaic"], default="auto",
                    help="per-device attention kernel: auto = cuDNN flash attention on GPU in bf16, else XLA; "
                    "pallas = our Pallas (Triton) flash kernel; mosaic = jax's FlashAttention-3 kernel (Mosaic GPU, "
                    "H100/H200 only)")
    tiles = ap.add_mutually_exclusive_group()
    tiles.add_argument("--vae-tiling", action="store_true",
                       help="decode in overlapping tiles (diffusers' enable_tiling): less memory for large videos "
                            "(by default the decode tiles only where its untiled plan would not fit the device)")
    tiles.add_argument("--no-vae-tiling", action="store_true",
                       help="never decode in tiles, even where the untiled decode would not fit")
    ap.add_argument("--vae-slicing", action="store_true", help="decode one video of a batch at a time")
    ap.add_argument("--cache-dir", default=None, help="where diffusers folders are converted to (~/.cache/xdit_jax)")
    mp = ap.add_argument_group("several processes (jax.distributed); or XDIT_COORDINATOR, XDIT_NUM_PROCESSES, "
                               "XDIT_PROCESS_ID")
    mp.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    mp.add_argument("--num-processes", type=int, default=None)
    mp.add_argument("--process-id", type=int, default=None)
    mp.add_argument("--dist-timeout", type=int, default=120, help="seconds to wait for all processes to join")
    mp.add_argument("--heartbeat-timeout", type=int, default=60,
                    help="seconds after which a silent peer is declared dead and every process stops")
    ap.add_argument("--compile-cache", default=None,
                    help="persistent XLA compilation cache folder (default ~/.cache/xdit_jax/jax_cache; 'off' "
                         "disables): a second run with the same shapes does not compile again")
    ap.add_argument("--random-weights", action="store_true",
                    help="build the pipeline from --model's configs alone with random weights (a folder of configs "
                         "in diffusers' layout, e.g. configs/flux.1-dev): try a mesh's memory and speed at full "
                         "size without a checkpoint; the output is noise")
    ap.add_argument("--json", action="store_true", help="also print the timings as one JSON line")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    # xDiT's flags, as aliases of --mesh
    xd = ap.add_argument_group("xDiT-compatible aliases of --mesh")
    xd.add_argument("--ulysses_degree", "--ulysses-degree", type=int, default=None)
    xd.add_argument("--ring_degree", "--ring-degree", type=int, default=None)
    xd.add_argument("--use_cfg_parallel", "--use-cfg-parallel", action="store_true")
    xd.add_argument("--data_parallel_degree", "--data-parallel-degree", type=int, default=None)
    xd.add_argument("--pipefusion_parallel_degree", "--pipefusion-parallel-degree", type=int, default=None)
    pf = ap.add_argument_group("PipeFusion (a mesh with pipefusion > 1)")
    pf.add_argument("--num_pipeline_patch", "--num-pipeline-patch", type=int, default=None,
                    help="patches the sequence is cut into (default: the pipefusion degree)")
    pf.add_argument("--warmup_steps", "--warmup-steps", type=int, default=1,
                    help="exact steps (one patch) before the patched ones; they fill the K/V buffers [1]")
    return ap


def mesh_spec_from_args(args):
    from xdit_jax.mesh import MeshSpec

    spec = MeshSpec.parse(args.mesh)
    aliases = {"ulysses": args.ulysses_degree, "ring": args.ring_degree,
               "cfg": 2 if args.use_cfg_parallel else None, "data": args.data_parallel_degree,
               "pipefusion": args.pipefusion_parallel_degree}
    merged = {a: getattr(spec, a) for a in ("data", "cfg", "pipefusion", "ring", "ulysses")}
    for axis, v in aliases.items():
        if v is None:
            continue
        if args.mesh and getattr(spec, axis) != 1 and getattr(spec, axis) != v:
            raise ValueError(f"--mesh says {axis}={getattr(spec, axis)} but an alias flag says {v}.")
        merged[axis] = v
    return MeshSpec.parse(merged)


def check_output(path: Path, overwrite: bool, video: bool | None = None, samples: int = 1) -> None:
    """``video``: True for a video model, False for an image model, None when not yet known; ``samples``:
    how many outputs the run writes (:func:`output_paths`), none of which may exist unless ``overwrite``."""
    suffix = path.suffix.lower()
    if video is not False and (suffix in VIDEO_SUFFIXES or not suffix):
        pass
    elif video is not True and suffix in IMAGE_SUFFIXES:
        pass
    elif video is True:
        raise ValueError(f"--output {path}: this model makes videos; use a .mp4 or .gif file, or a folder name "
                         "(no suffix) for .png frames.")
    elif video is False:
        raise ValueError(f"--output {path}: this model makes images; use a .png or .jpg file.")
    else:
        raise ValueError(f"--output {path}: use .mp4/.gif or a folder (videos), .png/.jpg (images).")
    taken = [p for p in output_paths(path, samples) if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"--output {', '.join(map(str, taken))} exist{'s' if len(taken) == 1 else ''}; pass "
                              "--overwrite to replace or choose another name.")
    if not path.absolute().parent.exists():
        raise FileNotFoundError(f"The folder of --output ({path.absolute().parent}) does not exist.")


def output_paths(path: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(batch)]


def read_video(path: Path) -> list:
    """The frames of a video file (.mp4 / .gif / whatever imageio reads) or of a folder of images (.png / .jpg /
    .jpeg / .webp, in name order) as RGB uint8 (H, W, 3) arrays."""
    import imageio.v3 as iio
    import numpy as np

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise ValueError(f"--video {path}: a folder with no .png / .jpg / .webp frames.")
        frames = [iio.imread(p) for p in files]
    else:
        try:
            frames = list(iio.imread(path, index=None))
        except Exception as e:  # noqa: BLE001 (any reader's failure: say which file)
            raise ValueError(f"--video {path}: cannot read it as a video ({e}).") from e
    frames = [np.repeat(f[..., None], 3, -1) if f.ndim == 2 else f[..., :3] for f in frames]
    if not frames or any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"--video {path}: no frames, or frames of different sizes.")
    return [np.asarray(f, np.uint8) for f in frames]


def write_image(image, path: Path) -> None:
    """image: (H, W, 3) float in [0, 1] -> .png / .jpg (written atomically)."""
    import imageio.v2 as imageio
    import numpy as np

    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    imageio.imwrite(tmp, (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    os.replace(tmp, path)


def write_video(frames, path: Path, fps: int) -> None:
    """frames: (F, H, W, 3) float in [0, 1] -> mp4 / gif / folder of png (written atomically)."""
    import imageio.v2 as imageio
    import numpy as np

    u8 = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if not path.suffix:
        tmp = path.with_name(f".{path.name}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(u8):
            imageio.imwrite(tmp / f"frame_{i:04d}.png", f)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
        return
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    if path.suffix.lower() == ".mp4":
        import warnings

        with warnings.catch_warnings():  # ffmpeg is a subprocess; its fork happens before jax does any work
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            imageio.mimwrite(tmp, list(u8), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                             ffmpeg_log_level="error")
    else:
        imageio.mimwrite(tmp, list(u8), duration=1000 / fps, loop=0)
    os.replace(tmp, path)


def _backends_initialized() -> bool:
    """Whether jax already created its backends (then XLA_FLAGS can no longer change the devices)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def ensure_devices(n: int) -> str | None:
    """On a CPU-only machine, ask XLA for ``n`` simulated devices (before jax's backends start), with XLA:CPU's
    concurrency-optimized scheduler off (``pipefusion.CPU_RING_TEXT_FLAG``: a step over simulated devices ran
    nondeterministically with it; the same speed on one device)."""
    if n <= 1 or _backends_initialized():
        return None
    platforms = os.environ.get("JAX_PLATFORMS", "")
    try:
        import importlib.util

        has_gpu = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                            "jax_rocm60_plugin", "libtpu"))
    except (ImportError, ValueError):
        has_gpu = False
    if has_gpu and platforms != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return None
    from xdit_jax.parallel.pipefusion import CPU_RING_TEXT_FLAG  # XLA:CPU's concurrent runtime: see there

    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n} {CPU_RING_TEXT_FLAG}".strip()
    return f"CPU only: simulating {n} CPU devices for the mesh"


def enable_compile_cache(folder: str | None) -> None:
    """Turn on jax's persistent compilation cache (before the first compile)."""
    if folder == "off":
        return
    import jax

    root = Path(os.environ.get("XDIT_JAX_CACHE") or Path.home() / ".cache" / "xdit_jax")
    path = Path(folder) if folder else root / "jax_cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (OSError, AttributeError) as e:  # read-only home, old jax: run without the cache
        logging.getLogger("xdit_jax").warning("compilation cache disabled: %s", e)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Exception as e:  # a collective across processes failed: say so instead of a traceback
        if type(e).__name__ != "JaxRuntimeError" or "jax" not in sys.modules:
            raise
        import jax

        if jax.process_count() == 1:
            raise
        print(f"error: process {jax.process_index()} of {jax.process_count()}: a step across processes failed "
              f"({str(e).splitlines()[0][:300]}). A peer probably stopped or was started with other flags "
              "(mesh, model, --num-processes); see the other processes' logs.", file=sys.stderr)
        return 3


def _family_of(model: str) -> str | None:
    """The model family, where it is known without jax or a download (tiny names, local folders)."""
    from xdit_jax import tiny

    if model in tiny.TINY_NAMES and not Path(model).exists():  # (its pipeline's family: tiny-flux-kontext is FLUX's)
        from xdit_jax import pipelines

        return pipelines.family(tiny.model_index(tiny.TINY_NAMES[model])["_class_name"])
    index = Path(model) / "model_index.json"
    if index.exists():
        from xdit_jax import pipelines
        from xdit_jax.pipelines.denoise import pipeline_class_name

        return pipelines.family(pipeline_class_name(model))
    return None


def _expand_timesteps(model) -> bool:
    """Whether a Wan folder is TI2V-5B's (``expand_timesteps``: text-to-video, or image-to-video with --image)."""
    from xdit_jax.conversion import read_json

    return bool(read_json(Path(model) / "model_index.json").get("expand_timesteps"))


def _flux2_distilled(model) -> bool:
    """A FLUX.2 klein folder's ``is_distilled`` (model_index.json), False where it cannot be read."""
    try:
        from xdit_jax.pipelines.flux2 import is_distilled

        return is_distilled(model)
    except Exception:  # noqa: BLE001 (a hub id not resolved yet: the pipeline's default)
        return False


def _check_family_flags(family: str, args) -> None:
    """Flags that mean nothing for this family are refused rather than silently ignored."""
    fam = FAMILIES[family]
    video_only = {"num_frames": "--num-frames", "fps": "--fps"}
    wrong = [flag for name, flag in video_only.items() if not fam.video and getattr(args, name)]
    if "use_dynamic_cfg" not in fam.call_flags and args.use_dynamic_cfg:
        wrong.append("--use-dynamic-cfg (CogVideoX's)")
    if family != "wan" and args.guidance_scale_2 is not None:
        wrong.append("--guidance-scale-2 (Wan 2.2 A14B's)")
    if fam.call_hook is not _consisid_call and args.id_embeds is not None:
        wrong.append("--id-embeds (ConsisID's)")
    if getattr(args, "kind", None) not in DIFFUSION_FORCING:
        wrong += [f"{flag} (SkyReels-V2 diffusion forcing's)" for name, flag in DF_FLAGS.items()
                  if getattr(args, name) is not None]
    if not fam.true_cfg and args.true_cfg_scale is not None:
        *others, last = (f"{name}'s" for name in TRUE_CFG_FAMILIES.values())
        wrong.append(f"--true-cfg-scale ({', '.join(others)} and {last})")
    if fam.guidance_scale is None and args.guidance_scale is not None:
        wrong.append(f"--guidance-scale ({fam.true_cfg} is not guidance-distilled: its CFG is --true-cfg-scale with "
                     "--negative-prompt)")
    if "guidance_rescale" not in fam.call_flags and args.guidance_rescale:
        wrong.append("--guidance-rescale")
    if "skip_guidance_layers" not in fam.call_flags and args.skip_guidance_layers:
        wrong.append("--skip-guidance-layers (SD3's)")
    if not fam.binning and args.no_resolution_binning:
        wrong.append("--no-resolution-binning")
    if family != "ltx" and args.condition_frame_index is not None:
        wrong.append("--condition-frame-index (LTX-Video's)")
    if fam.fixed_text_length and args.max_sequence_length is not None:
        wrong.append(f"--max-sequence-length ({fam.fixed_text_length})")
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not used by this {family} model; drop the flag.")
    if getattr(args, "kind", None) in DIFFUSION_FORCING and args.overlap_history is None and \
            (args.num_frames or 0) > (args.base_num_frames or 97):
        raise ValueError(f"--num-frames {args.num_frames} > --base-num-frames {args.base_num_frames or 97}: a long "
                         "video needs --overlap-history (frames shared by consecutive windows; 17 or 37 recommended).")


def _read_vace_inputs(args) -> None:
    """Wan VACE's inputs as PIL images (resized by the pipeline as diffusers resizes PIL frames): ``args.vace_video`` /
    ``vace_mask`` (frames or None) and ``vace_references`` (or None); the output size defaults to the video's (rounded
    down to multiples of 16), its frame count to the video's."""
    from PIL import Image

    if args.mask is not None and args.video is None:
        raise ValueError("--mask: Wan VACE's mask goes with a control --video.")
    args.vace_video = None if args.video is None else [Image.fromarray(f) for f in read_video(Path(args.video))]
    args.vace_mask = None if args.mask is None else [Image.fromarray(f) for f in read_video(Path(args.mask))]
    args.vace_references = [Image.open(p).convert("RGB") for p in args.reference_images] if args.reference_images \
        else None
    if args.vace_video is not None:
        width, height = args.vace_video[0].size
        args.height, args.width = args.height or height // 16 * 16, args.width or width // 16 * 16


def _check_request(family: str, model, args, spec, guidance: float, max_sequence_length: int | None) -> None:
    """The family's cheap checks of sizes and mesh, from the config.json files only."""
    from importlib import import_module

    fam = FAMILIES[family]
    mod = import_module(f"xdit_jax.pipelines.{fam.module or family}")
    tc, vc = mod.read_configs(model)
    default = (mod.default_video if fam.video else mod.default_size)(tc, vc)
    h, w = args.height or default["height"], args.width or default["width"]
    if fam.binning:
        h, w = fam.binning(mod, tc, h, w, not args.no_resolution_binning)
    if fam.true_cfg:  # the batch doubles only for true CFG (FLUX's and HunyuanVideo's guidance_scale is embedded)
        guidance = (args.true_cfg_scale or fam.true_cfg_scale) if args.negative_prompt is not None else 1.0
    if fam.check_hook:
        h, w, guidance = fam.check_hook(mod, model, tc, args, h, w, guidance)
    frames = (args.num_frames or default["num_frames"],) if fam.video else ()
    extra = (max_sequence_length,) if fam.check_max_sequence_length else ()
    kw = {}
    tiny = import_module("xdit_jax.tiny")
    if fam.tiny_sample_size and args.model in tiny.TINY_NAMES and not Path(args.model).exists():  # (its area)
        kw["default_sample_size"] = getattr(tiny, fam.tiny_sample_size)
    mod.check_request(tc, vc, h, w, *frames, len(args.prompts), spec, guidance, *extra, **kw)


def _main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.prompts = args.prompts or [DEFAULT_PROMPT]
    args.images = list(args.image or [])  # --image may repeat (Qwen-Image-Edit-2509 / 2511); the others take one
    args.image = args.images[0] if args.images else None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from xdit_jax.distributed import ProcessGroup

        group = ProcessGroup.from_args(args.coordinator, args.num_processes, args.process_id, args.dist_timeout,
                                       args.heartbeat_timeout)
        spec = mesh_spec_from_args(args)
        early_family = _family_of(args.model)
        if args.output is None:
            args.output = FAMILIES[early_family or "cogvideox"].output
        out = Path(args.output)
        for name in ("steps", "num_frames", "height", "width", "max_sequence_length", "num_pipeline_patch",
                     "warmup_steps", "per_prompt", "max_area"):
            v = getattr(args, name)
            if v is not None and v < 1:
                flag = "num-images-per-prompt" if name == "per_prompt" else name.replace('_', '-')
                raise ValueError(f"--{flag} must be >= 1, got {v}.")
        for flag, path in [("image", p) for p in args.images] + [("last_image", args.last_image), ("mask", args.mask)] \
                + [("control_image", args.control_image)] \
                + [("reference_image", p) for p in args.reference_images or []]:
            if path is not None and not Path(path).is_file() and not (flag == "mask" and Path(path).is_dir()):
                raise FileNotFoundError(f"--{flag.replace('_', '-')} {path} is not a file.")
        if args.video is not None and not Path(args.video).exists():
            raise FileNotFoundError(f"--video {args.video} is neither a video file nor a folder of frames.")
        if args.video is not None and args.image is not None:
            raise ValueError("--video and --image: a video extension starts from the video; give one of them.")
        if args.last_image is not None and args.image is None:
            raise ValueError("--last-image needs --image (the first frame).")
        samples = len(args.prompts) * args.per_prompt
        check_output(out, args.overwrite, None if early_family is None else early_family in VIDEO_FAMILIES, samples)
        for flag in ("guidance_scale", "guidance_scale_2"):
            if getattr(args, flag) is not None and getattr(args, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0.")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        ap.exit(2, f"error: {e}\n")
    if spec.size % group.num_processes:
        ap.exit(2, f"error: the mesh {spec} ({spec.size} devices) cannot be split evenly over "
                   f"{group.num_processes} processes; give --mesh a multiple of {group.num_processes} devices.\n")

    from xdit_jax.distributed import supervise

    rc = supervise(group, list(sys.argv[1:] if argv is None else argv))
    if rc is not None:
        return rc
    note = ensure_devices(spec.size // group.num_processes)
    if note:
        print(note, file=sys.stderr)

    import jax

    from xdit_jax.distributed import DistributedError, call_on_process_zero, initialize

    enable_compile_cache(args.compile_cache)
    try:
        initialize(group)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3

    from xdit_jax import pipelines, tiny
    from xdit_jax.pipelines.denoise import pipeline_class_name
    from xdit_jax.safetensors_io import CheckpointError

    is_tiny = args.model in tiny.TINY_NAMES and not Path(args.model).exists()
    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    t0 = time.perf_counter()
    try:
        if spec.size > len(jax.devices()):
            raise ValueError(f"Mesh {spec} needs {spec.size} devices; {len(jax.devices())} are available.")
        if is_tiny:
            fam = tiny.TINY_NAMES[args.model]
            call_on_process_zero("xdit_jax.tiny", "make_tiny_model", f"xdit_jax_tiny_{fam}", family=fam)
            model = tiny.default_tiny_dir(fam)
        else:
            from xdit_jax.hub import resolve_model

            model = resolve_model(args.model)  # a local folder (a hub id is downloaded here)
        family = pipelines.family(pipeline_class_name(model))
        kind = pipeline_class_name(model)
        args.kind = kind  # (which family flags apply: SkyReels-V2's DF flags to its DF pipelines only)
        if args.video is not None and kind in ("SkyReelsV2DiffusionForcingPipeline", VIDEO_TO_VIDEO):
            kind = args.kind = VIDEO_TO_VIDEO  # a DF checkpoint extends the video (diffusers loads the same weights)
        elif args.video is not None and kind in ("WanPipeline", WAN_V2V):  # Wan video-to-video (SDEdit)
            if args.num_frames is not None:
                raise ValueError("--num-frames: Wan video-to-video makes as many frames as the --video has.")
            kind = args.kind = WAN_V2V
        elif args.image is not None and kind == "SkyReelsV2DiffusionForcingPipeline":  # (and starts from an image)
            kind = args.kind = "SkyReelsV2DiffusionForcingImageToVideoPipeline"
        elif family == "ltx" and (kind == LTX_CONDITION or args.condition_frame_index is not None):
            if args.image is not None and args.video is not None:
                raise ValueError("--image and --video: LTX-Video's condition pipeline takes one condition here.")
            kind = args.kind = LTX_CONDITION
        elif kind == WAN_VACE:  # (the control video optional; read now: its size is the default output size)
            _read_vace_inputs(args)
        elif args.video is not None:
            raise ValueError(f"--video: {args.model} does not extend videos (a SkyReels-V2 diffusion forcing "
                             "checkpoint does) nor run video-to-video (a Wan text-to-video one does).")
        elif kind == VIDEO_TO_VIDEO:
            raise ValueError(f"{args.model} is a SkyReels-V2 video-to-video (video extension) model: give the video "
                             "to extend with --video PATH.")
        elif kind == WAN_V2V:
            raise ValueError(f"{args.model} is a Wan video-to-video folder: give the video to start from with "
                             "--video PATH.")
        if kind == VIDEO_TO_VIDEO and args.overlap_history is None:
            raise ValueError("--video: give --overlap-history, the video's last frames the extension conditions on "
                             "(17 or 37 recommended).")
        image_to_video = kind in IMAGE_TO_VIDEO or (
            args.image is not None and family == "wan" and _expand_timesteps(model)) or (  # TI2V-5B with an image
            args.image is not None and FAMILIES[family].image_pipeline is not None and kind != LTX_CONDITION)
        if image_to_video and args.image is None:
            raise ValueError(f"{args.model} is an image-to-video model: give the first frame with --image PATH.")
        args.kontext = kind == "FluxKontextPipeline"  # an image model that takes an image to edit (optional)
        if kind == FLUX_FILL and (args.image is None or args.mask is None):
            raise ValueError(f"{args.model} is a FLUX.1 Fill model: give the image with --image PATH and the region "
                             "to repaint (white) with --mask PATH.")
        if kind in CONTROL and args.control_image is None:
            raise ValueError(f"{args.model} is a FLUX.1 Control (Canny / Depth) model: give the edge or depth map "
                             "with --control-image PATH.")
        if kind == COGVIEW4_CONTROL and args.control_image is None:
            raise ValueError(f"{args.model} is a CogView4 Control model: give the control image (an edge or depth "
                             "map) with --control-image PATH.")
        if kind not in CONTROL + (COGVIEW4_CONTROL,) and args.control_image is not None:
            raise ValueError("--control-image: FLUX.1 Control (Canny / Depth) models only (a FluxControlPipeline "
                             "folder) and CogView4 Control (a CogView4ControlPipeline folder).")
        if kind != WAN_VACE and (args.reference_images or args.conditioning_scale is not None):
            raise ValueError("--reference-image / --conditioning-scale: Wan VACE only (a WanVACEPipeline folder).")
        if kind != WAN_VACE and args.mask is not None and Path(args.mask).is_dir():
            raise ValueError(f"--mask {args.mask}: inpainting takes an image file (a folder of mask frames: Wan VACE).")
        if args.mask is not None and kind != WAN_VACE and (args.image is None or kind not in INPAINT):
            raise ValueError("--mask: inpainting takes a FLUX.1 (Kontext too), SD3, Chroma, Qwen-Image or Z-Image "
                             "model and the image to repaint (--image).")
        if args.mask is not None and kind != WAN_VACE:
            kind = args.kind = INPAINT[kind]
        elif args.image is not None and kind in IMAGE_TO_IMAGE:  # FLUX.1 / SD3 / Chroma / Qwen-Image image-to-image
            kind = args.kind = IMAGE_TO_IMAGE[kind]
        img2img = kind in IMAGE_TO_IMAGE.values() or kind in INPAINT.values()
        if args.padding_mask_crop is not None and (kind not in INPAINT.values() or kind in NO_MASK_CROP
                                                   or args.padding_mask_crop < 0):
            raise ValueError("--padding-mask-crop PX (>= 0): inpainting only (a FLUX.1, SD3, Chroma, Qwen-Image or "
                             "Z-Image model with --image and --mask; not FLUX.1 Fill, Control or Kontext).")
        if img2img and args.image is None:
            raise ValueError(f"{args.model} is an image-to-image folder: give the image to start from with "
                             "--image PATH.")
        if args.strength is not None and not img2img and kind != WAN_V2V:
            raise ValueError("--strength: image-to-image (a FLUX.1, SD3, Chroma, Qwen-Image or Z-Image model with "
                             "--image) and Wan video-to-video (--video) only.")
        if args.strength is not None and not 0.0 < args.strength <= 1.0:
            raise ValueError(f"--strength must be in (0, 1], got {args.strength}.")
        flux2_reference = kind == "Flux2KleinPipeline" and args.image is not None  # FLUX.2 klein's reference image
        qwen_edit = kind in QWEN_EDIT  # an image model that edits the given image(s) (required)
        if qwen_edit and args.image is None:
            raise ValueError(f"{args.model} is a Qwen-Image-Edit model: give the image to edit with --image PATH.")
        if len(args.images) > 1 and kind != "QwenImageEditPlusPipeline":
            raise ValueError(f"--image given {len(args.images)} times: {args.model} takes one image (several: "
                             "Qwen-Image-Edit-2509 / 2511).")
        k5_edit = kind == "Kandinsky5I2IPipeline"  # (Kandinsky 5.0 image-to-image: the image to edit, required)
        if k5_edit and args.image is None:
            raise ValueError(f"{args.model} is a Kandinsky 5.0 image-to-image model: give the image to edit with "
                             "--image PATH.")
        if k5_edit and args.last_image is not None:
            raise ValueError("--last-image: Kandinsky 5.0 image-to-image takes one image (--image).")
        chrono_edit = kind == CHRONOEDIT
        if chrono_edit and (args.image is None or args.last_image is not None):
            raise ValueError(f"{args.model} is a ChronoEdit model: give the image to edit with --image PATH (one "
                             "image; no --last-image).")
        longcat_edit = kind == "LongCatImageEditPipeline"  # (LongCat-Image-Edit: the image to edit, required)
        if longcat_edit and args.image is None:
            raise ValueError(f"{args.model} is a LongCat-Image-Edit model: give the image to edit with --image PATH.")
        if not image_to_video and not args.kontext and not flux2_reference and not qwen_edit and not img2img \
                and not k5_edit and not chrono_edit and not longcat_edit and kind != LTX_CONDITION \
                and args.image is not None:
            raise ValueError(f"--image: {args.model} is not an image-to-video model and takes no image (a CogVideoX "
                             "or Wan I2V checkpoint, Wan 2.2 TI2V-5B, FLUX.1 Kontext or Qwen-Image-Edit does).")
        if kind == "Kandinsky5I2VPipeline":  # (the pipeline's rules, before loading it)
            if args.last_image is not None:
                raise ValueError("--last-image: Kandinsky 5.0 image-to-video takes the first frame only.")
            if args.num_frames is not None and 1 < (args.num_frames - 1) // 4 + 1 <= 4:
                raise ValueError(f"--num-frames {args.num_frames}: Kandinsky 5.0 image-to-video takes 1 or >= 17 "
                                 "frames (its first-frame normalization needs 5 latent frames).")
        if args.last_image is not None and kind == "Flux2KleinPipeline":
            raise ValueError("--last-image: FLUX.2 klein takes its reference image with --image.")
        if args.last_image is not None and kind in ("CogVideoXImageToVideoPipeline", "FluxKontextPipeline",
                                                    "ConsisIDPipeline", *IMAGE_TO_IMAGE.values(),
                                                    *INPAINT.values()):
            raise ValueError("--last-image: FLUX.1 Kontext and image-to-image take one image (--image)."
                             if args.kontext or img2img else
                             "--last-image: CogVideoX image-to-video takes the first frame only.")
        if not args.kontext and (args.max_area is not None or args.no_auto_resize):
            raise ValueError(f"--{'max-area' if args.max_area is not None else 'no-auto-resize'}: FLUX.1 Kontext "
                             f"only; {args.model} is not a Kontext checkpoint.")
        check_output(out, args.overwrite, family in VIDEO_FAMILIES, samples)
        _check_family_flags(family, args)
        fam = FAMILIES[family]
        if is_tiny and fam.binning:
            args.no_resolution_binning = True  # the tiny models' sizes are nowhere near the trained shapes
        if is_tiny and fam.tiny_size and not qwen_edit and kind != QWEN_EDIT_INPAINT:  # the real default (1024 x 1024) would be slow for a toy
            # model (Qwen-Image-Edit: the image's aspect ratio at a toy area, below)
            args.height, args.width = args.height or fam.tiny_size[0], args.width or fam.tiny_size[1]
        if is_tiny and fam.tiny_frames:
            args.num_frames = args.num_frames or fam.tiny_frames
        if is_tiny and args.kontext:  # (and Kontext's default output area too)
            args.max_area = args.max_area or args.height * args.width
        guidance = fam.guidance_scale if args.guidance_scale is None else args.guidance_scale
        if kind == FLUX_FILL and args.guidance_scale is None:
            guidance = 30.0  # diffusers' FluxFillPipeline default (and 50 steps, below)
        distilled = family == "flux2" and _flux2_distilled(model)
        if distilled and args.guidance_scale is None:
            guidance = fam.distilled_guidance_scale
        tiny_msl = fam.tiny_max_sequence_length
        msl = (args.max_sequence_length or (getattr(tiny, tiny_msl) if is_tiny and tiny_msl else None)
               or fam.max_sequence_length)
        if (Path(model) / "transformer" / "config.json").exists():  # cheap checks before loading any weights
            _check_request(family, model, args, spec, guidance, msl)
        i2v_class = FAMILIES[family].image_pipeline if image_to_video else None
        cls = pipelines.pipeline_class("WanImageToVideoPipeline" if image_to_video and family == "wan" else
                                       i2v_class or kind)
        kw = dict(mesh=spec, dtype=dtype, attention_backend=args.attention_backend,
                  pipefusion_patches=args.num_pipeline_patch, pipefusion_warmup_steps=args.warmup_steps)
        if args.random_weights:
            if jax.process_index() == 0:
                print(f"random weights from {model}'s configs (stand-in tokenizers): the output is noise",
                      file=sys.stderr)
            pipe = cls.from_config(model, seed=args.seed, **kw)
        else:
            pipe = cls.from_pretrained(model, cache_dir=args.cache_dir, **kw)
        if is_tiny and fam.tiny_sample_size:  # (HiDream-I1's size rule at the tiny model's area, as its tests)
            pipe.default_sample_size = getattr(tiny, fam.tiny_sample_size)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError, NotImplementedError,
            DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    if pipe.uses_pipefusion and jax.process_index() == 0:
        print(f"PipeFusion: {spec.pipefusion} stage(s), {pipe.pipefusion_patches} patches; the first "
              f"{pipe.pipefusion_warmup_steps} step(s) exact (again where a two-expert model switches), then patches "
              "attend to one-step-old K/V of later patches",
              file=sys.stderr)
    if args.vae_tiling or args.no_vae_tiling:
        pipe.enable_vae_tiling(bool(args.vae_tiling))
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    steps = args.steps or (fam.tiny_steps if is_tiny else fam.distilled_steps if distilled else fam.steps)
    if family == "flux" and not is_tiny and not pipe.transformer_config.guidance_embeds:  # FLUX.1-schnell
        steps, msl = args.steps or 4, args.max_sequence_length or 256  # its model card's settings (timestep-distilled)
    if kind == FLUX_FILL and not args.steps and not is_tiny:
        steps = 50
    true_cfg = args.true_cfg_scale or fam.true_cfg_scale
    if fam.true_cfg and args.negative_prompt is not None and true_cfg <= 1.0:
        print(f"note: --negative-prompt is used by {fam.true_cfg} only with --true-cfg-scale > 1", file=sys.stderr)
    kw = dict(height=args.height, width=args.width, num_inference_steps=steps, guidance_scale=guidance,
              seed=args.seed, progress=not args.no_progress)
    kw["num_videos_per_prompt" if fam.video else "num_images_per_prompt"] = args.per_prompt
    if fam.video:
        kw["num_frames"] = args.num_frames
    if not fam.fixed_text_length:
        kw["max_sequence_length"] = msl
    if fam.binning:
        kw["use_resolution_binning"] = not args.no_resolution_binning
    if fam.true_cfg:
        kw["true_cfg_scale"] = true_cfg
    kw.update({name: getattr(args, name) for name in fam.call_flags if getattr(args, name) is not None})
    if fam.fps_call_arg and args.fps:
        kw[fam.fps_call_arg] = args.fps
    if family == "wan" and args.guidance_scale_2 is not None:
        kw["guidance_scale_2"] = args.guidance_scale_2
    if kind in DIFFUSION_FORCING:  # (diffusers' names; fps: its fps embedding too)
        kw.update({name: getattr(args, name) for name in DF_FLAGS if getattr(args, name) is not None})
        kw["fps"] = args.fps or pipe.default_video()["fps"]
    if args.kontext:
        kw.update(max_area=args.max_area or 1024 ** 2, _auto_resize=not args.no_auto_resize)
    if img2img:  # (diffusers' image= and strength; inpainting's mask_image=)
        from PIL import Image

        kw.update(image=Image.open(args.image).convert("RGB"))
        if args.strength is not None:  # (else diffusers' default: 0.6; Chroma 0.9)
            kw.update(strength=args.strength)
        if args.mask is not None:
            kw["mask_image"] = Image.open(args.mask)
        if args.padding_mask_crop is not None:
            kw["padding_mask_crop"] = args.padding_mask_crop
    if args.control_image is not None:  # (diffusers' control_image=; Control folders only, checked above)
        from PIL import Image

        kw["control_image"] = Image.open(args.control_image).convert("RGB")
    if (qwen_edit or kind == QWEN_EDIT_INPAINT) and is_tiny:  # the image's aspect ratio at 96 x 64 pixels: a toy
        kw.update(vae_image_area=96 * 64)
    if family == "flux2" and args.image is not None:  # a reference image (diffusers' image=)
        from PIL import Image

        kw["image"] = Image.open(args.image).convert("RGB")  # (the output takes its size unless given)
    if image_to_video:
        from PIL import Image

        if family in ("wan", "skyreels_v2"):
            kw["last_image"] = None if args.last_image is None else Image.open(args.last_image).convert("RGB")
        call = functools.partial(pipe, Image.open(args.image).convert("RGB"))
    elif (args.kontext and img2img) or kind == QWEN_EDIT_INPAINT:  # Kontext / Qwen-Image-Edit inpainting: image=
        def call(prompts, **k):  # and mask_image= above (diffusers' argument order: the image first, then the prompt)
            return pipe(prompt=prompts, **k)
    elif args.kontext:
        from PIL import Image

        call = functools.partial(pipe, None if args.image is None else Image.open(args.image).convert("RGB"))
    elif kind in (VIDEO_TO_VIDEO, WAN_V2V):
        try:
            frames = read_video(Path(args.video))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if kind == WAN_V2V:  # the output has the video's frames (diffusers'); strength: its default 0.8 unless given
            kw.pop("num_frames", None)
            kw.update({} if args.strength is None else {"strength": args.strength})
        call = functools.partial(pipe, frames)
    elif kind == LTX_CONDITION:  # (its first argument is conditions=: the prompt goes by name)
        from PIL import Image

        if args.image is not None:
            kw["image"] = Image.open(args.image).convert("RGB")
        elif args.video is not None:
            kw["video"] = [Image.fromarray(f) for f in read_video(Path(args.video))]
        kw["frame_index"] = args.condition_frame_index or 0
        call = lambda prompts, **k: pipe(prompt=prompts, **k)  # noqa: E731
    elif kind == WAN_VACE:
        kw.update(video=args.vace_video, mask=args.vace_mask, reference_images=args.vace_references)
        if args.conditioning_scale is not None:
            kw["conditioning_scale"] = args.conditioning_scale
        call = pipe
    elif kind in (CHRONOEDIT, "LongCatImageEditPipeline"):  # the image to edit (ChronoEdit: resized to the output
        # size, diffusers' 480 x 832 unless sized; LongCat-Image-Edit: the output its aspect ratio at 1024^2 unless sized)
        from PIL import Image

        call = functools.partial(pipe, Image.open(args.images[0]).convert("RGB"))
    elif kind == "Kandinsky5I2IPipeline":  # the image to edit; the output takes its size unless sized
        from PIL import Image

        call = functools.partial(pipe, Image.open(args.images[0]).convert("RGB"))
    elif qwen_edit:  # the image(s) to edit; the output takes the (last) image's aspect ratio unless sized
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in args.images]
        call = functools.partial(pipe, images if kind == "QwenImageEditPlusPipeline" else images[0])
    else:
        call = pipe
    try:
        if fam.call_hook:
            kw.update(fam.call_hook(args))
        result = call(args.prompts, negative_prompt=args.negative_prompt, **kw)
    except (ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        times = {"loading": load_s, **result.timings}
        if family in VIDEO_FAMILIES:
            paths = output_paths(out, result.frames.shape[0])
            fps = args.fps or pipe.default_video()["fps"]
            for video, p in zip(result.frames, paths):
                write_video(video, p, fps)
            b, f, h, w, _ = result.frames.shape
            print(f"wrote {', '.join(map(str, paths))}: {f} frames of {w}x{h} at {fps} fps")
            shape = {"frames": f, "height": h, "width": w}
        else:
            paths = output_paths(out, result.images.shape[0])
            for image, p in zip(result.images, paths):
                write_image(image, p)
            b, h, w, _ = result.images.shape
            print(f"wrote {', '.join(map(str, paths))}: {w}x{h}")
            shape = {"height": h, "width": w}
        print("stage times: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
        peak = result.peak_memory_bytes
        print("peak device memory: " + (f"{peak / 2**30:.2f} GiB" if peak else "not reported by this backend"))
        if args.json:
            print(json.dumps({"times_s": times, "peak_memory_bytes": peak, **shape, "mesh": str(spec),
                              "dtype": dtype, "devices": spec.size, "model_family": family}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
