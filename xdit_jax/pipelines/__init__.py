"""Pipelines, one thin file per model family; :func:`pipeline_class` picks one from a folder."""

from __future__ import annotations

import importlib

# diffusers pipeline class (model_index.json's _class_name) -> (module, our class, family)
PIPELINES = {
    "CogVideoXPipeline": ("xdit_jax.pipelines.cogvideox", "CogVideoXPipeline", "cogvideox"),
    "CogVideoXImageToVideoPipeline": ("xdit_jax.pipelines.cogvideox", "CogVideoXImageToVideoPipeline", "cogvideox"),
    "ConsisIDPipeline": ("xdit_jax.pipelines.consisid", "ConsisIDPipeline", "consisid"),
    "CogView3PlusPipeline": ("xdit_jax.pipelines.cogview3", "CogView3PlusPipeline", "cogview3"),
    "PixArtAlphaPipeline": ("xdit_jax.pipelines.pixart", "PixArtPipeline", "pixart"),
    "PixArtSigmaPipeline": ("xdit_jax.pipelines.pixart", "PixArtPipeline", "pixart"),
    "HunyuanDiTPipeline": ("xdit_jax.pipelines.hunyuandit", "HunyuanDiTPipeline", "hunyuandit"),
    "MochiPipeline": ("xdit_jax.pipelines.mochi", "MochiPipeline", "mochi"),
    "LTXPipeline": ("xdit_jax.pipelines.ltx", "LTXPipeline", "ltx"),
    "LTXImageToVideoPipeline": ("xdit_jax.pipelines.ltx", "LTXImageToVideoPipeline", "ltx"),
    "LTXConditionPipeline": ("xdit_jax.pipelines.ltx_condition", "LTXConditionPipeline", "ltx"),
    "FluxPipeline": ("xdit_jax.pipelines.flux", "FluxPipeline", "flux"),
    "FluxKontextPipeline": ("xdit_jax.pipelines.flux", "FluxKontextPipeline", "flux"),
    "FluxKontextInpaintPipeline": ("xdit_jax.pipelines.flux", "FluxKontextInpaintPipeline", "flux"),
    "FluxImg2ImgPipeline": ("xdit_jax.pipelines.flux", "FluxImg2ImgPipeline", "flux"),
    "FluxInpaintPipeline": ("xdit_jax.pipelines.flux", "FluxInpaintPipeline", "flux"),
    "FluxFillPipeline": ("xdit_jax.pipelines.flux_fill", "FluxFillPipeline", "flux"),
    "FluxControlPipeline": ("xdit_jax.pipelines.flux_fill", "FluxControlPipeline", "flux"),
    "FluxControlImg2ImgPipeline": ("xdit_jax.pipelines.flux_fill", "FluxControlImg2ImgPipeline", "flux"),
    "FluxControlInpaintPipeline": ("xdit_jax.pipelines.flux_fill", "FluxControlInpaintPipeline", "flux"),
    "StableDiffusion3Pipeline": ("xdit_jax.pipelines.sd3", "StableDiffusion3Pipeline", "sd3"),
    "StableDiffusion3Img2ImgPipeline": ("xdit_jax.pipelines.sd3", "StableDiffusion3Img2ImgPipeline", "sd3"),
    "StableDiffusion3InpaintPipeline": ("xdit_jax.pipelines.sd3", "StableDiffusion3InpaintPipeline", "sd3"),
    "WanPipeline": ("xdit_jax.pipelines.wan", "WanPipeline", "wan"),
    "WanImageToVideoPipeline": ("xdit_jax.pipelines.wan", "WanImageToVideoPipeline", "wan"),
    "WanVideoToVideoPipeline": ("xdit_jax.pipelines.wan", "WanVideoToVideoPipeline", "wan"),
    "WanVACEPipeline": ("xdit_jax.pipelines.wan_vace", "WanVACEPipeline", "wan"),
    "SkyReelsV2Pipeline": ("xdit_jax.pipelines.skyreels_v2", "SkyReelsV2Pipeline", "skyreels_v2"),
    "SkyReelsV2ImageToVideoPipeline": ("xdit_jax.pipelines.skyreels_v2", "SkyReelsV2ImageToVideoPipeline",
                                       "skyreels_v2"),
    "SkyReelsV2DiffusionForcingImageToVideoPipeline": ("xdit_jax.pipelines.skyreels_v2",
                                                       "SkyReelsV2DiffusionForcingImageToVideoPipeline", "skyreels_v2"),
    "SkyReelsV2DiffusionForcingVideoToVideoPipeline": ("xdit_jax.pipelines.skyreels_v2",
                                                       "SkyReelsV2DiffusionForcingVideoToVideoPipeline", "skyreels_v2"),
    "SkyReelsV2DiffusionForcingPipeline": ("xdit_jax.pipelines.skyreels_v2", "SkyReelsV2DiffusionForcingPipeline",
                                           "skyreels_v2"),
    "LattePipeline": ("xdit_jax.pipelines.latte", "LattePipeline", "latte"),
    "HunyuanVideoPipeline": ("xdit_jax.pipelines.hunyuan_video", "HunyuanVideoPipeline", "hunyuanvideo"),
    "HunyuanVideo15Pipeline": ("xdit_jax.pipelines.hunyuan_video15", "HunyuanVideo15Pipeline", "hunyuan_video15"),
    "HunyuanImagePipeline": ("xdit_jax.pipelines.hunyuanimage", "HunyuanImagePipeline", "hunyuanimage"),
    "Kandinsky5T2VPipeline": ("xdit_jax.pipelines.kandinsky5", "Kandinsky5T2VPipeline", "kandinsky5"),
    "Kandinsky5T2IPipeline": ("xdit_jax.pipelines.kandinsky5_t2i", "Kandinsky5T2IPipeline", "kandinsky5-t2i"),
    "Kandinsky5I2VPipeline": ("xdit_jax.pipelines.kandinsky5_i2v", "Kandinsky5I2VPipeline", "kandinsky5"),
    "Kandinsky5I2IPipeline": ("xdit_jax.pipelines.kandinsky5_i2i", "Kandinsky5I2IPipeline", "kandinsky5-t2i"),
    "HunyuanVideo15ImageToVideoPipeline": ("xdit_jax.pipelines.hunyuan_video15", "HunyuanVideo15ImageToVideoPipeline",
                                           "hunyuan_video15"),
    "QwenImagePipeline": ("xdit_jax.pipelines.qwenimage", "QwenImagePipeline", "qwenimage"),
    "QwenImageImg2ImgPipeline": ("xdit_jax.pipelines.qwenimage", "QwenImageImg2ImgPipeline", "qwenimage"),
    "QwenImageInpaintPipeline": ("xdit_jax.pipelines.qwenimage", "QwenImageInpaintPipeline", "qwenimage"),
    "QwenImageEditPipeline": ("xdit_jax.pipelines.qwenimage_edit", "QwenImageEditPipeline", "qwenimage"),
    "QwenImageEditInpaintPipeline": ("xdit_jax.pipelines.qwenimage_edit", "QwenImageEditInpaintPipeline", "qwenimage"),
    "QwenImageEditPlusPipeline": ("xdit_jax.pipelines.qwenimage_edit", "QwenImageEditPlusPipeline", "qwenimage"),
    "ZImagePipeline": ("xdit_jax.pipelines.zimage", "ZImagePipeline", "zimage"),
    "ZImageImg2ImgPipeline": ("xdit_jax.pipelines.zimage", "ZImageImg2ImgPipeline", "zimage"),
    "ZImageInpaintPipeline": ("xdit_jax.pipelines.zimage", "ZImageInpaintPipeline", "zimage"),
    "CogView4Pipeline": ("xdit_jax.pipelines.cogview4", "CogView4Pipeline", "cogview4"),
    "CogView4ControlPipeline": ("xdit_jax.pipelines.cogview4_control", "CogView4ControlPipeline", "cogview4"),
    "SanaPipeline": ("xdit_jax.pipelines.sana", "SanaPipeline", "sana"),
    "SanaSprintPipeline": ("xdit_jax.pipelines.sana", "SanaSprintPipeline", "sana-sprint"),
    "SanaVideoPipeline": ("xdit_jax.pipelines.sana_video", "SanaVideoPipeline", "sana-video"),
    "SanaImageToVideoPipeline": ("xdit_jax.pipelines.sana_video", "SanaImageToVideoPipeline", "sana-video"),
    "ChromaPipeline": ("xdit_jax.pipelines.chroma", "ChromaPipeline", "chroma"),
    "ChromaImg2ImgPipeline": ("xdit_jax.pipelines.chroma", "ChromaImg2ImgPipeline", "chroma"),
    "ChromaInpaintPipeline": ("xdit_jax.pipelines.chroma", "ChromaInpaintPipeline", "chroma"),
    "Lumina2Pipeline": ("xdit_jax.pipelines.lumina2", "Lumina2Pipeline", "lumina2"),
    # diffusers' earlier name of the same pipeline (still an alias there)
    "Lumina2Text2ImgPipeline": ("xdit_jax.pipelines.lumina2", "Lumina2Pipeline", "lumina2"),
    "Flux2KleinPipeline": ("xdit_jax.pipelines.flux2", "Flux2KleinPipeline", "flux2"),
    "Flux2Pipeline": ("xdit_jax.pipelines.flux2", "Flux2Pipeline", "flux2"),
    "HiDreamImagePipeline": ("xdit_jax.pipelines.hidream", "HiDreamImagePipeline", "hidream"),
    "ChronoEditPipeline": ("xdit_jax.pipelines.chronoedit", "ChronoEditPipeline", "chronoedit"),
    "Cosmos2TextToImagePipeline": ("xdit_jax.pipelines.cosmos", "Cosmos2TextToImagePipeline", "cosmos"),
    "Cosmos2VideoToWorldPipeline": ("xdit_jax.pipelines.cosmos", "Cosmos2VideoToWorldPipeline", "cosmos-v2w"),
    "LongCatImagePipeline": ("xdit_jax.pipelines.longcat_image", "LongCatImagePipeline", "longcat"),
    "LongCatImageEditPipeline": ("xdit_jax.pipelines.longcat_image", "LongCatImageEditPipeline", "longcat"),
    "OvisImagePipeline": ("xdit_jax.pipelines.ovis_image", "OvisImagePipeline", "ovis-image"),
    "HunyuanVideoImageToVideoPipeline": ("xdit_jax.pipelines.hunyuan_video_i2v", "HunyuanVideoImageToVideoPipeline",
                                         "hunyuanvideo"),
}

# diffusers pipelines of a supported family refused on purpose (the reason in the error)
REFUSED = {
}
REFUSED.update({name: f"{name} is Cosmos 1.0 (the AutoencoderKLCosmos VAE and Cosmos 1.0's transformer): not supported; "
                      "xdit_jax runs Cosmos-Predict2 (Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline)."
                for name in ("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline")})


def family(class_name: str) -> str:
    """The family ("cogvideox", "pixart", "hunyuandit", "mochi", "flux", "sd3", "wan", "latte", "hunyuanvideo",
    "qwenimage", "zimage", "sana", "sana-sprint", "chroma", "lumina2", "flux2", "skyreels_v2", "ltx", "consisid",
    "hunyuan_video15", "cogview3", "hunyuanimage", "cogview4", "kandinsky5",
    "kandinsky5-t2i", "sana-video", "hidream", "cosmos", "cosmos-v2w", "longcat") of a diffusers pipeline class name;
    a clear error for the others."""
    if class_name in REFUSED:
        raise ValueError(REFUSED[class_name])
    if class_name not in PIPELINES:
        raise ValueError(f"{class_name or 'This'} pipeline is not supported; supported: {', '.join(PIPELINES)}.")
    return PIPELINES[class_name][2]


def pipeline_class(class_name: str):
    """Our pipeline class for a diffusers pipeline class name."""
    family(class_name)
    mod, cls, _ = PIPELINES[class_name]
    return getattr(importlib.import_module(mod), cls)
