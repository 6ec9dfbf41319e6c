"""Tiny random diffusers CogVideoX pipelines written with save_pretrained (the oracle's side)."""

import contextlib
import functools
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel

from tests.torch_util import randomize_, state_dict_np
from xdit_jax import tiny

# The three transformer variants on the tiny shapes of xdit_jax.tiny.
VARIANTS = {
    "2b": {},
    "5b": dict(use_rotary_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    # image-to-video (CogVideoXImageToVideoPipeline): the noise and the image's latents in; 5B-I2V's learned
    # positional table (its size: the sample's, 64 x 96 and 9 frames here), 1.5-I2V's ofs embedding (and its VAE's
    # invert_scale_latents)
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5-i2v": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, in_channels=8,
                    ofs_embed_dim=32),
}


def make_torch_pipeline(variant: str = "2b", seed: int = 0, scheduler: str = "ddim") -> CogVideoXPipeline:
    torch.manual_seed(seed)
    transformer = randomize_(CogVideoXTransformer3DModel(**{**tiny.TRANSFORMER, **VARIANTS[variant]}), seed, std=0.1)
    vae_kw = dict(tiny.VAE, invert_scale_latents=variant == "1.5-i2v")
    vae = randomize_(AutoencoderKLCogVideoX(**vae_kw), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched_kw = {k: v for k, v in tiny.SCHEDULER.items() if not k.startswith("_")}
    sched_cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    if variant.endswith("i2v"):
        from diffusers import CogVideoXImageToVideoPipeline

        return CogVideoXImageToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                                             transformer=transformer, scheduler=sched_cls(**sched_kw))
    return CogVideoXPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=sched_cls(**sched_kw))


def make_torch_consisid(seed: int = 0, scheduler: str = "ddim"):
    """diffusers' ConsisIDPipeline at tiny size (xdit_jax.tiny.CONSISID_TRANSFORMER, the CogVideoX VAE, T5;
    ``scheduler`` "ddim" or "dpm", the release's CogVideoXDPMScheduler, whose steps draw noise: torch's there, JAX's
    here). Imported from its module: the package's name needs OpenCV (only for kps_cond)."""
    from diffusers import ConsisIDTransformer3DModel
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

    tp = make_torch_pipeline("5b-i2v", seed, scheduler=scheduler)
    torch.manual_seed(seed)
    transformer = randomize_(ConsisIDTransformer3DModel(**tiny.CONSISID_TRANSFORMER), seed, std=0.1)
    return ConsisIDPipeline(tokenizer=tp.tokenizer, text_encoder=tp.text_encoder, vae=tp.vae, transformer=transformer,
                            scheduler=tp.scheduler)


def random_image(seed: int, size: tuple[int, int]):
    """A PIL RGB image of ``size`` (width, height) with uniform random pixels (image-to-video's input)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save_torch_pipeline(pipe: CogVideoXPipeline, folder: Path, **kw) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True, **kw)
    return folder



def make_torch_pixart(variant: str = "sigma", seed: int = 0):
    """A tiny random diffusers PixArt pipeline (xdit_jax.tiny's PixArt configs). "alpha": PixArt-alpha's
    1024px shape (sample_size 128, so the resolution / aspect-ratio micro-conditions are on)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    tkw = dict(tiny.PIXART_TRANSFORMER)
    if variant == "alpha":
        # micro-conditions need an inner dim divisible by 3
        tkw.update(sample_size=128, use_additional_conditions=None, num_attention_heads=3, cross_attention_dim=48)
    transformer = randomize_(PixArtTransformer2DModel(**tkw), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.PIXART_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched = DPMSolverMultistepScheduler(**{k: v for k, v in tiny.PIXART_SCHEDULER.items() if not k.startswith("_")})
    cls = PixArtAlphaPipeline if variant == "alpha" else PixArtSigmaPipeline
    return cls(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=sched)


def make_torch_cogview3(seed: int = 0):
    """A tiny random diffusers CogView3PlusPipeline (xdit_jax.tiny's CogView3 configs: the tiny T5 and tokenizer, an
    SD-style AutoencoderKL without quant convs, the CogVideoX DDIM)."""
    from diffusers import AutoencoderKL, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    transformer = randomize_(CogView3PlusTransformer2DModel(**tiny.COGVIEW3_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.COGVIEW3_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched = CogVideoXDDIMScheduler(**{k: v for k, v in tiny.COGVIEW3_SCHEDULER.items() if not k.startswith("_")})
    return CogView3PlusPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                                transformer=transformer, scheduler=sched)


def make_torch_latte(seed: int = 0, video_length: int = 16):
    """A tiny random diffusers LattePipeline (xdit_jax.tiny's Latte configs, Latte-1's DDIM); ``video_length``:
    the frames diffusers' transformer can take (its frame table has that many rows; any count runs here)."""
    from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(seed)
    transformer = randomize_(LatteTransformer3DModel(**dict(tiny.LATTE_TRANSFORMER, video_length=video_length)), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.LATTE_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched = DDIMScheduler(**{k: v for k, v in tiny.LATTE_SCHEDULER.items() if not k.startswith("_")})
    return LattePipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                         scheduler=sched)


def make_torch_hunyuandit(variant: str = "v1.2", seed: int = 0, scheduler: str = "ddpm"):
    """A tiny random diffusers HunyuanDiT pipeline (xdit_jax.tiny's configs); "v1.1": with the style and
    image-size conditions; ``scheduler``: "ddpm" (as shipped) or "dpm" (DPM-Solver multistep)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        HunyuanDiT2DModel,
        HunyuanDiTPipeline,
    )
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tkw = dict(tiny.HUNYUAN_TRANSFORMER, use_style_cond_and_image_meta_size=variant == "v1.1")
    transformer = randomize_(HunyuanDiT2DModel(**tkw), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.PIXART_VAE), seed + 1, std=0.1)
    bert_kw = {k: v for k, v in tiny.HUNYUAN_BERT.items() if k != "model_type"}
    text_encoder = randomize_(BertModel(BertConfig(**bert_kw), add_pooling_layer=False), seed + 2, std=0.2)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder_2 = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.HUNYUAN_SCHEDULER.items() if not k.startswith("_")}
    sched = DDPMScheduler(**skw) if scheduler == "ddpm" else DPMSolverMultistepScheduler(
        **{k: v for k, v in tiny.PIXART_SCHEDULER.items() if not k.startswith("_")})
    return HunyuanDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny.train_bert_tokenizer(),
                              transformer=transformer, scheduler=sched, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=text_encoder_2,
                              tokenizer_2=tiny.train_tokenizer())


def make_torch_mochi(seed: int = 0, force_zeros_for_empty_prompt: bool = False):
    """A tiny random diffusers Mochi pipeline (xdit_jax.tiny's Mochi configs)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = randomize_(MochiTransformer3DModel(**tiny.MOCHI_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLMochi(**tiny.MOCHI_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.MOCHI_SCHEDULER.items() if not k.startswith("_")})
    return MochiPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tiny.train_tokenizer(),
                         transformer=transformer, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def make_torch_ltx(seed: int = 0, i2v: bool = False, condition: bool = False):
    """A tiny random diffusers LTX-Video pipeline (xdit_jax.tiny's LTX configs); ``i2v``: LTXImageToVideoPipeline;
    ``condition``: LTXConditionPipeline (with the 0.9.5+ scheduler config, no dynamic shifting)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = randomize_(LTXVideoTransformer3DModel(**tiny.LTX_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLLTXVideo(**tiny.LTX_VAE), seed + 1, std=0.1)
    with torch.no_grad():  # the latents' per-channel statistics (buffers)
        vae.latents_mean.copy_(torch.linspace(-0.2, 0.2, vae.latents_mean.numel()))
        vae.latents_std.copy_(torch.linspace(0.6, 1.4, vae.latents_std.numel()))
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched_cfg = tiny.LTX_CONDITION_SCHEDULER if condition else tiny.LTX_SCHEDULER
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    cls = LTXImageToVideoPipeline if i2v else LTXPipeline
    if condition:
        from diffusers import LTXConditionPipeline as cls
    return cls(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tiny.train_tokenizer(),
               transformer=transformer)


def make_torch_flux(seed: int = 0, guidance_embeds: bool = True, kontext: bool = False):
    """A tiny random diffusers FLUX pipeline (xdit_jax.tiny's FLUX configs); ``guidance_embeds=False``:
    schnell-like; ``kontext``: a FluxKontextPipeline of the same parts."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = randomize_(FluxTransformer2DModel(**dict(tiny.FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)),
                             seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    clip_kw = {k: v for k, v in tiny.FLUX_CLIP.items() if k != "model_type"}
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig(**clip_kw)), seed + 2, std=0.2)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder_2 = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.FLUX_SCHEDULER.items() if not k.startswith("_")}
    if not guidance_embeds:  # FLUX.1-schnell's scheduler: a static shift of 1
        skw.update(shift=1.0, use_dynamic_shifting=False)
    sched = FlowMatchEulerDiscreteScheduler(**skw)
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tiny.train_clip_tokenizer(),
               text_encoder_2=text_encoder_2, tokenizer_2=tiny.train_tokenizer(), transformer=transformer)


def make_torch_hidream(seed: int = 0, scheduler: str = "flow_match"):
    """A tiny random diffusers HiDreamImagePipeline (xdit_jax.tiny's HiDream configs; ``default_sample_size``
    set to the tiny one); ``scheduler="unipc"``: HiDream-I1-Full's flow UniPC (shift 3) instead of FlowMatch Euler."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
        UniPCMultistepScheduler,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    transformer = randomize_(HiDreamImageTransformer2DModel(**tiny.HIDREAM_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    clip_cfg = lambda c: CLIPTextConfig(**{k: v for k, v in c.items() if k != "model_type"})  # noqa: E731
    clips = [randomize_(CLIPTextModelWithProjection(clip_cfg(c)), seed + 2 + i, std=0.2)
             for i, c in enumerate((tiny.HIDREAM_CLIP, tiny.HIDREAM_CLIP_G))]
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    t5 = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 4, std=0.2)
    llama_kw = {k: v for k, v in tiny.HUNYUAN_VIDEO_LLAMA.items() if k != "model_type"}
    llama = randomize_(LlamaForCausalLM(LlamaConfig(**llama_kw)), seed + 5, std=0.2)
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.HIDREAM_SCHEDULER.items()
                                                   if not k.startswith("_")})
    tp = HiDreamImagePipeline(scheduler=sched, vae=vae, text_encoder=clips[0], tokenizer=tiny.train_clip_tokenizer(),
                              text_encoder_2=clips[1], tokenizer_2=tiny.train_clip_tokenizer(), text_encoder_3=t5,
                              tokenizer_3=tiny.train_tokenizer(), text_encoder_4=llama,
                              tokenizer_4=tiny.train_llama_tokenizer(), transformer=transformer)
    tp.default_sample_size = tiny.HIDREAM_SAMPLE_SIZE
    return tp


def make_torch_flux_conditioned(kind: str, seed: int = 0, base=None):
    """A tiny random diffusers FluxFillPipeline (``kind="fill"``) or FluxControlPipeline (``"control"``): the tiny
    FLUX parts (make_torch_flux's, or those of the pipeline ``base``) with xdit_jax.tiny's Fill / Control transformer
    (more input channels)."""
    from diffusers import FluxControlPipeline, FluxFillPipeline, FluxTransformer2DModel

    base = base or make_torch_flux(seed)
    config = tiny.FLUX_FILL_TRANSFORMER if kind == "fill" else tiny.FLUX_CONTROL_TRANSFORMER
    torch.manual_seed(seed)
    transformer = randomize_(FluxTransformer2DModel(**config), seed, std=0.1)
    cls = FluxFillPipeline if kind == "fill" else FluxControlPipeline
    parts = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return cls(**{name: base.components[name] for name in parts}, transformer=transformer)


def make_torch_chroma(seed: int = 0):
    """A tiny random diffusers ChromaPipeline (xdit_jax.tiny's Chroma configs: FLUX's tiny VAE, T5 and scheduler)."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = randomize_(ChromaTransformer2DModel(**tiny.CHROMA_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 3, std=0.2)
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.FLUX_SCHEDULER.items() if not k.startswith("_")})
    return ChromaPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tiny.train_tokenizer(),
                          transformer=transformer)


def make_torch_sd3(seed: int = 0, with_t5: bool = True):
    """A tiny random diffusers Stable Diffusion 3 pipeline (xdit_jax.tiny's SD3 configs); ``with_t5=False``:
    without the T5 encoder (diffusers then uses zeros)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = randomize_(SD3Transformer2DModel(**tiny.SD3_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.SD3_VAE), seed + 1, std=0.1)
    clips = [randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in c.items() if k != "model_type"})),
                        seed + 2 + i, std=0.2) for i, c in enumerate((tiny.SD3_CLIP, tiny.SD3_CLIP_G))]
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    t5 = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 4, std=0.2) if with_t5 else None
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.SD3_SCHEDULER.items() if not k.startswith("_")})
    return StableDiffusion3Pipeline(scheduler=sched, vae=vae, text_encoder=clips[0], tokenizer=tiny.train_clip_tokenizer(),
                                    text_encoder_2=clips[1], tokenizer_2=tiny.train_clip_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=tiny.train_tokenizer() if with_t5 else None,
                                    transformer=transformer)


def make_torch_wan(seed: int = 0, scheduler: str = "unipc", variant: str = "2.1"):
    """A tiny random diffusers Wan pipeline (xdit_jax.tiny's Wan configs); ``scheduler`` "unipc" (the
    checkpoints') or "flow_match" (FlowMatchEulerDiscreteScheduler, shift 3). ``variant``: "2.1"; "a14b" (Wan 2.2's
    two experts: a second random transformer, boundary_ratio 0.875); "ti2v" (Wan 2.2 TI2V-5B's expand_timesteps and
    Wan 2.2 VAE); "i2v" (Wan 2.2 I2V-A14B's image-to-video: two experts taking 12 channels, no image encoder);
    "ti2v-image" (TI2V-5B's image-to-video pipeline); "i2v-2.1" (Wan 2.1 I2V: one transformer taking 12 channels and
    CLIP image states, a tiny CLIPVisionModel (3 layers) and CLIPImageProcessor at 28 x 28: 5 image tokens, as
    xdit_jax.tiny's); "flf2v" (Wan 2.1
    FLF2V: the same with the image embedder's position table over two images' states, the encoder saved
    WithProjection as diffusers' conversion script does)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = randomize_(WanTransformer3DModel(**tiny.WAN_TRANSFORMER), seed, std=0.1)
    vae22 = dict(tiny.WAN22_VAE, num_res_blocks=1)  # (its encoder's residual down blocks need a resnet)
    vae = randomize_(AutoencoderKLWan(**(vae22 if variant.startswith("ti2v") else tiny.WAN_VAE)), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.WAN_TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(UMT5EncoderModel(UMT5Config(**te_kw)), seed + 2, std=0.2)
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(**{k: v for k, v in tiny.WAN_SCHEDULER.items() if not k.startswith("_")})
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    extra = {}
    if variant == "ti2v-image":  # TI2V-5B's image-to-video: expand_timesteps, the Wan 2.2 VAE, one transformer
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=sched, expand_timesteps=True)
    if variant in ("i2v-2.1", "flf2v"):
        from diffusers import WanImageToVideoPipeline
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        kw = dict(tiny.WAN_I2V_TRANSFORMER, pos_embed_seq_len=10 if variant == "flf2v" else None)
        vcfg = CLIPVisionConfig(**dict(tiny.WAN_IMAGE_ENCODER, num_hidden_layers=3))
        encoder = (CLIPVisionModelWithProjection if variant == "flf2v" else CLIPVisionModel)(vcfg)
        processor = CLIPImageProcessor(**tiny.WAN_IMAGE_PROCESSOR)
        return WanImageToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                                       transformer=randomize_(WanTransformer3DModel(**kw), seed, std=0.1),
                                       scheduler=sched, image_encoder=randomize_(encoder, seed + 4, std=0.2),
                                       image_processor=processor)
    if variant == "i2v":  # Wan 2.2 I2V-A14B's layout: no image encoder, latents + 4 mask + image latents in
        kw = dict(tiny.WAN_TRANSFORMER, in_channels=12)
        transformer = randomize_(WanTransformer3DModel(**kw), seed, std=0.1)
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=sched, boundary_ratio=0.875,
                                       transformer_2=randomize_(WanTransformer3DModel(**kw), seed + 3, std=0.1))
    if variant == "a14b":
        extra = dict(transformer_2=randomize_(WanTransformer3DModel(**tiny.WAN_TRANSFORMER), seed + 3, std=0.1),
                     boundary_ratio=0.875)
    elif variant == "ti2v":
        extra = dict(expand_timesteps=True)
    return WanPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae,
                       transformer=transformer, scheduler=sched, **extra)


def make_torch_chronoedit(seed: int = 0):
    """A tiny random diffusers ChronoEditPipeline: Wan 2.1 I2V's tiny parts (:func:`make_torch_wan`'s "i2v-2.1": UMT5,
    VAE, UniPC, the CLIP tower and processor) with a ChronoEditTransformer3DModel of
    xdit_jax.tiny.CHRONOEDIT_TRANSFORMER."""
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel
    from diffusers.pipelines.chronoedit import pipeline_chronoedit
    from diffusers.pipelines.wan import pipeline_wan

    # (ChronoEdit's module calls ftfy unguarded, not installed here; Wan's T2V prompt_clean is the same with the guard)
    pipeline_chronoedit.prompt_clean = pipeline_wan.prompt_clean
    parts = make_torch_wan(seed, variant="i2v-2.1").components
    transformer = randomize_(ChronoEditTransformer3DModel(**tiny.CHRONOEDIT_TRANSFORMER), seed + 6, std=0.1)
    return ChronoEditPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                              image_encoder=parts["image_encoder"], image_processor=parts["image_processor"],
                              transformer=transformer, vae=parts["vae"], scheduler=parts["scheduler"])


def make_torch_wan_vace(seed: int = 0, two_experts: bool = False):
    """A tiny random diffusers WanVACEPipeline: Wan's tiny UMT5, VAE and UniPC (:func:`make_torch_wan`'s) with a
    WanVACETransformer3DModel of xdit_jax.tiny.WAN_VACE_TRANSFORMER; ``two_experts``: Wan 2.2's layout, a second
    random one as transformer_2 and boundary_ratio 0.875."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    parts = make_torch_wan(seed).components
    transformer = randomize_(WanVACETransformer3DModel(**tiny.WAN_VACE_TRANSFORMER), seed + 5, std=0.1)
    extra = {}
    if two_experts:
        extra = dict(transformer_2=randomize_(WanVACETransformer3DModel(**tiny.WAN_VACE_TRANSFORMER), seed + 6,
                                              std=0.1), boundary_ratio=0.875)
    return WanVACEPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                           transformer=transformer, scheduler=parts["scheduler"], **extra)


def make_torch_skyreels_v2(seed: int = 0, variant: str = "t2v"):
    """A tiny random diffusers SkyReels-V2 pipeline: Wan's tiny UMT5, VAE and UniPC (xdit_jax.tiny) with a
    SkyReelsV2Transformer3DModel of Wan's tiny width; ``variant`` "t2v" (SkyReelsV2Pipeline) or "df"
    (SkyReelsV2DiffusionForcingPipeline: the fps embedding, inject_sample_info, as the DF checkpoints) or "i2v"
    (SkyReelsV2ImageToVideoPipeline: Wan 2.1 I2V's tiny layout with a CLIP tower) or "df-i2v"
    (SkyReelsV2DiffusionForcingImageToVideoPipeline: the "df" transformer, the image through the VAE)."""
    from diffusers import (
        AutoencoderKLWan,
        SkyReelsV2DiffusionForcingPipeline,
        SkyReelsV2Pipeline,
        SkyReelsV2Transformer3DModel,
        UniPCMultistepScheduler,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw = dict(tiny.SKYREELS_V2_TRANSFORMER, inject_sample_info=variant.startswith("df"))
    transformer = randomize_(SkyReelsV2Transformer3DModel(**kw), seed, std=0.1)
    vae = randomize_(AutoencoderKLWan(**tiny.WAN_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.WAN_TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(UMT5EncoderModel(UMT5Config(**te_kw)), seed + 2, std=0.2)
    sched = UniPCMultistepScheduler(**{k: v for k, v in tiny.SKYREELS_V2_SCHEDULER.items()
                                       if not k.startswith("_")})
    import types

    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2, pipeline_skyreels_v2_diffusion_forcing

    for module in (pipeline_skyreels_v2, pipeline_skyreels_v2_diffusion_forcing):  # (they call ftfy unguarded; ours
        if not hasattr(module, "ftfy"):  # skips it where it is not installed, as Wan's: the same text then)
            module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    if variant == "i2v":  # Wan 2.1 I2V's layout: 12 channels in, CLIP image states (SkyReels' WithProjection tower,
        # its CLIPProcessor: a CLIP tokenizer beside the image preprocessing)
        from diffusers import SkyReelsV2ImageToVideoPipeline
        from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_i2v
        from transformers import CLIPImageProcessor, CLIPProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        if not hasattr(pipeline_skyreels_v2_i2v, "ftfy"):
            pipeline_skyreels_v2_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
        kw = dict(tiny.WAN_I2V_TRANSFORMER, inject_sample_info=False)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(tiny.WAN_IMAGE_ENCODER, num_hidden_layers=3)))
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(**tiny.WAN_IMAGE_PROCESSOR),
                                  tokenizer=tiny.train_clip_tokenizer())
        return SkyReelsV2ImageToVideoPipeline(
            tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=sched,
            transformer=randomize_(SkyReelsV2Transformer3DModel(**kw), seed, std=0.1),
            image_encoder=randomize_(encoder, seed + 4, std=0.2), image_processor=processor)
    if variant == "df-v2v":  # the DF checkpoints' transformer; the video only through the VAE
        from diffusers import SkyReelsV2DiffusionForcingVideoToVideoPipeline
        from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_v2v as df_v2v

        if not hasattr(df_v2v, "ftfy"):
            df_v2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
        return SkyReelsV2DiffusionForcingVideoToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder,
                                                              vae=vae, transformer=transformer, scheduler=sched)
    if variant == "df-i2v":  # the DF checkpoints' transformer; the image only through the VAE
        from diffusers import SkyReelsV2DiffusionForcingImageToVideoPipeline
        from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2_diffusion_forcing_i2v as df_i2v

        if not hasattr(df_i2v, "ftfy"):
            df_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
        return SkyReelsV2DiffusionForcingImageToVideoPipeline(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder,
                                                              vae=vae, transformer=transformer, scheduler=sched)
    cls = SkyReelsV2DiffusionForcingPipeline if variant == "df" else SkyReelsV2Pipeline
    return cls(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=sched)


def make_torch_hunyuan_video(seed: int = 0):
    """A tiny random diffusers HunyuanVideoPipeline (xdit_jax.tiny's HunyuanVideo configs: Llama with the stand-in
    Llama-3-like tokenizer, FLUX's tiny CLIP, the causal VAE, FlowMatchEuler with shift 7)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = randomize_(HunyuanVideoTransformer3DModel(**tiny.HUNYUAN_VIDEO_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLHunyuanVideo(**tiny.HUNYUAN_VIDEO_VAE), seed + 1, std=0.1)
    llama_kw = {k: v for k, v in tiny.HUNYUAN_VIDEO_LLAMA.items() if k != "model_type"}
    text_encoder = randomize_(LlamaModel(LlamaConfig(**llama_kw)), seed + 2, std=0.2)
    clip_kw = {k: v for k, v in tiny.FLUX_CLIP.items() if k != "model_type"}
    text_encoder_2 = randomize_(CLIPTextModel(CLIPTextConfig(**clip_kw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.HUNYUAN_VIDEO_SCHEDULER.items() if not k.startswith("_")}
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tiny.train_llama_tokenizer(),
                                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**skw),
                                text_encoder_2=text_encoder_2, tokenizer_2=tiny.train_clip_tokenizer())


def make_torch_qwenimage(seed: int = 0):
    """A tiny random diffusers QwenImagePipeline (xdit_jax.tiny's Qwen-Image configs: a Qwen2.5-VL with the stand-in
    Qwen2 tokenizer, the Wan 2.1-shaped VAE, FlowMatchEuler with the dynamic exponential shift and terminal 0.02)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = randomize_(QwenImageTransformer2DModel(**tiny.QWEN_IMAGE_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLQwenImage(**tiny.QWEN_IMAGE_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.QWEN_IMAGE_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.QWEN_IMAGE_SCHEDULER.items() if not k.startswith("_")}
    return QwenImagePipeline(text_encoder=text_encoder, tokenizer=tiny.train_qwen_tokenizer(), transformer=transformer,
                             vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**skw))


def qwen_processor(image_processor, tokenizer):
    """A transformers Qwen2VLProcessor without a video processor (transformers 5.23 checks the video processor's class
    through a table that needs torchvision, absent here: the check is skipped for ``video_processor=None`` only)."""
    from transformers import Qwen2VLProcessor

    check = Qwen2VLProcessor.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if (name == "video_processor" and arg is None) else check(self, name, arg)

    Qwen2VLProcessor.check_argument_for_proper_class = lenient
    try:
        proc = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
        proc.get_attributes = lambda: ["image_processor", "tokenizer"]  # save_pretrained: no video processor to save
        return proc
    finally:
        Qwen2VLProcessor.check_argument_for_proper_class = check


def make_torch_qwenimage_edit(seed: int = 0, plus: bool = False, zero_cond_t: bool = False):
    """A tiny random diffusers QwenImageEditPipeline (``plus``: QwenImageEditPlusPipeline; ``zero_cond_t``: the
    2511 transformer): Qwen-Image's tiny parts, the text encoder with xdit_jax.tiny's vision tower, the stand-in
    tokenizer with the vision tokens and a Qwen2VLProcessor (the PIL image processor) over it."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    transformer = randomize_(QwenImageTransformer2DModel(**tiny.QWEN_IMAGE_TRANSFORMER, zero_cond_t=zero_cond_t),
                             seed, std=0.1)
    vae = randomize_(AutoencoderKLQwenImage(**tiny.QWEN_IMAGE_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.QWEN_EDIT_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.QWEN_IMAGE_SCHEDULER.items() if not k.startswith("_")}
    tok = tiny.train_qwen_edit_tokenizer()
    processor = qwen_processor(Qwen2VLImageProcessorPil(**tiny.QWEN_EDIT_PROCESSOR), tok)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(text_encoder=text_encoder, tokenizer=tok, processor=processor, transformer=transformer, vae=vae,
               scheduler=FlowMatchEulerDiscreteScheduler(**skw))


def make_torch_longcat(seed: int = 0):
    """A tiny random diffusers LongCatImagePipeline (xdit_jax.tiny's LongCat transformer; Qwen-Image's tiny Qwen2.5-VL
    and stand-in tokenizer, a Qwen2VLProcessor over it; FLUX's tiny VAE and scheduler), its ``tokenizer_max_length``
    the tiny one."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        LongCatImagePipeline,
        LongCatImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    transformer = randomize_(LongCatImageTransformer2DModel(**tiny.LONGCAT_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.QWEN_IMAGE_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 2, std=0.2)
    tok = tiny.train_qwen_tokenizer()
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.FLUX_SCHEDULER.items() if not k.startswith("_")})
    tp = LongCatImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              text_processor=qwen_processor(Qwen2VLImageProcessorPil(**tiny.QWEN_EDIT_PROCESSOR), tok),
                              transformer=transformer)
    tp.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    return tp


def make_torch_longcat_edit(seed: int = 0):
    """A tiny random diffusers LongCatImageEditPipeline: make_torch_longcat's scheduler, its transformer and FLUX's tiny
    VAE on 16 latent channels (diffusers' edit packs the image's latents as 16 channels, whatever the VAE), with
    Qwen-Image-Edit's tiny text encoder (its vision tower), stand-in tokenizer (the vision tokens) and image processor
    settings."""
    from diffusers import AutoencoderKL, LongCatImageEditPipeline, LongCatImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = make_torch_longcat(seed)
    te_kw = {k: v for k, v in tiny.QWEN_EDIT_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 2, std=0.2)
    tok = tiny.train_qwen_edit_tokenizer()
    transformer = randomize_(LongCatImageTransformer2DModel(**dict(tiny.LONGCAT_TRANSFORMER, in_channels=64)), seed,
                             std=0.1)
    vae = randomize_(AutoencoderKL(**dict(tiny.FLUX_VAE, latent_channels=16)), seed + 1, std=0.1)
    tp = LongCatImageEditPipeline(scheduler=base.scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                  text_processor=qwen_processor(Qwen2VLImageProcessorPil(**tiny.QWEN_EDIT_PROCESSOR),
                                                                tok),
                                  transformer=transformer)
    tp.tokenizer_max_length = tiny.LONGCAT_TOKENIZER_MAX_LENGTH
    return tp


def make_torch_zimage(seed: int = 0):
    """A tiny random diffusers ZImagePipeline (xdit_jax.tiny's Z-Image configs: Qwen3 with the stand-in Qwen2
    tokenizer and its chat template, FLUX's tiny VAE with scaling and shift, FlowMatchEuler with shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = randomize_(ZImageTransformer2DModel(**tiny.ZIMAGE_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    text_encoder = randomize_(Qwen3Model(Qwen3Config(**tiny.ZIMAGE_QWEN3)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.ZIMAGE_SCHEDULER.items() if not k.startswith("_")}
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae, text_encoder=text_encoder,
                          tokenizer=tiny.train_qwen3_tokenizer(), transformer=transformer)


def make_torch_ovis_image(seed: int = 0):
    """A tiny random diffusers OvisImagePipeline (xdit_jax.tiny's Ovis-Image configs: Z-Image's tiny Qwen3 on the
    stand-in tokenizer that learned Ovis' system prompt, FLUX's tiny VAE and scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = randomize_(OvisImageTransformer2DModel(**tiny.OVIS_IMAGE_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    text_encoder = randomize_(Qwen3Model(Qwen3Config(**tiny.OVIS_IMAGE_QWEN3)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.FLUX_SCHEDULER.items() if not k.startswith("_")}
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae, text_encoder=text_encoder,
                             tokenizer=tiny.train_ovis_tokenizer(), transformer=transformer)


def make_torch_cogview4(seed: int = 0):
    """A tiny random diffusers CogView4Pipeline (xdit_jax.tiny's CogView4 configs: GlmModel on the stand-in tokenizer
    padding on the left, FLUX's tiny VAE, FlowMatchEuler with CogView4's dynamic linear time shift)."""
    from diffusers import AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(seed)
    transformer = randomize_(CogView4Transformer2DModel(**tiny.COGVIEW4_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    gkw = {k: v for k, v in tiny.COGVIEW4_GLM.items() if k != "model_type"}
    text_encoder = randomize_(GlmModel(GlmConfig(**gkw)), seed + 2, std=0.2).eval()
    skw = {k: v for k, v in tiny.COGVIEW4_SCHEDULER.items() if not k.startswith("_")}
    return CogView4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae, text_encoder=text_encoder,
                            tokenizer=tiny.train_glm_tokenizer(), transformer=transformer)


def make_torch_sana(seed: int = 0, **transformer):
    """A tiny random diffusers SanaPipeline (xdit_jax.tiny's SANA configs, ``transformer``: overrides of the
    transformer's; Gemma 2 with eager attention, its logit soft-capping)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = randomize_(SanaTransformer2DModel(**{**tiny.SANA_TRANSFORMER, **transformer}), seed, std=0.1)
    vae = randomize_(AutoencoderDC(**tiny.SANA_VAE), seed + 1, std=0.1)
    gcfg = Gemma2Config(**{k: v for k, v in tiny.SANA_GEMMA.items() if k != "model_type"})
    gcfg._attn_implementation = "eager"
    text_encoder = randomize_(Gemma2Model(gcfg), seed + 2, std=0.2)
    sched = DPMSolverMultistepScheduler(**{k: v for k, v in tiny.SANA_SCHEDULER.items() if not k.startswith("_")})
    return SanaPipeline(tokenizer=tiny.train_gemma_tokenizer(), text_encoder=text_encoder, vae=vae,
                        transformer=transformer, scheduler=sched)


def make_torch_sana_sprint(seed: int = 0):
    """A tiny random diffusers SanaSprintPipeline: SANA's tiny parts, the Sprint transformer (q/k norms, guidance
    embedding) and the SCM scheduler (xdit_jax.tiny's SANA_SPRINT_*)."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    sana = make_torch_sana(seed, **{k: v for k, v in tiny.SANA_SPRINT_TRANSFORMER.items()
                                    if k not in tiny.SANA_TRANSFORMER})
    sched = SCMScheduler(**{k: v for k, v in tiny.SANA_SPRINT_SCHEDULER.items() if not k.startswith("_")})
    return SanaSprintPipeline(tokenizer=sana.tokenizer, text_encoder=sana.text_encoder, vae=sana.vae,
                              transformer=sana.transformer, scheduler=sched)


def make_torch_sana_video(seed: int = 0):
    """A tiny random diffusers SanaVideoPipeline: xdit_jax.tiny's SANA-Video transformer, Wan's tiny VAE (its
    latents mean / std), SANA's tiny Gemma 2 (eager attention) and DPM-Solver++ (SANA_SCHEDULER)."""
    from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = randomize_(SanaVideoTransformer3DModel(**tiny.SANA_VIDEO_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLWan(**tiny.WAN_VAE), seed + 1, std=0.1)
    gcfg = Gemma2Config(**{k: v for k, v in tiny.SANA_GEMMA.items() if k != "model_type"})
    gcfg._attn_implementation = "eager"
    text_encoder = randomize_(Gemma2Model(gcfg), seed + 2, std=0.2)
    sched = DPMSolverMultistepScheduler(**{k: v for k, v in tiny.SANA_SCHEDULER.items() if not k.startswith("_")})
    return SanaVideoPipeline(tokenizer=tiny.train_gemma_tokenizer(), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=sched)


def make_torch_sana_video_i2v(seed: int = 0):
    """A tiny random diffusers SanaImageToVideoPipeline: :func:`make_torch_sana_video`'s parts with
    FlowMatchEulerDiscreteScheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaImageToVideoPipeline

    t2v = make_torch_sana_video(seed)
    return SanaImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                    transformer=t2v.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def make_torch_lumina2(seed: int = 0):
    """A tiny random diffusers Lumina2Pipeline (xdit_jax.tiny's Lumina 2 configs: SANA's tiny Gemma 2 with eager
    attention on the Gemma stand-in tokenizer, FLUX's tiny VAE with scaling and shift, FlowMatchEuler with dynamic
    shifting)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = randomize_(Lumina2Transformer2DModel(**tiny.LUMINA2_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 1, std=0.1)
    gcfg = Gemma2Config(**{k: v for k, v in tiny.LUMINA2_GEMMA.items() if k != "model_type"})
    gcfg._attn_implementation = "eager"
    text_encoder = randomize_(Gemma2Model(gcfg), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.LUMINA2_SCHEDULER.items() if not k.startswith("_")}
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae,
                           text_encoder=text_encoder, tokenizer=tiny.train_gemma_tokenizer())


def make_torch_flux2_klein(seed: int = 0, is_distilled: bool = False):
    """A tiny random diffusers Flux2KleinPipeline (xdit_jax.tiny's FLUX.2 configs: Qwen3ForCausalLM with the stand-in
    Qwen2 tokenizer and its chat template, AutoencoderKLFlux2 with random batch-norm statistics, FlowMatchEuler with
    dynamic shifting)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = randomize_(Flux2Transformer2DModel(**tiny.FLUX2_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLFlux2(**tiny.FLUX2_VAE), seed + 1, std=0.1)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():  # statistics that move the latents (BatchNorm's are 0 and 1 at init)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 2 + 0.2)
    text_encoder = randomize_(Qwen3ForCausalLM(Qwen3Config(**tiny.FLUX2_QWEN3)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.FLUX2_SCHEDULER.items() if not k.startswith("_")}
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae, text_encoder=text_encoder,
                              tokenizer=tiny.train_qwen3_tokenizer(), transformer=transformer,
                              is_distilled=is_distilled)


def make_torch_flux2_dev(seed: int = 0):
    """A tiny random diffusers Flux2Pipeline (FLUX.2-dev shaped: the guidance embedding; a 30-layer Mistral 3 language
    model with a 1-layer Pixtral tower, the stand-in Llama tokenizer with a Mistral-like chat template in place of the
    Pixtral processor, which needs torchvision)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    transformer = randomize_(Flux2Transformer2DModel(**tiny.FLUX2_DEV_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLFlux2(**tiny.FLUX2_VAE), seed + 1, std=0.1)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 2 + 0.2)
    cfg = {k: v for k, v in tiny.FLUX2_MISTRAL3.items() if k != "model_type"}
    text_encoder = randomize_(Mistral3ForConditionalGeneration(Mistral3Config(**cfg)), seed + 2, std=0.2)
    skw = {k: v for k, v in tiny.FLUX2_SCHEDULER.items() if not k.startswith("_")}
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**skw), vae=vae, text_encoder=text_encoder,
                         tokenizer=tiny.train_mistral3_tokenizer(), transformer=transformer)


# ----- the preambles of the parity tests: a torch reference, converted and loaded on our side -----

def torch_and_our_model(torch_cls, config: dict, module, config_cls):
    """(torch model, our config, our model): ``torch_cls(**config)`` with random weights (torch seed 0, weights
    seed 1, std 0.15), its config read by ``config_cls``, its state dict converted by ``module.params_from_torch``
    and built by ``module.build`` (a transformer test's ``pair`` fixture)."""
    torch.manual_seed(0)
    tm = randomize_(torch_cls(**config), seed=1, std=0.15)
    cfg = config_cls.from_dict(dict(tm.config))
    return tm, cfg, module.build(cfg, module.params_from_torch(state_dict_np(tm), cfg))


def assert_saved_folder_converts(tm, cfg, folder: Path, class_name: str, module, config_cls) -> None:
    """``tm`` saved with save_pretrained converts (``convert_component``) to ``cfg`` and, leaf by leaf, to the very
    params of ``module.params_from_torch``."""
    import jax
    import numpy as np

    from xdit_jax.conversion import convert_component

    tm.save_pretrained(folder / "transformer")
    cfg_dict, params = convert_component(folder / "transformer", class_name)
    assert config_cls.from_dict(cfg_dict) == cfg
    ref = jax.tree.leaves(module.params_from_torch(state_dict_np(tm), cfg))
    for a, b in zip(jax.tree.leaves(params), ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def torch_and_our_pipeline(make_torch, our_cls, tmp_path_factory, name: str):
    """(torch pipeline, our pipeline, our converted folder): ``make_torch()``'s tiny pipeline saved with
    save_pretrained, the diffusers folder converted, our ``our_cls`` loaded from it (a ``pipes`` fixture)."""
    from xdit_jax.pipelines.denoise import converted_folder

    tp = make_torch()
    folder = save_torch_pipeline(tp, tmp_path_factory.mktemp(name))
    converted = converted_folder(folder, cache_dir=tmp_path_factory.mktemp("cache"))  # diffusers folder, converted
    return tp, our_cls.from_pretrained(converted), converted


def gaussian_latents(shape: tuple, batch: int = 1, seed: int = 0):
    """Initial latents (batch, *shape) float32 from numpy's default_rng(seed), for both sides."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch,) + tuple(shape)).astype(np.float32)


def run_torch_pipeline(tp, prompt, latents, call: dict, **kw):
    """diffusers' pipeline ``tp`` from ``latents`` (numpy) with the test's ``call`` settings (``kw`` over them) ->
    its images (numpy), or its latents for ``output_type="latent"``. Lists go in as copies: a diffusers prompt
    encoder may write into the lists it is given (ZImagePipeline's _encode_prompt templates them in place)."""
    import numpy as np

    prompt = list(prompt) if isinstance(prompt, list) else prompt
    kw = dict(call, **{k: list(v) if isinstance(v, list) else v for k, v in kw.items()})
    with torch.no_grad():
        out = tp(prompt=prompt, latents=torch.from_numpy(latents), **kw).images
    return out.numpy() if kw.get("output_type") == "latent" else np.asarray(out)


def run_our_pipeline(pipe, prompt, latents, call: dict, **kw):
    """Our pipeline from ``latents`` with the test's ``call`` settings (``kw`` over them), no progress bar ->
    ``.images``."""
    return pipe(prompt, **dict(dict(call, latents=latents, progress=False), **kw)).images


def pipeline_runs(latent: tuple, call: dict):
    """A pipeline parity test's ``initial_latents(batch=1, seed=0)`` (of shape ``latent``), ``run_torch(tp,
    prompt, latents, **kw)`` and ``run_ours(pipe, prompt, latents, **kw)`` at its ``call`` settings (height, width,
    steps, ...)."""
    return (functools.partial(gaussian_latents, latent), functools.partial(run_torch_pipeline, call=call),
            functools.partial(run_our_pipeline, call=call))


def assert_close_latents(out, ref, what: str = "") -> None:
    """Latents after a few steps, both sides float32: within 1e-5 of their scale (max |ref|)."""
    import numpy as np

    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0, err_msg=f"{what} max |latent| {scale}".lstrip())


def make_torch_hunyuan_video15(seed: int = 0):
    """A tiny random diffusers HunyuanVideo15Pipeline (xdit_jax.tiny's HunyuanVideo-1.5 configs: the Qwen2.5-VL
    language model on the stand-in Qwen2 tokenizer with the chat template, ByT5 on the byte-level tokenizer, the
    DC-AE-style causal VAE, FlowMatchEuler with shift 5, ClassifierFreeGuidance at 6)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = randomize_(HunyuanVideo15Transformer3DModel(**tiny.HUNYUAN_VIDEO15_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLHunyuanVideo15(**tiny.HUNYUAN_VIDEO15_VAE), seed + 1, std=0.1)
    qkw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_QWEN.items() if k != "model_type"}
    text_encoder = randomize_(Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**qkw)), seed + 2, std=0.2)
    bkw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_BYT5.items() if k != "model_type"}
    text_encoder_2 = randomize_(T5EncoderModel(T5Config(**bkw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_SCHEDULER.items() if not k.startswith("_")}
    gkw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_GUIDER.items() if not k.startswith("_")}
    return HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tiny.train_hunyuan_video15_tokenizer(),
                                  transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**skw),
                                  text_encoder_2=text_encoder_2, tokenizer_2=tiny.byt5_tokenizer(),
                                  guider=ClassifierFreeGuidance(**gkw))


def make_torch_hunyuanimage(seed: int = 0):
    """A tiny random diffusers HunyuanImagePipeline (xdit_jax.tiny's HunyuanImage-2.1 configs; HunyuanVideo-1.5's tiny
    Qwen2.5-VL language model on its tokenizer and ByT5 on the byte-level tokenizer; FlowMatchEuler with shift 5; the
    guider and the OCR guider AdaptiveProjectedMixGuidance)."""
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = randomize_(HunyuanImageTransformer2DModel(**tiny.HUNYUANIMAGE_TRANSFORMER), seed, std=0.1)
    vae = randomize_(AutoencoderKLHunyuanImage(**tiny.HUNYUANIMAGE_VAE), seed + 1, std=0.1)
    qkw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_QWEN.items() if k != "model_type"}
    text_encoder = randomize_(Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**qkw)), seed + 2, std=0.2)
    bkw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_BYT5.items() if k != "model_type"}
    text_encoder_2 = randomize_(T5EncoderModel(T5Config(**bkw)), seed + 3, std=0.2)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    return HunyuanImagePipeline(text_encoder=text_encoder, tokenizer=tiny.train_hunyuan_video15_tokenizer(),
                                transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(**strip(tiny.HUNYUANIMAGE_SCHEDULER)),
                                text_encoder_2=text_encoder_2, tokenizer_2=tiny.byt5_tokenizer(),
                                guider=AdaptiveProjectedMixGuidance(**strip(tiny.HUNYUANIMAGE_GUIDER)),
                                ocr_guider=AdaptiveProjectedMixGuidance(**strip(tiny.HUNYUANIMAGE_OCR_GUIDER)))


def make_torch_hunyuan_video15_i2v(seed: int = 0, meanflow: bool = False):
    """The tiny HunyuanVideo15Pipeline's parts as diffusers' HunyuanVideo15ImageToVideoPipeline, with a tiny SigLIP
    vision tower (xdit_jax.tiny.HUNYUAN_VIDEO15_SIGLIP) and its image processor at 28 x 28; ``meanflow``: the
    transformer a ``use_meanflow`` one (a step-distilled model's layout)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Transformer3DModel
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    t2v = make_torch_hunyuan_video15(seed)
    if meanflow:
        t2v.transformer = randomize_(HunyuanVideo15Transformer3DModel(
            **dict(tiny.HUNYUAN_VIDEO15_TRANSFORMER, use_meanflow=True)), seed, std=0.1)
    skw = {k: v for k, v in tiny.HUNYUAN_VIDEO15_SIGLIP.items() if k != "model_type"}
    image_encoder = randomize_(SiglipVisionModel(SiglipVisionConfig(**skw)), seed + 4, std=0.2)
    size = tiny.HUNYUAN_VIDEO15_SIGLIP["image_size"]
    return HunyuanVideo15ImageToVideoPipeline(
        **{k: v for k, v in t2v.components.items()}, image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessor(size={"height": size, "width": size}))


@contextlib.contextmanager
def step_compiles_once(caplog):
    """Asserts that the pipeline run inside compiles its denoising step once: step 0 and the later steps share one
    executable (a carry entering placed otherwise than the step returns it, e.g. a scheduler state made off the mesh
    or latents coming back split over ring, costs a second compile of the whole step). Folded into the families'
    mesh tests (two steps are enough to see it) instead of a pipeline run of its own."""
    import logging

    import jax

    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        start = len(caplog.records)
        yield
        compiles = [r.getMessage()[:200] for r in caplog.records[start:] if "Compiling jit(step)" in r.getMessage()]
    assert len(compiles) == 1, compiles


def make_torch_kandinsky5(seed: int = 0):
    """A tiny random diffusers Kandinsky5T2VPipeline (xdit_jax.tiny's Kandinsky 5.0 configs: Qwen-Image's tiny
    Qwen2.5-VL with its stand-in Qwen2 tokenizer (as the pipeline's ``tokenizer``: it takes the processor's
    ``images=None, videos=None``), FLUX's tiny CLIP, HunyuanVideo's tiny VAE, FlowMatchEuler with shift 5)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = randomize_(Kandinsky5Transformer3DModel(**tiny.KANDINSKY5_TRANSFORMER), seed, std=0.15)
    vae = randomize_(AutoencoderKLHunyuanVideo(**tiny.HUNYUAN_VIDEO_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.QWEN_IMAGE_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 2, std=0.2)
    clip_kw = {k: v for k, v in tiny.FLUX_CLIP.items() if k != "model_type"}
    text_encoder_2 = randomize_(CLIPTextModel(CLIPTextConfig(**clip_kw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.KANDINSKY5_SCHEDULER.items() if not k.startswith("_")}
    return Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder,
                                 tokenizer=tiny.train_qwen_tokenizer(), text_encoder_2=text_encoder_2,
                                 tokenizer_2=tiny.train_clip_tokenizer(),
                                 scheduler=FlowMatchEulerDiscreteScheduler(**skw))


def make_torch_kandinsky5_i2v(seed: int = 0):
    """A tiny random diffusers Kandinsky5I2VPipeline: :func:`make_torch_kandinsky5`'s parts with its transformer made
    image-conditioned (``visual_cond``: 2 * 4 + 1 input channels, the release's layout)."""
    from diffusers import Kandinsky5I2VPipeline, Kandinsky5Transformer3DModel

    t2v = make_torch_kandinsky5(seed)
    torch.manual_seed(seed + 5)
    transformer = randomize_(Kandinsky5Transformer3DModel(**dict(tiny.KANDINSKY5_TRANSFORMER, visual_cond=True)),
                             seed + 5, std=0.15)
    return Kandinsky5I2VPipeline(transformer=transformer, vae=t2v.vae, text_encoder=t2v.text_encoder,
                                 tokenizer=t2v.tokenizer, text_encoder_2=t2v.text_encoder_2,
                                 tokenizer_2=t2v.tokenizer_2, scheduler=t2v.scheduler)


def make_torch_kandinsky5_i2i(seed: int = 0):
    """A tiny random diffusers Kandinsky5I2IPipeline: :func:`make_torch_kandinsky5_t2i`'s VAE and CLIP, an
    image-conditioned transformer (``visual_cond``), Qwen-Image-Edit's tiny Qwen2.5-VL (with its vision tower) and a
    Qwen2VLProcessor over its tokenizer as the pipeline's ``tokenizer`` (as the release)."""
    from diffusers import Kandinsky5I2IPipeline, Kandinsky5Transformer3DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    t2i = make_torch_kandinsky5_t2i(seed)
    torch.manual_seed(seed + 5)
    transformer = randomize_(Kandinsky5Transformer3DModel(**dict(tiny.KANDINSKY5_TRANSFORMER, visual_cond=True)),
                             seed + 5, std=0.15)
    te_kw = {k: v for k, v in tiny.QWEN_EDIT_TEXT_ENCODER.items() if k not in ("model_type", "architectures")}
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**te_kw)), seed + 6, std=0.2)
    processor = qwen_processor(Qwen2VLImageProcessorPil(**tiny.QWEN_EDIT_PROCESSOR), tiny.train_qwen_edit_tokenizer())
    return Kandinsky5I2IPipeline(transformer=transformer, vae=t2i.vae, text_encoder=text_encoder, tokenizer=processor,
                                 text_encoder_2=t2i.text_encoder_2, tokenizer_2=t2i.tokenizer_2,
                                 scheduler=t2i.scheduler)


def make_torch_kandinsky5_t2i(seed: int = 0):
    """A tiny random diffusers Kandinsky5T2IPipeline: :func:`make_torch_kandinsky5`'s transformer and text encoders with
    FLUX's tiny AutoencoderKL (4 latent channels here)."""
    from diffusers import AutoencoderKL, Kandinsky5T2IPipeline

    t2v = make_torch_kandinsky5(seed)
    vae = randomize_(AutoencoderKL(**tiny.FLUX_VAE), seed + 4, std=0.1)
    return Kandinsky5T2IPipeline(transformer=t2v.transformer, vae=vae, text_encoder=t2v.text_encoder,
                                 tokenizer=t2v.tokenizer, text_encoder_2=t2v.text_encoder_2,
                                 tokenizer_2=t2v.tokenizer_2, scheduler=t2v.scheduler)


class CosmosSafetyStandIn:
    """A stand-in for NVIDIA's cosmos_guardrail (not installed): passes every prompt and video, as diffusers' tests
    run the Cosmos pipelines (``DummyCosmosSafetyChecker``)."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def cosmos_torchvision_stand_in() -> None:
    """diffusers' CosmosTransformer3DModel resizes the padding mask with torchvision (not installed here): the same
    nearest-neighbour resize with torch's interpolate."""
    from diffusers.models.transformers import transformer_cosmos

    class _Functional:
        @staticmethod
        def resize(x, size, interpolation=None):
            return torch.nn.functional.interpolate(x, size=list(size), mode="nearest")

    class _Transforms:
        functional = _Functional
        InterpolationMode = type("InterpolationMode", (), {"NEAREST": "nearest"})

    transformer_cosmos.transforms = _Transforms


def make_torch_cosmos(seed: int = 0, v2w: bool = False):
    """A tiny random diffusers Cosmos2TextToImagePipeline (``v2w``: Cosmos2VideoToWorldPipeline) from
    xdit_jax.tiny's Cosmos configs: T5 32 wide, Wan's tiny VAE, Karras FlowMatchEuler; the safety checker a
    stand-in (:class:`CosmosSafetyStandIn`)."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2TextToImagePipeline,
        Cosmos2VideoToWorldPipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    cosmos_torchvision_stand_in()
    torch.manual_seed(seed)
    kw = tiny.COSMOS_V2W_TRANSFORMER if v2w else tiny.COSMOS_TRANSFORMER
    transformer = randomize_(CosmosTransformer3DModel(**kw), seed, std=0.1)
    vae = randomize_(AutoencoderKLWan(**tiny.WAN_VAE), seed + 1, std=0.1)
    te_kw = {k: v for k, v in tiny.TEXT_ENCODER.items() if k not in ("is_encoder_decoder", "model_type")}
    text_encoder = randomize_(T5EncoderModel(T5Config(**te_kw)), seed + 2, std=0.2)
    sched = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in tiny.COSMOS_SCHEDULER.items()
                                               if not k.startswith("_") and not k.startswith("sigma")
                                               and k != "final_sigmas_type"})
    cls = Cosmos2VideoToWorldPipeline if v2w else Cosmos2TextToImagePipeline
    return cls(tokenizer=tiny.train_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=sched, safety_checker=CosmosSafetyStandIn())


def save_torch_cosmos(tp, folder: Path) -> Path:
    """save_pretrained without the safety checker (model_index.json: ``safety_checker`` [null, null])."""
    checker = tp.safety_checker
    tp.register_modules(safety_checker=None)
    try:
        tp.save_pretrained(folder, safe_serialization=True)
    finally:
        tp.register_modules(safety_checker=checker)
    return folder


def make_torch_cogview4_control(seed: int = 0):
    """A tiny random diffusers CogView4ControlPipeline: :func:`make_torch_cogview4`'s parts with a transformer taking
    twice the latents' channels (the control image's latents concatenated)."""
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    base = make_torch_cogview4(seed)
    torch.manual_seed(seed)
    config = dict(tiny.COGVIEW4_TRANSFORMER, in_channels=2 * tiny.COGVIEW4_TRANSFORMER["out_channels"])
    transformer = randomize_(CogView4Transformer2DModel(**config), seed, std=0.1)
    parts = ("scheduler", "vae", "text_encoder", "tokenizer")
    return CogView4ControlPipeline(**{name: base.components[name] for name in parts}, transformer=transformer)


def make_torch_hunyuan_video_i2v(seed: int = 0, condition: str = "latent_concat"):
    """A tiny random diffusers HunyuanVideoImageToVideoPipeline (``condition``: the transformer's
    image_condition_type; xdit_jax.tiny's HunyuanVideo I2V configs: LLaVA = a CLIP vision tower + HunyuanVideo's tiny
    Llama, the CLIP image processor at 32 x 32)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tkw = tiny.HUNYUAN_VIDEO_I2V_TRANSFORMER if condition == "latent_concat" else dict(
        tiny.HUNYUAN_VIDEO_TRANSFORMER, image_condition_type=condition)
    transformer = randomize_(HunyuanVideoTransformer3DModel(**tkw), seed, std=0.1)
    vae = randomize_(AutoencoderKLHunyuanVideo(**tiny.HUNYUAN_VIDEO_VAE), seed + 1, std=0.1)
    text_encoder, processor = make_torch_llava(seed + 2)
    clip_kw = {k: v for k, v in tiny.FLUX_CLIP.items() if k != "model_type"}
    text_encoder_2 = randomize_(CLIPTextModel(CLIPTextConfig(**clip_kw)), seed + 3, std=0.2)
    skw = {k: v for k, v in tiny.HUNYUAN_VIDEO_SCHEDULER.items() if not k.startswith("_")}
    return HunyuanVideoImageToVideoPipeline(text_encoder=text_encoder, tokenizer=tiny.train_llava_tokenizer(),
                                            transformer=transformer, vae=vae,
                                            scheduler=FlowMatchEulerDiscreteScheduler(**skw),
                                            text_encoder_2=text_encoder_2, tokenizer_2=tiny.train_clip_tokenizer(),
                                            image_processor=processor)


def make_torch_llava(seed: int = 0):
    """(A tiny random transformers LlavaForConditionalGeneration: a CLIP vision tower + HunyuanVideo's tiny Llama, its
    CLIPImageProcessor at 32 x 32) — HunyuanVideo image-to-video's text encoder."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    llama_kw = {k: v for k, v in tiny.HUNYUAN_VIDEO_LLAMA.items() if k != "model_type"}
    llama_kw["vocab_size"] = tiny.LLAMA_VOCAB + 1
    vision_kw = {k: v for k, v in tiny.HUNYUAN_VIDEO_LLAVA_VISION.items() if k != "model_type"}
    torch.manual_seed(seed)
    model = randomize_(LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kw), text_config=LlamaConfig(**llama_kw), **tiny.HUNYUAN_VIDEO_LLAVA)),
        seed, std=0.2)
    size = tiny.HUNYUAN_VIDEO_LLAVA_VISION["image_size"]
    return model, CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
