"""Tiny randomly initialised models made on the spot: no download, no torch.

``generate.py --model tiny`` (a CogVideoX; the README's first command) and ``--model tiny-pixart``
(a PixArt-Sigma) use them to show the whole flow on a laptop; the tests build the same configs
through diffusers to compare against. The tokenizer is
a small Unigram model trained here with the ``tokenizers`` library and wrapped as a T5 tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

TINY_NAME = "tiny"
TINY_NAMES = {"tiny": "cogvideox", "tiny-pixart": "pixart", "tiny-hunyuandit": "hunyuandit", "tiny-mochi": "mochi",
              "tiny-flux": "flux", "tiny-sd3": "sd3", "tiny-wan": "wan",
              "tiny-latte": "latte", "tiny-hunyuanvideo": "hunyuanvideo", "tiny-flux-kontext": "flux-kontext",
              "tiny-qwenimage": "qwenimage", "tiny-qwenimage-edit": "qwenimage-edit",
              "tiny-qwenimage-edit-plus": "qwenimage-edit-plus", "tiny-zimage": "zimage",
              "tiny-sana": "sana", "tiny-sana-sprint": "sana-sprint", "tiny-chroma": "chroma", "tiny-lumina2": "lumina2",
              "tiny-flux2-klein": "flux2", "tiny-skyreels-v2": "skyreels_v2", "tiny-ltx": "ltx",
              "tiny-consisid": "consisid", "tiny-hunyuanvideo15": "hunyuan_video15",
              "tiny-cogview3": "cogview3", "tiny-hunyuanimage": "hunyuanimage", "tiny-cogview4": "cogview4",
              "tiny-kandinsky5": "kandinsky5", "tiny-sana-video": "sana-video", "tiny-hidream": "hidream"}
TINY_NAMES.update({"tiny-cosmos": "cosmos", "tiny-cosmos-v2w": "cosmos-v2w"})
TINY_NAMES.update({"tiny-flux-fill": "flux-fill", "tiny-flux-control": "flux-control"})  # (FLUX.1 Fill / Canny, Depth)
FLUX_KINDS = {"flux": "FluxPipeline", "flux-kontext": "FluxKontextPipeline", "flux-fill": "FluxFillPipeline",
              "flux-control": "FluxControlPipeline"}  # tiny FLUX.1 folders: the same parts, these classes
TINY_NAMES["tiny-longcat"] = "longcat"

CORPUS = [
    "A small dog running on a beach at sunset.",
    "A panda playing guitar in a bamboo forest, cinematic lighting.",
    "Waves crash against black rocks under a grey sky.",
    "A red car drives through a neon city at night in the rain.",
    "Time lapse of clouds moving over snowy mountains.",
    "A cat sleeping on a sofa next to a window.",
]

TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
                   text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
                   patch_size=2, max_text_seq_length=16, temporal_compression_ratio=4)
# ConsisID (CogVideoX-5B-I2V's transformer + the face branch) at tiny size: 3 heads x 16 (the face cross-attention takes
# 2/3 of the width, 32, as LFE_output_dim); 4 blocks with a cross-attention after blocks 0 and 2; the extractor's 2
# scales of 2 layers each.
CONSISID_TRANSFORMER = dict(TRANSFORMER, num_attention_heads=3, in_channels=8, num_layers=4,
                            use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
                            is_train_face=True, cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2,
                            LFE_id_dim=12, LFE_vit_dim=16, LFE_depth=4, LFE_dim_head=8, LFE_num_heads=2,
                            LFE_num_id_token=3, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=2, LFE_num_scale=2)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
           down_block_types=["CogVideoXDownBlock3D"] * 4, up_block_types=["CogVideoXUpBlock3D"] * 4,
           layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=64,
           sample_width=96, scaling_factor=1.15258426)
TEXT_ENCODER = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, feed_forward_proj="gated-gelu", vocab_size=128,
                    layer_norm_epsilon=1e-6, is_encoder_decoder=False, model_type="t5")
SCHEDULER = dict(_class_name="CogVideoXDDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                 beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                 steps_offset=0, prediction_type="v_prediction", timestep_spacing="trailing",
                 rescale_betas_zero_snr=True, snr_shift_scale=3.0)
MAX_SEQUENCE_LENGTH = TRANSFORMER["max_text_seq_length"]

# PixArt-Sigma shaped (no micro-conditions, learned sigma), 64 x 64 images: 8 x 8 latents, 16 tokens.
PIXART_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=32,
                          norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                          attention_bias=True, num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
                          use_additional_conditions=False)
PIXART_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
PIXART_SCHEDULER = dict(_class_name="DPMSolverMultistepScheduler", num_train_timesteps=1000, beta_start=0.0001,
                        beta_end=0.02, beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++",
                        solver_type="midpoint", prediction_type="epsilon", lower_order_final=True,
                        thresholding=False, steps_offset=0, use_karras_sigmas=False)
PIXART_MAX_SEQUENCE_LENGTH = 16

# CogView3-Plus shaped: 2 blocks of 2 heads x 16, 4 latent channels (the release: 16), size conditions of 8 sinusoids
# per number; sample size 8: 64 x 64 images by default (8 x 8 latents, 16 image tokens), a position table of 8 x 8
# patches (images up to 128 x 128); the SD VAE of the tiny PixArt with use_quant_conv off as the release's, its
# the tiny CogVideoX's DDIM.
COGVIEW3_TRANSFORMER = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8,
                            pos_embed_max_size=8, sample_size=8)
COGVIEW3_VAE = dict(PIXART_VAE, scaling_factor=0.7, use_quant_conv=False, use_post_quant_conv=False)
COGVIEW3_SCHEDULER = SCHEDULER
COGVIEW3_MAX_SEQUENCE_LENGTH = 16

# Latte-1 shaped (learned sigma, non-affine norms), 2 layer pairs over 2 heads of 8; sample size 4: 32 x 32 videos
# by default (4 x 4 latents, 4 patch positions a frame); the SD VAE of the tiny PixArt; Latte-1's DDIM.
LATTE_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                         cross_attention_dim=16, attention_bias=True, sample_size=4, patch_size=2,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                         norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32, video_length=16)
LATTE_VAE = dict(PIXART_VAE, scaling_factor=0.18215)
LATTE_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                       beta_schedule="linear", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                       prediction_type="epsilon", timestep_spacing="leading")

# HunyuanDiT v1.2 shaped (no style / size conditions), 6 layers (layers 0-1 feed long skips to layers 4-5),
# the released text lengths (77 BERT + 256 mT5 tokens), 64 x 64 images.
HUNYUAN_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                           activation_fn="gelu-approximate", sample_size=8, hidden_size=16, num_layers=6,
                           mlp_ratio=4.0, learn_sigma=True, cross_attention_dim=32, norm_type="layer_norm",
                           cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=77, text_len_t5=256,
                           use_style_cond_and_image_meta_size=False)
HUNYUAN_BERT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    hidden_act="gelu", max_position_embeddings=80, type_vocab_size=2, layer_norm_eps=1e-12,
                    model_type="bert")
HUNYUAN_SCHEDULER = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                         steps_offset=1, variance_type="fixed_small", timestep_spacing="leading")

# Mochi 1 shaped: a caption stream narrower than the video stream (16 vs 32), 2 blocks (1 stacked + the
# last), 12 latent channels; the VAE with Mochi's 6x temporal / 8x spatial expansion and 32-channel
# GroupNorms (Mochi's norms have 32 groups), one resnet per level. 7 frames of 32 x 48: 2 x 4 x 6 latents.
MOCHI_TRANSFORMER = dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                         pooled_projection_dim=16, in_channels=12, text_embed_dim=32, time_embed_dim=16,
                         max_sequence_length=16)
MOCHI_VAE = dict(in_channels=15, out_channels=3, encoder_block_out_channels=[32, 32, 32, 32],
                 decoder_block_out_channels=[32, 32, 32, 32], latent_channels=12, layers_per_block=[1, 1, 1, 1, 1],
                 temporal_expansions=[1, 2, 3], spatial_expansions=[2, 2, 2],
                 add_attention_block=[False, True, True, True, True], scaling_factor=1.0)
MOCHI_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                       use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096, invert_sigmas=True)

# LTX-Video shaped: 2 blocks of 2 heads x 8 (16 wide: RoPE's dim % 6 padding in use), 8 latent channels, the
# tiny T5 (32 wide); the VAE with 0.9.5's decoder (timestep-conditioned, residual upsamplers, upscale factor 2:
# 32x spatial, 8x temporal) and 0.9.0's encoder (for image-to-video). 9 frames of 64 x 96: 2 x 2 x 3 latents.
LTX_TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                       cross_attention_dim=16, num_layers=2, caption_channels=32)
LTX_VAE = dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[8, 8, 8, 8],
               layers_per_block=[1, 1, 1, 1, 1], spatio_temporal_scaling=[True, True, True, False],
               decoder_block_out_channels=[8, 16, 32], decoder_layers_per_block=[1, 1, 1, 1],
               decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[False] * 4,
               upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=True,
               spatial_compression_ratio=32, temporal_compression_ratio=8)
# LTX-Video's scheduler config (dynamic shifting from the video tokens, shift_terminal 0.1)
LTX_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                     use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                     max_image_seq_len=4096, shift_terminal=0.1)
# LTX-Video 0.9.5+'s for LTXConditionPipeline (its set_timesteps gets no mu: no dynamic shifting)
LTX_CONDITION_SCHEDULER = dict(LTX_SCHEDULER, use_dynamic_shifting=False)

# FLUX.1-dev shaped (guidance-distilled): 2 double- and 2 single-stream blocks, RoPE axes (4, 6, 6) over
# 16-wide heads; the VAE with FLUX's shift and scale and no quant convs (4 latent channels: 16 packed);
# CLIP (pooled, 32 wide) and the tiny T5 (32 wide, 16 tokens for the tiny model).
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                        axes_dims_rope=[4, 6, 6])
FLUX_VAE = dict(PIXART_VAE, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
FLUX_CLIP = dict(vocab_size=600, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=598, eos_token_id=2, pad_token_id=1, model_type="clip_text_model")
FLUX_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
# FLUX.1 Fill / Control (Canny, Depth) shaped: the tiny FLUX transformer over 16 packed latent channels in and out,
# taking more in: Fill the masked image's 16 and the mask folded 8 x 8 (the tiny VAE's factor) and packed, 256
# (FLUX.1-Fill-dev: 64 + 64 + 256 = 384); Control the control image's 16 (FLUX.1-Canny/Depth-dev: 64 + 64 = 128).
FLUX_FILL_TRANSFORMER = dict(FLUX_TRANSFORMER, in_channels=16 + 16 + 256, out_channels=16)
FLUX_CONTROL_TRANSFORMER = dict(FLUX_TRANSFORMER, in_channels=32, out_channels=16)

# Chroma shaped: FLUX's tiny transformer without the pooled CLIP / guidance (2 double- and 2 single-stream blocks,
# 2 heads of 16), a 2-layer approximator 32 wide over 16 input channels; FLUX's tiny VAE and T5 (the tiny T5's
# 16 tokens), the FLUX scheduler (dynamic shifting, as Chroma1-HD's).
CHROMA_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
                          approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)

# LongCat-Image shaped: FLUX's tiny transformer without the pooled CLIP / guidance (2 double- and 2 single-stream
# blocks, 2 heads of 16) on Qwen-Image's tiny Qwen2.5-VL (32 wide) and stand-in tokenizer; FLUX's tiny VAE and
# scheduler. The text: LONGCAT_TOKENIZER_MAX_LENGTH tokens (the pipelines' ``tokenizer_max_length``; 512 real).
LONGCAT_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=[4, 6, 6])
LONGCAT_TOKENIZER_MAX_LENGTH = 16

# Stable Diffusion 3 shaped: 2 joint blocks (the last context_pre_only) over 2 heads of 16, the pos-embed table
# cropped from a 16 x 16 grid; CLIP-L 8 and CLIP-G 16 wide (their penultimate states concatenated: 24, zero-padded
# to the tiny T5's 32, as 768 + 1280 to 4096; pooled projections 16 + 16 = 32); the VAE with SD3's scale and
# shift, no quant convs.
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                       pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
SD3_VAE = dict(PIXART_VAE, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
SD3_CLIP = dict(vocab_size=600, hidden_size=8, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=598, eos_token_id=2, pad_token_id=1, model_type="clip_text_model")
SD3_CLIP_G = dict(SD3_CLIP, hidden_size=16, hidden_act="gelu", eos_token_id=599)
SD3_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0)

# Wan 2.1 shaped: 2 blocks over 2 heads of 12 (RoPE 4 + 4 + 4 of the head dim), an FFN not a multiple of the width,
# the tiny UMT5 (T5 with a bias table per block) 32 wide; the causal VAE with Wan's 4x temporal / 8x spatial
# expansion (both temporal upsamplings), 4 latent channels. 9 frames of 32 x 48: 3 x 4 x 6 latents.
WAN_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=4,
                       out_channels=4, text_dim=32, freq_dim=32, ffn_dim=40, num_layers=2, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0, latents_mean=[0.1, -0.2, 0.3, 0.0],
               latents_std=[1.5, 0.8, 1.2, 2.0])
# Wan 2.2's VAE (TI2V-5B's, residual up blocks, patch_size 2), small: 3 up blocks, one temporal; 8x / 2x in all.
WAN22_VAE = dict(WAN_VAE, decoder_base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=0, temperal_downsample=[False, True],
                 is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=8,
                 scale_factor_temporal=2)
WAN_TEXT_ENCODER = dict(TEXT_ENCODER, model_type="umt5")
WAN_SCHEDULER = dict(_class_name="UniPCMultistepScheduler", num_train_timesteps=1000, beta_start=0.0001,
                     beta_end=0.02, beta_schedule="linear", solver_order=2, prediction_type="flow_prediction",
                     predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
                     final_sigmas_type="zero", use_flow_sigmas=True, flow_shift=3.0, timestep_spacing="linspace",
                     steps_offset=0, thresholding=False)
# SkyReels-V2: Wan's tiny transformer as a SkyReelsV2Transformer3DModel (the DF checkpoints add inject_sample_info),
# Wan's UniPC at SkyReels-V2 T2V's flow_shift 8.
SKYREELS_V2_TRANSFORMER = dict(WAN_TRANSFORMER, inject_sample_info=False, num_frame_per_block=1)
SKYREELS_V2_SCHEDULER = dict(WAN_SCHEDULER, flow_shift=8.0)

# HunyuanVideo shaped: 2 double- and 2 single-stream blocks and 1 token refiner block over 2 heads of 8 (RoPE axes
# 2 + 2 + 4), the guidance embedded; 4 latent channels; the causal VAE (8x spatial, 4x temporal) 8/8/16/16 wide;
# a 3-layer Llama 32 wide with GQA (hidden_states[-3]: the first layer's output) and FLUX's tiny CLIP (pooled, 32
# wide). 5 frames of 32 x 32: 2 x 4 x 4 latents, 8 video tokens; the text 256 Llama tokens (after the template).
HUNYUAN_VIDEO_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                 num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2,
                                 patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32,
                                 pooled_projection_dim=32, rope_theta=256.0, rope_axes_dim=[2, 2, 4])
HUNYUAN_VIDEO_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["HunyuanVideoDownBlock3D"] * 4, up_block_types=["HunyuanVideoUpBlock3D"] * 4,
                         block_out_channels=[8, 8, 16, 16], layers_per_block=1, act_fn="silu", norm_num_groups=4,
                         scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
                         mid_block_add_attention=True)
# The stand-in Llama tokenizer's vocabulary: 275 tokens puts the prompt's first token at position 95 of the templated
# text, where diffusers' default template crops (crop_start 95, the count of the real Llama 3 tokenizer).
LLAMA_VOCAB = 275
HUNYUAN_VIDEO_LLAMA = dict(vocab_size=LLAMA_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                           rope_theta=500000.0, bos_token_id=0, eos_token_id=1, pad_token_id=5, model_type="llama")
HUNYUAN_VIDEO_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=7.0)

# Kandinsky 5.0 T2V shaped: 2 text and 2 visual blocks over 2 heads of 16 (RoPE axes 4 + 6 + 6), patch (1, 2, 2); the
# text Qwen-Image's tiny Qwen2.5-VL (32 wide, its stand-in tokenizer: Kandinsky's template makes 374 tokens, 128 cut as
# diffusers cuts them), FLUX's tiny CLIP (pooled, 32 wide), HunyuanVideo's tiny causal VAE, FlowMatchEuler with shift 5
# (the Lite checkpoints'). 5 frames of 32 x 32: 2 x 4 x 4 latents, 2 x 2 x 2 = 8 visual tokens.
KANDINSKY5_TRANSFORMER = dict(in_visual_dim=4, in_text_dim=32, in_text_dim2=32, time_dim=16, out_visual_dim=4,
                              patch_size=[1, 2, 2], model_dim=32, ff_dim=48, num_text_blocks=2, num_visual_blocks=2,
                              axes_dims=[4, 6, 6], visual_cond=False, attention_type="regular")
KANDINSKY5_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=5.0)

# HunyuanVideo-1.5 shaped: 2 double-stream blocks and 2 token refiner blocks over 2 heads of 8 (RoPE axes 2 + 2 + 4),
# patch 1; the transformer takes the 4 latent channels, 4 zero condition channels and the mask channel (9); the VAE
# (8x spatial, 4x temporal: 3 up blocks of DC-AE depth-to-space, 2 of them in time) 32/16/16/8 wide; a 3-layer
# Qwen2.5-VL language model 32 wide with GQA (hidden_states[-3]: the first layer's output) and a 2-layer ByT5
# (T5 v1.1, gated GELU) 16 wide on the byte-level ByT5Tokenizer (384 ids); the guider's scale 6.0 (the releases',
# from memory). 5 frames of 32 x 48: 2 x 4 x 6 latents, 48 video tokens; the text 1000 Qwen tokens
# (after the 108-token crop) and 256 ByT5 tokens, as diffusers' defaults.
HUNYUAN_VIDEO15_TRANSFORMER = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                                   qk_norm="rms_norm", text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=8,
                                   rope_theta=256.0, rope_axes_dim=[2, 2, 4], target_size=64, task_type="t2v",
                                   use_meanflow=False)
HUNYUAN_VIDEO15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16, 32],
                           layers_per_block=1, spatial_compression_ratio=8, temporal_compression_ratio=4,
                           downsample_match_channel=True, upsample_match_channel=True, scaling_factor=1.03682)
HUNYUAN_VIDEO15_QWEN = dict(model_type="qwen2_5_vl_text", vocab_size=512, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                            max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                             "rope_theta": 1000000.0})
HUNYUAN_VIDEO15_BYT5 = dict(model_type="t5", vocab_size=384, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                            pad_token_id=0, eos_token_id=1)
HUNYUAN_VIDEO15_MAX_SEQUENCE_LENGTH = 64  # the tiny model's Qwen tokens in the CLI (the real default: 1000)
HUNYUAN_VIDEO15_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=5.0)
# HunyuanImage-2.1 shaped: 2 double-stream and 2 single-stream blocks, 1 token refiner block over 2 heads of 8 (RoPE
# axes 4 + 4), patch 1 x 1, on 8 latent channels; the text encoders HunyuanVideo-1.5's tiny Qwen2.5-VL (32 wide) and
# ByT5 (16 wide).
HUNYUANIMAGE_TRANSFORMER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0,
                                patch_size=[1, 1], qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=32,
                                text_embed_2_dim=16, rope_theta=256.0, rope_axes_dim=[4, 4], use_meanflow=False)
# its VAE: 8x in space (not the release's 32x: 3 upsamplers, not 5), 64/32/32/32 wide (the GroupNorms' 32 groups),
# 8 latent channels
HUNYUANIMAGE_VAE = dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[32, 32, 32, 64],
                        layers_per_block=1, spatial_compression_ratio=8, sample_size=64, scaling_factor=0.75289,
                        downsample_match_channel=True, upsample_match_channel=True)
# its guiders (diffusers' AdaptiveProjectedMixGuidance): APG from the second step on
# (adaptive_projected_guidance_start_step 0; the class's default 5 would leave a 2-step test on CFG), the rest the
# class's defaults; the OCR guider (prompts
# with quoted text) another scale and momentum. The scheduler's shift: 5.0 (from memory, not checked against the
# release).
HUNYUANIMAGE_GUIDER = dict(_class_name="AdaptiveProjectedMixGuidance", guidance_scale=3.5,
                           adaptive_projected_guidance_start_step=0)
HUNYUANIMAGE_OCR_GUIDER = dict(_class_name="AdaptiveProjectedMixGuidance", guidance_scale=4.5,
                               adaptive_projected_guidance_momentum=-0.3, adaptive_projected_guidance_start_step=0)
HUNYUANIMAGE_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=5.0)
# HunyuanVideo-1.5 image-to-video's SigLIP vision tower at tiny size: 2 layers 8 wide (the transformer's
# image_embed_dim) at 28 x 28, patch 14: 4 image states
HUNYUAN_VIDEO15_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=8, intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
HUNYUAN_VIDEO15_GUIDER = dict(_class_name="ClassifierFreeGuidance", guidance_scale=6.0)
# Qwen2.5-VL's chat template for text messages (a string content: the system turn, the user turn, the generation
# prompt), which diffusers' HunyuanVideo-1.5 pipeline renders through tokenizer.apply_chat_template
QWEN25VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Qwen-Image shaped: 2 double-stream blocks over 2 heads of 16 (RoPE axes 4 + 6 + 6), packed latents of 4 x 4
# channels; the Wan 2.1 VAE at tiny width (8x spatial); a 2-layer Qwen2.5-VL language model 32 wide with GQA and
# q/k/v biases (its vision tower tiny, never read); Qwen-Image's scheduler (dynamic exponential shift, terminal
# 0.02). 48 x 80: 6 x 10 latents, 3 x 5 = 15 image tokens.
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
                              axes_dims_rope=[4, 6, 6])
QWEN_IMAGE_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0, input_channels=3,
                      latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
# The stand-in Qwen2 tokenizer's vocabulary (trained on the corpus and the template: 498 tokens, the template's
# system part 34 tokens as with the real tokenizer)
QWEN_VOCAB = 512
QWEN_IMAGE_TEXT_ENCODER = dict(
    model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
    text_config=dict(model_type="qwen2_5_vl_text", vocab_size=QWEN_VOCAB, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0}),
    vision_config=dict(model_type="qwen2_5_vl_vision", depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                       out_hidden_size=32, patch_size=2, window_size=4, fullatt_block_indexes=[0]))
# Qwen-Image-Edit: the Qwen-Image text encoder with a vision tower of 2 blocks (block 1 full attention, block 0 in
# windows of 2 x 2 merge units: window_size 8 / patch 2 / merge 2), 16 wide, merged to the language model's 32; the
# stand-in tokenizer with the vision tokens at ids 3, 4, 5 (<|image_pad|> 4); the image processor at patch 2 x merge
# 2 (multiples of 4 pixels) and at most 32 x 32 pixels (64 image tokens)
QWEN_EDIT_TEXT_ENCODER = dict(
    QWEN_IMAGE_TEXT_ENCODER, vision_start_token_id=3, image_token_id=4, vision_end_token_id=5, video_token_id=6,
    vision_config=dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                       out_hidden_size=32, patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                       fullatt_block_indexes=[1]))
QWEN_EDIT_PROCESSOR = dict(min_pixels=8 * 8, max_pixels=32 * 32, patch_size=2, temporal_patch_size=2, merge_size=2)
QWEN_IMAGE_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                            use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
# Z-Image shaped: 2 main layers and 1 noise + 1 context refiner layer over 2 heads of 16 (RoPE axes 4 + 6 + 6), 4
# latent channels (FLUX's tiny VAE, 8x); a 3-layer Qwen3 32 wide with GQA, head_dim 16 (not hidden / heads) and q/k
# norms (hidden_states[-2]: the second layer's output) on the stand-in Qwen2 tokenizer (:data:`QWEN3_VOCAB` tokens).
# 64 x 64 images: 8 x 8 latents, 16 image tokens (padded to 32 with the pad token).
QWEN3_VOCAB = 405  # train_qwen3_tokenizer: 400 BPE tokens, <|endoftext|> and the 4 chat special tokens
ZIMAGE_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32, n_layers=2,
                          n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
                          rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
ZIMAGE_QWEN3 = dict(vocab_size=QWEN3_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                    max_position_embeddings=1024, rope_theta=1000000.0, tie_word_embeddings=True,
                    use_sliding_window=False, attention_bias=False, model_type="qwen3")
ZIMAGE_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                        use_dynamic_shifting=False)
# Ovis-Image shaped: FLUX's tiny layout (2 double- and 2 single-stream blocks over 2 heads of 16, RoPE axes 4 + 6 + 6,
# 16 packed latent channels in and out) with its SwiGLU feed-forwards, taking Z-Image's tiny Qwen3 (32 wide: its last
# hidden state) on a stand-in tokenizer that also learned Ovis' system prompt (:func:`train_ovis_tokenizer`: the
# template and system prompt ~28 tokens, as the real one's); FLUX's tiny VAE and scheduler (dynamic shifting).
OVIS_IMAGE_TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                              axes_dims_rope=[4, 6, 6])
OVIS_IMAGE_QWEN3 = ZIMAGE_QWEN3
OVIS_IMAGE_MAX_SEQUENCE_LENGTH = 40  # the tiny model's Qwen3 tokens after the dropped 28 (a corpus prompt fits)
TINY_NAMES["tiny-ovis-image"] = "ovis-image"


# CogView4 shaped: 2 blocks over 2 heads of 16 (the image RoPE: 8 + 8 of each head, rope_axes_dim 16 x 16), time
# embedding 24 wide, conditions 8 wide each (6 x 8 = 48 pooled), 4 latent channels (FLUX's tiny VAE, 8x, decoded as
# latents / scaling_factor as CogView4Pipeline does); a 3-layer GLM 32 wide (2 KV heads of 16, RoPE on the first 8
# features in interleaved pairs, q/k/v biases, fused gate_up_proj; hidden_states[-2]: the second layer's output) on
# the Llama-3-like stand-in tokenizer padding on the left. 64 x 64 images: 8 x 8 latents, 16 image tokens.
COGVIEW4_TRANSFORMER = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, text_embed_dim=32, time_embed_dim=24, condition_dim=8,
                            pos_embed_max_size=16, sample_size=8, rope_axes_dim=[16, 16])
COGVIEW4_GLM = dict(vocab_size=LLAMA_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1.5625e-07,
                    max_position_embeddings=1024, attention_bias=True, pad_token_id=5, eos_token_id=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                    model_type="glm")
COGVIEW4_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                          use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                          max_image_seq_len=4096, time_shift_type="linear")

# FLUX.2 [klein] shaped: 2 double- and 2 single-stream blocks over 2 heads of 16 (RoPE axes 4 x 4, theta 2000), no
# guidance embedding; a 4-block AutoencoderKLFlux2 (8x) with 4 latent channels (16 patchified, the batch-norm over
# them), decoder widths of its own; a 27-layer Qwen3 24 wide (hidden_states 9, 18, 27: the last one after the final
# norm) whose 3 x 24 = 72 features feed the transformer. 64 x 64 images: 4 x 4 = 16 image tokens.
FLUX2_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=72, timestep_guidance_channels=32, mlp_ratio=3.0,
                         axes_dims_rope=[4, 4, 4, 4], rope_theta=2000, eps=1e-6, guidance_embeds=False)
FLUX2_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16],
                 decoder_block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4, sample_size=64,
                 batch_norm_eps=1e-4, patch_size=[2, 2])
FLUX2_QWEN3 = dict(ZIMAGE_QWEN3, hidden_size=24, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=12)
FLUX2_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                       use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096, time_shift_type="exponential")
FLUX2_MAX_SEQUENCE_LENGTH = 32
# FLUX.2 [dev] shaped: the klein transformer with the guidance embedding, its text from a 30-layer Mistral 3 language
# model 24 wide (hidden_states 10, 20, 30: the last after the final norm) on the stand-in Llama tokenizer with a
# Mistral-like chat template; a 1-layer Pixtral vision tower (not read by xdit_jax).
FLUX2_DEV_TRANSFORMER = dict(FLUX2_TRANSFORMER, guidance_embeds=True)
FLUX2_MISTRAL3 = dict(model_type="mistral3", spatial_merge_size=2,
                      text_config=dict(model_type="mistral", vocab_size=384, hidden_size=24, intermediate_size=32,
                                       num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                       rms_norm_eps=1e-5, max_position_embeddings=512, sliding_window=None,
                                       rope_theta=1000000000.0, tie_word_embeddings=False),
                      vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8))
# A Mistral-like chat template for the stand-in tokenizer (system prompt, then the user's text; content lists)
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'][0]['text'] + '[/INST]' }}{%- endif %}"
    "{%- endfor %}")

# SANA shaped: 2 blocks of 2 linear heads x 8 (D = 16), cross 2 x 8, GLUMBConv x 2.5, patch 1; a 3-block DC-AE (4x:
# sample size 8 -> 32 x 32 images) with an EfficientViT block at the deepest level; a 2-layer Gemma 2 (sliding,
# full) whose vocabulary covers the stand-in tokenizer; SANA's DPM-Solver++ with flow sigmas (flow_shift 3).
SANA_VOCAB = 512
SANA_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                        caption_channels=24, mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=1,
                        norm_elementwise_affine=False, norm_eps=1e-6)
SANA_VAE = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
                encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
                encoder_block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16],
                encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 1, 1],
                encoder_qkv_multiscales=[[], [], [3]], decoder_qkv_multiscales=[[], [], [3]],
                upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
SANA_GEMMA = dict(vocab_size=SANA_VOCAB, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                  sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  model_type="gemma2")
SANA_SCHEDULER = dict(_class_name="DPMSolverMultistepScheduler", num_train_timesteps=1000, beta_start=0.0001,
                      beta_end=0.02, beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++",
                      solver_type="midpoint", prediction_type="flow_prediction", lower_order_final=True,
                      thresholding=False, steps_offset=0, use_karras_sigmas=False, use_flow_sigmas=True,
                      flow_shift=3.0, timestep_spacing="linspace", final_sigmas_type="zero", euler_at_final=False)
SANA_MAX_SEQUENCE_LENGTH = 16
# Sana Sprint shaped: SANA's tiny transformer with the q/k RMSNorms and the guidance embedding; its SCM scheduler
# (the config diffusers' conversion writes).
SANA_SPRINT_TRANSFORMER = dict(SANA_TRANSFORMER, qk_norm="rms_norm_across_heads", guidance_embeds=True,
                               guidance_embeds_scale=0.1)
SANA_SPRINT_SCHEDULER = dict(_class_name="SCMScheduler", num_train_timesteps=1000, prediction_type="trigflow",
                             sigma_data=0.5)
# SANA-Video shaped: 2 blocks of 2 linear heads x 12 (D = 24; RoPE 4 + 4 + 4 of the head dim), cross 2 x 12, the
# q/k RMSNorms, GLUMBTempConv x 2.5, patch (1, 2, 2); Wan's tiny VAE (4 latent channels, 4x / 8x); SANA's tiny Gemma 2
# and DPM-Solver++. 9 frames of 32 x 48: 3 x 4 x 6 latents, 3 x 2 x 3 = 18 video tokens.
SANA_VIDEO_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                              num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=12,
                              cross_attention_dim=24, caption_channels=24, mlp_ratio=2.5, attention_bias=False,
                              sample_size=8, patch_size=[1, 2, 2], norm_elementwise_affine=False, norm_eps=1e-6,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=64)

# Lumina 2 shaped: 2 main layers and 1 noise + 1 context refiner layer over 2 query heads of 16 sharing 1 K/V head
# (RoPE axes 4 + 6 + 6), LuminaFeedForward 4 x 32 rounded to 16; 4 latent channels (FLUX's tiny VAE, 8x:
# sample_size 8 -> 64 x 64 images, 16 image tokens); SANA's tiny Gemma 2 (hidden_states[-2]: its first layer's
# output) on the Gemma stand-in tokenizer; FlowMatchEuler with dynamic shifting (diffusers' mu from the latent channels).
LUMINA2_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                           num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                           ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[4, 6, 6],
                           axes_lens=[300, 64, 64], cap_feat_dim=SANA_GEMMA["hidden_size"])
LUMINA2_GEMMA = SANA_GEMMA
LUMINA2_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=6.0,
                         use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                         max_image_seq_len=4096)

# HiDream-I1 shaped: 2 double- and 2 single-stream blocks over 4 heads of 16 (width 64; RoPE axes 8 + 4 + 4: the
# whole head, as the release's 64 + 32 + 32 of 128), 3 routed experts (2 active) and the shared one; max_resolution
# 8 x 8 latent pixels (16 tokens: a non-square latent pads to it); each block's Llama layer of the 3
# (hidden_states[1:]).
# SD3's tiny CLIP-L / CLIP-G with 128 positions (diffusers gives them up to 218 tokens; pooled 16 + 16), the
# tiny T5, HunyuanVideo's tiny Llama (as a LlamaForCausalLM), FLUX's tiny VAE (8x, 4 latent channels), FlowMatch Euler
# with a static shift (the tests also run the flow UniPC the pipeline takes). The pipeline's default_sample_size is
# 128 (1024 x 1024): the tests set 8 (64 x 64 pixels, 8 x 8 latents).
HIDREAM_TRANSFORMER = dict(patch_size=2, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=4, caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=3,
                           num_activated_experts=2, axes_dims_rope=[8, 4, 4], max_resolution=[8, 8],
                           llama_layers=[0, 2, 1, 2])
HIDREAM_CLIP = dict(SD3_CLIP, max_position_embeddings=128)
HIDREAM_CLIP_G = dict(SD3_CLIP_G, max_position_embeddings=128)
HIDREAM_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                         use_dynamic_shifting=False)
HIDREAM_SAMPLE_SIZE = 8

# Cosmos-Predict2 shaped: 2 blocks over 2 heads of 12 (RoPE 4 + 4 + 4), adaLN-LoRA 8 wide, the learnable positions;
# the tiny T5 (32 wide) and Wan's tiny VAE (4 latent channels, 4x / 8x); FlowMatchEuler with Karras sigmas (the
# pipelines register sigma_max 80 / sigma_min 0.002). Video2World's transformer takes the condition mask (in 5).
COSMOS_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                          mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=[8, 32, 32], patch_size=[1, 2, 2],
                          rope_scale=[2.0, 1.0, 1.0], concat_padding_mask=True, extra_pos_embed_type="learnable")
COSMOS_V2W_TRANSFORMER = dict(COSMOS_TRANSFORMER, in_channels=5)
COSMOS_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0,
                        use_karras_sigmas=True, sigma_max=80.0, sigma_min=0.002, sigma_data=1.0,
                        final_sigmas_type="sigma_min")


def train_tokenizer(vocab_size: int = 96):
    """A T5-style (Unigram + ``</s>``) tokenizer trained on a few sentences; a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 4, trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0)


def train_clip_tokenizer():
    """CLIP's byte-level BPE (lower-cased, ``</w>`` word ends) trained on the same sentences (600 tokens:
    ``FLUX_CLIP``'s vocabulary; EOS the last id)."""
    from xdit_jax.models import clip

    return clip.train_tokenizer(CORPUS * 4, vocab_size=FLUX_CLIP["vocab_size"])


def train_bert_tokenizer(vocab_size: int = 128):
    """A BERT (WordPiece) tokenizer trained on the same sentences; a transformers tokenizer."""
    from xdit_jax.models import bert

    return bert.train_tokenizer(CORPUS * 4, vocab_size=vocab_size)


def train_llama_tokenizer():
    """A Llama-3-like tokenizer (:func:`xdit_jax.models.llama.train_tokenizer`) trained on the same sentences, alone
    and inside HunyuanVideo's prompt template (:data:`LLAMA_VOCAB` tokens)."""
    from xdit_jax.models import llama

    template = llama.HUNYUAN_VIDEO_TEMPLATE["template"]
    return llama.train_tokenizer(CORPUS * 4 + [template.format(p) for p in CORPUS], vocab_size=LLAMA_VOCAB)


def train_glm_tokenizer():
    """The Llama-3-like stand-in (:func:`train_llama_tokenizer`'s corpus) padding on the left as GLM-4's
    (:func:`xdit_jax.models.glm.train_tokenizer`; <pad> is id 5)."""
    from xdit_jax.models import glm, llama

    template = llama.HUNYUAN_VIDEO_TEMPLATE["template"]
    return glm.train_tokenizer(CORPUS * 4 + [template.format(p) for p in CORPUS], vocab_size=LLAMA_VOCAB)


def train_mistral3_tokenizer():
    """The Llama-like stand-in (:func:`train_llama_tokenizer`) with :data:`MISTRAL3_CHAT_TEMPLATE` (FLUX.2-dev's
    text encoder's stand-in; its ids fit :data:`FLUX2_MISTRAL3`'s vocabulary)."""
    tok = train_llama_tokenizer()
    tok.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tok


def train_qwen_tokenizer():
    """A Qwen2 tokenizer (:func:`xdit_jax.models.qwen2_5_vl.train_tokenizer`) trained on the same sentences, alone
    and inside Qwen-Image's prompt template."""
    from xdit_jax.models import qwen2_5_vl

    return qwen2_5_vl.train_tokenizer(CORPUS * 4 + [qwen2_5_vl.PROMPT_TEMPLATE.format(p) for p in CORPUS],
                                      vocab_size=QWEN_VOCAB)


def train_hunyuan_video15_tokenizer():
    """The stand-in Qwen2 tokenizer (:func:`xdit_jax.models.qwen2_5_vl.train_tokenizer`, trained on the same
    sentences) with Qwen2.5-VL's chat template (:data:`QWEN25VL_CHAT_TEMPLATE`): HunyuanVideo-1.5's text tokenizer."""
    from xdit_jax.models import qwen2_5_vl

    tok = qwen2_5_vl.train_tokenizer(CORPUS * 4, vocab_size=HUNYUAN_VIDEO15_QWEN["vocab_size"])
    tok.chat_template = QWEN25VL_CHAT_TEMPLATE
    return tok


def byt5_tokenizer():
    """transformers' ``ByT5Tokenizer`` (byte-level: nothing to train or download)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def train_qwen_edit_tokenizer():
    """The stand-in Qwen2 tokenizer with Qwen2.5-VL's vision tokens (ids 3, 4, 5), trained on the same sentences, alone
    and inside Qwen-Image-Edit's templates."""
    from xdit_jax.models import qwen2_5_vl as qv

    return qv.train_tokenizer(CORPUS * 4 + [qv.EDIT_TEMPLATE.format(p) for p in CORPUS], vocab_size=QWEN_VOCAB,
                              vision_tokens=True)


def train_qwen3_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer with Qwen3's chat template (:func:`xdit_jax.models.qwen3.train_tokenizer`)
    trained on the same sentences, alone and in the template (:data:`QWEN3_VOCAB` tokens)."""
    from xdit_jax.models import qwen3

    corpus = CORPUS * 4 + [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in CORPUS]
    return qwen3.train_tokenizer(corpus, vocab_size=QWEN3_VOCAB - len(qwen3.SPECIAL_TOKENS))


def train_ovis_tokenizer():
    """:func:`train_qwen3_tokenizer`'s kind of tokenizer trained on the same sentences, alone and in Ovis-Image's
    template (its system prompt, thinking off), :data:`QWEN3_VOCAB` tokens."""
    from xdit_jax.models import qwen3
    from xdit_jax.pipelines.ovis_image import SYSTEM_PROMPT

    corpus = CORPUS * 4 + [f"<|im_start|>user\n{SYSTEM_PROMPT}{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                           "</think>\n\n" for p in CORPUS]
    return qwen3.train_tokenizer(corpus, vocab_size=QWEN3_VOCAB - len(qwen3.SPECIAL_TOKENS))


def train_gemma_tokenizer():
    """A Gemma-like tokenizer (:func:`xdit_jax.models.gemma2.train_tokenizer`) trained on the same sentences and
    SANA's complex human instruction: 300 tokens, within the tiny Gemma's :data:`SANA_VOCAB`."""
    from xdit_jax.models import gemma2

    chi = "\n".join(gemma2.SANA_COMPLEX_HUMAN_INSTRUCTION)
    return gemma2.train_tokenizer(CORPUS * 4 + [chi] * 4, vocab_size=300)


def stand_in_tokenizer(class_name: str, text_encoder: str = "", pipeline: str = ""):
    """A small tokenizer trained here of the kind a pipeline's ``class_name`` (model_index.json) names: CLIP's
    BPE, BERT's WordPiece, Llama 3's BPE (HunyuanVideo), Gemma's (SANA), Qwen2's byte-level BPE (for a ``Qwen3*`` ``text_encoder``:
    Z-Image's, with Qwen3's chat template; else Qwen-Image's), else T5's Unigram. Its ids are valid for the full-size
    encoders' vocabularies and it pads to the lengths the pipelines ask for, so a pipeline with random weights runs
    the real shapes."""
    if text_encoder.startswith("Glm"):  # CogView4's GLM-4 (a PreTrainedTokenizerFast padding on the left)
        return train_glm_tokenizer()
    if class_name.startswith("CLIP"):
        return train_clip_tokenizer()
    if class_name.startswith("Bert"):
        return train_bert_tokenizer()
    if class_name.startswith("Llama") or text_encoder.startswith("Llama"):  # (HiDream's: PreTrainedTokenizerFast)
        return train_llama_tokenizer()
    if class_name.startswith("Pixtral") or text_encoder.startswith("Mistral3"):  # FLUX.2-dev's processor
        return train_mistral3_tokenizer()
    if class_name.startswith("ByT5"):
        return byt5_tokenizer()
    if class_name.startswith("Qwen2") and pipeline.startswith(("HunyuanVideo15", "HunyuanImage")):  # (chat template)
        return train_hunyuan_video15_tokenizer()
    if class_name.startswith("Qwen2") and pipeline.startswith("QwenImageEdit"):  # with Qwen2.5-VL's vision tokens
        return train_qwen_edit_tokenizer()
    if class_name.startswith("Qwen2") and pipeline.startswith("OvisImage"):  # (its system prompt learned)
        return train_ovis_tokenizer()
    if class_name.startswith("Qwen2"):
        return train_qwen3_tokenizer() if text_encoder.startswith("Qwen3") else train_qwen_tokenizer()
    if class_name.startswith("Gemma"):
        return train_gemma_tokenizer()
    return train_tokenizer()


def model_index(family: str = "cogvideox") -> dict:
    if family == "consisid":
        return {"_class_name": "ConsisIDPipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "ConsisIDTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    if family == "skyreels_v2":  # (the diffusion-forcing pipeline: the fps embedding, per-frame timesteps)
        return {"_class_name": "SkyReelsV2DiffusionForcingPipeline", "_diffusers_version": "0.35.0",
                "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "SkyReelsV2Transformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if family == "hunyuanimage":
        return {"_class_name": "HunyuanImagePipeline", "_diffusers_version": "0.36.0",
                "guider": ["diffusers", "AdaptiveProjectedMixGuidance"],
                "ocr_guider": ["diffusers", "AdaptiveProjectedMixGuidance"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer_2": ["transformers", "ByT5Tokenizer"],
                "transformer": ["diffusers", "HunyuanImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLHunyuanImage"]}
    if family == "hunyuan_video15":
        return {"_class_name": "HunyuanVideo15Pipeline", "_diffusers_version": "0.36.0",
                "guider": ["diffusers", "ClassifierFreeGuidance"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLTextModel"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "text_encoder_2": ["transformers", "T5EncoderModel"],
                "tokenizer_2": ["transformers", "ByT5Tokenizer"],
                "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLHunyuanVideo15"]}
    if family == "chronoedit":
        return {"_class_name": "ChronoEditPipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "ChronoEditTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                "image_encoder": ["transformers", "CLIPVisionModel"],
                "image_processor": ["transformers", "CLIPImageProcessor"]}
    if family in ("cosmos", "cosmos-v2w"):  # (no safety checker: cosmos_guardrail is not run here)
        return {"_class_name": "Cosmos2VideoToWorldPipeline" if family == "cosmos-v2w" else "Cosmos2TextToImagePipeline",
                "_diffusers_version": "0.34.0", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "CosmosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                "safety_checker": [None, None]}
    if family == "wan":
        return {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if family == "sd3":
        return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family in FLUX_KINDS:  # (FLUX.1 Kontext / Fill / Control: the same parts, the VAE's encoder used too)
        return {"_class_name": FLUX_KINDS[family],
                "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "longcat":  # (its text_processor, a Qwen2VLProcessor for prompt rewriting, is not read)
        return {"_class_name": "LongCatImagePipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "LongCatImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "chroma":
        return {"_class_name": "ChromaPipeline", "_diffusers_version": "0.35.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "ChromaTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                "image_encoder": [None, None], "feature_extractor": [None, None]}
    if family == "cogview3":
        return {"_class_name": "CogView3PlusPipeline", "_diffusers_version": "0.31.0",
                "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                "transformer": ["diffusers", "CogView3PlusTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "ltx":
        return {"_class_name": "LTXPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "LTXVideoTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLLTXVideo"]}
    if family == "mochi":
        return {"_class_name": "MochiPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "MochiTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLMochi"],
                "force_zeros_for_empty_prompt": False}
    if family == "hunyuandit":
        return {"_class_name": "HunyuanDiTPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "BertModel"],
                "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "BertTokenizer"],
                "tokenizer_2": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "HunyuanDiT2DModel"],
                "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
                "feature_extractor": [None, None]}
    if family == "kandinsky5":
        return {"_class_name": "Kandinsky5T2VPipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}
    if family == "hunyuanvideo":
        return {"_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "LlamaModel"], "tokenizer": ["transformers", "LlamaTokenizerFast"],
                "text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}
    if family in ("qwenimage-edit", "qwenimage-edit-plus"):
        return dict(model_index("qwenimage"), _diffusers_version="0.36.0",
                    _class_name="QwenImageEditPlusPipeline" if family.endswith("plus") else "QwenImageEditPipeline",
                    processor=["transformers", "Qwen2VLProcessor"])
    if family == "qwenimage":
        return {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.35.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    if family == "cogview4":
        return {"_class_name": "CogView4Pipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "GlmModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                "transformer": ["diffusers", "CogView4Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "zimage":
        return {"_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "ovis-image":
        return {"_class_name": "OvisImagePipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                "transformer": ["diffusers", "OvisImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "flux2":
        return {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.37.0", "is_distilled": False,
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    if family == "latte":
        return {"_class_name": "LattePipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                "transformer": ["diffusers", "LatteTransformer3DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "sana":
        return {"_class_name": "SanaPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizer"],
                "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}
    if family == "sana-sprint":
        return {"_class_name": "SanaSprintPipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "SCMScheduler"],
                "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizer"],
                "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}
    if family == "sana-video":
        return {"_class_name": "SanaVideoPipeline", "_diffusers_version": "0.36.0",
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizer"],
                "transformer": ["diffusers", "SanaVideoTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    if family == "lumina2":
        return {"_class_name": "Lumina2Pipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizer"],
                "transformer": ["diffusers", "Lumina2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "hidream":
        return {"_class_name": "HiDreamImagePipeline", "_diffusers_version": "0.33.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "text_encoder_3": ["transformers", "T5EncoderModel"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"],
                "text_encoder_4": ["transformers", "LlamaForCausalLM"],
                "tokenizer_4": ["transformers", "PreTrainedTokenizerFast"],
                "transformer": ["diffusers", "HiDreamImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family == "pixart":
        return {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.32.0",
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    return {"_class_name": "CogVideoXPipeline", "_diffusers_version": "0.32.0",
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"]}


def init_rule(path, shape: tuple[int, ...]) -> float | str:
    """How a random parameter at key ``path`` is drawn: "ones" (1-D norm scales), "zeros" (biases), or the
    standard deviation of a normal scaled by the fan-in (kernels: all axes but the output one, a stacked
    layer axis left out; embeddings: their width)."""
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "weight", "running_var") and len(shape) == 1:
        return "ones"
    if name in ("bias", "running_mean"):
        return "zeros"
    fan_in = int(np.prod(shape[:-1])) if name == "kernel" else (shape[-1] if shape else 1)  # (0-d: a scalar)
    if name == "kernel" and len(shape) >= 3 and path and "transformer_blocks" in str(path[0]):
        fan_in = int(np.prod(shape[1:-1]))  # stacked layers: skip the layer axis
    return 1.0 / float(np.sqrt(max(fan_in, 1)))


def random_params(params: dict, seed: int) -> dict:
    """Fan-in scaled normal kernels/embeddings, unit norm scales, zero biases (pure dict in, numpy float32 out;
    :func:`init_rule`)."""
    import jax

    rng = np.random.default_rng(seed)

    def init(path, x):
        shape = tuple(x.shape)
        rule = init_rule(path, shape)
        if isinstance(rule, str):
            return (np.ones if rule == "ones" else np.zeros)(shape, np.float32)
        return (rng.standard_normal(shape) * rule).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, params)


def random_params_on_device(abstract: dict, seed: int, dtype=None, sharding=None) -> dict:
    """:func:`random_params`' rule drawn on the device, leaf by leaf (a full-size model in seconds, no host
    copy): ``abstract`` a pure dict of shapes (``jax.ShapeDtypeStruct``); floating leaves in ``dtype``
    (default: theirs); ``sharding`` one for every leaf or a callable ``(key path, shape) -> sharding``. Leaf
    ``i`` is a normal drawn from ``fold_in(key(seed), i)``; one small program per distinct (shape, dtype,
    sharding), compiled once (one program for the whole tree took seconds to compile: every leaf's RNG in it).
    Leaves of at most :data:`HOST_DRAWN` elements are drawn on the host instead (numpy, seeded by ``(seed, i)``)
    and placed: a program per small shape would cost more to compile (~0.4 s each on a CPU) than their copy."""
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    key = jax.random.key(seed)
    out = []
    for i, (path, x) in enumerate(flat):
        shape = tuple(x.shape)
        dt = jnp.dtype(dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
        where = sharding(path, shape) if callable(sharding) else sharding
        rule = init_rule(path, shape)
        if isinstance(rule, str):
            out.append((jnp.ones if rule == "ones" else jnp.zeros)(shape, dt, device=where))
        elif math.prod(shape) <= HOST_DRAWN:
            host = np.random.default_rng((seed, i)).standard_normal(shape, np.float32) * np.float32(rule)
            out.append(jax.device_put(host.astype(dt), where))
        else:
            out.append(_normal_drawer(shape, dt, where)(key, i, jnp.float32(rule)))
    return jax.tree_util.tree_unflatten(treedef, out)


HOST_DRAWN = 1 << 18  # elements: random_params_on_device draws smaller leaves on the host


@functools.cache
def _normal_drawer(shape: tuple[int, ...], dtype, sharding):
    """A jitted ``(key, i, std) -> normal(fold_in(key, i), shape) * std`` in ``dtype``, placed by ``sharding``."""
    import jax

    def draw(key, i, std):
        return (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * std).astype(dtype)

    return jax.jit(draw) if sharding is None else jax.jit(draw, out_shardings=sharding)


def default_tiny_dir(family: str = "cogvideox") -> Path:
    root = Path(os.environ.get("XDIT_JAX_CACHE") or Path.home() / ".cache" / "xdit_jax")
    return root / f"tiny-{family}"


def _parts(family: str, transformer: dict | None):
    """{component: (class name, config dict, module maker)} of a tiny model."""
    from flax import nnx

    from xdit_jax.models import (
        bert,
        clip,
        cogvideox,
        flux,
        hunyuandit,
        latte,
        mochi,
        pixart,
        sd3,
        t5,
        vae_cogvideox,
        vae_kl,
        vae_mochi,
        vae_wan,
        wan,
    )

    text = ("T5EncoderModel", TEXT_ENCODER,
            lambda: t5.T5EncoderModel(t5.T5Config.from_dict(TEXT_ENCODER), rngs=nnx.Rngs(0)))
    if family in ("cosmos", "cosmos-v2w"):
        from xdit_jax.models import cosmos

        base = COSMOS_V2W_TRANSFORMER if family == "cosmos-v2w" else COSMOS_TRANSFORMER
        tcfg = {**base, **(transformer or {})}
        return {
            "transformer": ("CosmosTransformer3DModel", tcfg,
                            lambda: cosmos.CosmosTransformer3DModel(cosmos.CosmosConfig.from_dict(tcfg),
                                                                    rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLWan", WAN_VAE,
                    lambda: vae_wan.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE), jnp.float32)()),
            "text_encoder": text,
        }, COSMOS_SCHEDULER
    if family == "wan":
        tcfg = {**WAN_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("WanTransformer3DModel", tcfg,
                            lambda: wan.WanTransformer3DModel(wan.WanConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLWan", WAN_VAE,
                    lambda: vae_wan.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE), jnp.float32)()),
            "text_encoder": ("UMT5EncoderModel", WAN_TEXT_ENCODER,
                             lambda: t5.T5EncoderModel(t5.UMT5Config.from_dict(WAN_TEXT_ENCODER), rngs=nnx.Rngs(0))),
        }, WAN_SCHEDULER
    if family == "chronoedit":  # Wan 2.1 I2V's tiny parts with ChronoEdit's transformer and the CLIP tower
        from xdit_jax.models import chronoedit

        tcfg = {**CHRONOEDIT_TRANSFORMER, **(transformer or {})}
        vision = clip.CLIPVisionConfig.from_dict(WAN_IMAGE_ENCODER)
        return {
            "transformer": ("ChronoEditTransformer3DModel", tcfg,
                            lambda: chronoedit.ChronoEditTransformer3DModel(chronoedit.ChronoEditConfig.from_dict(tcfg),
                                                                            rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLWan", WAN_VAE,
                    lambda: vae_wan.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE), jnp.float32)()),
            "text_encoder": ("UMT5EncoderModel", WAN_TEXT_ENCODER,
                             lambda: t5.T5EncoderModel(t5.UMT5Config.from_dict(WAN_TEXT_ENCODER), rngs=nnx.Rngs(0))),
            "image_encoder": ("CLIPVisionModel", WAN_IMAGE_ENCODER, lambda: clip.CLIPVisionModel(vision)),
        }, WAN_SCHEDULER
    if family == "skyreels_v2":
        from xdit_jax.models import skyreels_v2

        tcfg = {**SKYREELS_V2_TRANSFORMER, "inject_sample_info": True, **(transformer or {})}
        return {
            "transformer": ("SkyReelsV2Transformer3DModel", tcfg,
                            lambda: skyreels_v2.SkyReelsV2Transformer3DModel(
                                skyreels_v2.SkyReelsV2Config.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLWan", WAN_VAE,
                    lambda: vae_wan.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE), jnp.float32)()),
            "text_encoder": ("UMT5EncoderModel", WAN_TEXT_ENCODER,
                             lambda: t5.T5EncoderModel(t5.UMT5Config.from_dict(WAN_TEXT_ENCODER), rngs=nnx.Rngs(0))),
        }, SKYREELS_V2_SCHEDULER
    if family == "hunyuandit":
        tcfg = {**HUNYUAN_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("HunyuanDiT2DModel", tcfg,
                            lambda: hunyuandit.HunyuanDiT2DModel(hunyuandit.HunyuanDiTConfig.from_dict(tcfg),
                                                                 rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", PIXART_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(PIXART_VAE), jnp.float32)()),
            "text_encoder": ("BertModel", HUNYUAN_BERT,
                             lambda: bert.BertModel(bert.BertConfig.from_dict(HUNYUAN_BERT), rngs=nnx.Rngs(0))),
            "text_encoder_2": text,
        }, HUNYUAN_SCHEDULER
    if family == "sd3":
        tcfg = {**SD3_TRANSFORMER, **(transformer or {})}
        clip_with_projection = lambda c: lambda: clip.CLIPTextModelWithProjection(  # noqa: E731
            clip.CLIPTextWithProjectionConfig.from_dict(c), rngs=nnx.Rngs(0))
        return {
            "transformer": ("SD3Transformer2DModel", tcfg,
                            lambda: sd3.SD3Transformer2DModel(sd3.SD3Config.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", SD3_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(SD3_VAE), jnp.float32)()),
            "text_encoder": ("CLIPTextModelWithProjection", SD3_CLIP, clip_with_projection(SD3_CLIP)),
            "text_encoder_2": ("CLIPTextModelWithProjection", SD3_CLIP_G, clip_with_projection(SD3_CLIP_G)),
            "text_encoder_3": text,
        }, SD3_SCHEDULER
    if family in FLUX_KINDS:
        base = {"flux-fill": FLUX_FILL_TRANSFORMER, "flux-control": FLUX_CONTROL_TRANSFORMER}.get(family, FLUX_TRANSFORMER)
        tcfg = {**base, **(transformer or {})}
        return {
            "transformer": ("FluxTransformer2DModel", tcfg,
                            lambda: flux.FluxTransformer2DModel(flux.FluxConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("CLIPTextModel", FLUX_CLIP,
                             lambda: clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(FLUX_CLIP), rngs=nnx.Rngs(0))),
            "text_encoder_2": text,
        }, FLUX_SCHEDULER
    if family == "longcat":
        from xdit_jax.models import llama, longcat_image, qwen2_5_vl

        tcfg = {**LONGCAT_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("LongCatImageTransformer2DModel", tcfg,
                            lambda: longcat_image.LongCatImageTransformer2DModel(
                                longcat_image.LongCatImageConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN_IMAGE_TEXT_ENCODER,
                             lambda: llama.LlamaModel(qwen2_5_vl.Qwen25VLTextConfig.from_dict(QWEN_IMAGE_TEXT_ENCODER),
                                                      rngs=nnx.Rngs(0))),
        }, FLUX_SCHEDULER
    if family == "chroma":
        from xdit_jax.models import chroma

        tcfg = {**CHROMA_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("ChromaTransformer2DModel", tcfg,
                            lambda: chroma.ChromaTransformer2DModel(chroma.ChromaConfig.from_dict(tcfg),
                                                                    rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": text,
        }, FLUX_SCHEDULER
    if family == "ltx":
        from xdit_jax.models import ltx, vae_ltx

        tcfg = {**LTX_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("LTXVideoTransformer3DModel", tcfg,
                            lambda: ltx.LTXVideoTransformer3DModel(ltx.LTXConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLLTXVideo", LTX_VAE,
                    lambda: vae_ltx.module_fn(vae_ltx.LTXVAEConfig.from_dict(LTX_VAE), jnp.float32)()),
            "text_encoder": text,
        }, LTX_SCHEDULER
    if family == "mochi":
        tcfg = {**MOCHI_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("MochiTransformer3DModel", tcfg,
                            lambda: mochi.MochiTransformer3DModel(mochi.MochiConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLMochi", MOCHI_VAE,
                    lambda: vae_mochi.module_fn(vae_mochi.MochiVAEConfig.from_dict(MOCHI_VAE), jnp.float32)()),
            "text_encoder": text,
        }, MOCHI_SCHEDULER
    if family == "hunyuanvideo":
        from xdit_jax.models import hunyuan_video, llama, vae_hunyuan_video

        tcfg = {**HUNYUAN_VIDEO_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("HunyuanVideoTransformer3DModel", tcfg,
                            lambda: hunyuan_video.HunyuanVideoTransformer3DModel(
                                hunyuan_video.HunyuanVideoConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLHunyuanVideo", HUNYUAN_VIDEO_VAE,
                    lambda: vae_hunyuan_video.module_fn(
                        vae_hunyuan_video.HunyuanVideoVAEConfig.from_dict(HUNYUAN_VIDEO_VAE), jnp.float32)()),
            "text_encoder": ("LlamaModel", HUNYUAN_VIDEO_LLAMA,
                             lambda: llama.LlamaModel(llama.LlamaConfig.from_dict(HUNYUAN_VIDEO_LLAMA),
                                                      rngs=nnx.Rngs(0))),
            "text_encoder_2": ("CLIPTextModel", FLUX_CLIP,
                               lambda: clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(FLUX_CLIP), rngs=nnx.Rngs(0))),
        }, HUNYUAN_VIDEO_SCHEDULER
    if family == "kandinsky5":
        from xdit_jax.models import kandinsky5, llama, qwen2_5_vl, vae_hunyuan_video

        tcfg = {**KANDINSKY5_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("Kandinsky5Transformer3DModel", tcfg,
                            lambda: kandinsky5.Kandinsky5Transformer3DModel(
                                kandinsky5.Kandinsky5Config.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLHunyuanVideo", HUNYUAN_VIDEO_VAE,
                    lambda: vae_hunyuan_video.module_fn(
                        vae_hunyuan_video.HunyuanVideoVAEConfig.from_dict(HUNYUAN_VIDEO_VAE), jnp.float32)()),
            "text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN_IMAGE_TEXT_ENCODER,
                             lambda: llama.LlamaModel(qwen2_5_vl.Qwen25VLTextConfig.from_dict(QWEN_IMAGE_TEXT_ENCODER),
                                                      rngs=nnx.Rngs(0))),
            "text_encoder_2": ("CLIPTextModel", FLUX_CLIP,
                               lambda: clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(FLUX_CLIP), rngs=nnx.Rngs(0))),
        }, KANDINSKY5_SCHEDULER
    if family == "hunyuanimage":
        from xdit_jax.models import hunyuanimage, llama, qwen2_5_vl, vae_hunyuanimage

        tcfg = {**HUNYUANIMAGE_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("HunyuanImageTransformer2DModel", tcfg,
                            lambda: hunyuanimage.HunyuanImageTransformer2DModel(
                                hunyuanimage.HunyuanImageConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLHunyuanImage", HUNYUANIMAGE_VAE,
                    lambda: vae_hunyuanimage.module_fn(
                        vae_hunyuanimage.HunyuanImageVAEConfig.from_dict(HUNYUANIMAGE_VAE), jnp.float32)()),
            "text_encoder": ("Qwen2_5_VLTextModel", HUNYUAN_VIDEO15_QWEN,
                             lambda: llama.LlamaModel(qwen2_5_vl.Qwen25VLTextConfig.from_dict(HUNYUAN_VIDEO15_QWEN),
                                                      rngs=nnx.Rngs(0))),
            "text_encoder_2": ("T5EncoderModel", HUNYUAN_VIDEO15_BYT5,
                               lambda: t5.T5EncoderModel(t5.T5Config.from_dict(HUNYUAN_VIDEO15_BYT5),
                                                         rngs=nnx.Rngs(0))),
        }, HUNYUANIMAGE_SCHEDULER
    if family == "hunyuan_video15":
        from xdit_jax.models import hunyuan_video15, llama, qwen2_5_vl, vae_hunyuan_video15

        tcfg = {**HUNYUAN_VIDEO15_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("HunyuanVideo15Transformer3DModel", tcfg,
                            lambda: hunyuan_video15.HunyuanVideo15Transformer3DModel(
                                hunyuan_video15.HunyuanVideo15Config.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLHunyuanVideo15", HUNYUAN_VIDEO15_VAE,
                    lambda: vae_hunyuan_video15.module_fn(
                        vae_hunyuan_video15.HunyuanVideo15VAEConfig.from_dict(HUNYUAN_VIDEO15_VAE), jnp.float32)()),
            "text_encoder": ("Qwen2_5_VLTextModel", HUNYUAN_VIDEO15_QWEN,
                             lambda: llama.LlamaModel(qwen2_5_vl.Qwen25VLTextConfig.from_dict(HUNYUAN_VIDEO15_QWEN),
                                                      rngs=nnx.Rngs(0))),
            "text_encoder_2": ("T5EncoderModel", HUNYUAN_VIDEO15_BYT5,
                               lambda: t5.T5EncoderModel(t5.T5Config.from_dict(HUNYUAN_VIDEO15_BYT5),
                                                         rngs=nnx.Rngs(0))),
        }, HUNYUAN_VIDEO15_SCHEDULER
    if family in ("qwenimage", "qwenimage-edit", "qwenimage-edit-plus"):
        from xdit_jax.models import llama, qwen2_5_vl, qwenimage, vae_qwenimage

        tcfg = {**QWEN_IMAGE_TRANSFORMER, **({"zero_cond_t": True} if family.endswith("plus") else {}),
                **(transformer or {})}
        tecfg = QWEN_IMAGE_TEXT_ENCODER if family == "qwenimage" else QWEN_EDIT_TEXT_ENCODER
        return {
            "transformer": ("QwenImageTransformer2DModel", tcfg,
                            lambda: qwenimage.QwenImageTransformer2DModel(qwenimage.QwenImageConfig.from_dict(tcfg),
                                                                          rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLQwenImage", QWEN_IMAGE_VAE,
                    lambda: vae_qwenimage.WanVAEDecoder(vae_qwenimage.QwenImageVAEConfig.from_dict(QWEN_IMAGE_VAE),
                                                        dtype=jnp.float32)),
            "text_encoder": ("Qwen2_5_VLForConditionalGeneration", tecfg,
                             lambda: llama.LlamaModel(qwen2_5_vl.Qwen25VLTextConfig.from_dict(tecfg),
                                                      rngs=nnx.Rngs(0))),
        }, QWEN_IMAGE_SCHEDULER
    if family == "cogview4":
        from xdit_jax.models import cogview4, glm, llama

        tcfg = {**COGVIEW4_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("CogView4Transformer2DModel", tcfg,
                            lambda: cogview4.CogView4Transformer2DModel(cogview4.CogView4Config.from_dict(tcfg),
                                                                        rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("GlmModel", COGVIEW4_GLM,
                             lambda: llama.LlamaModel(glm.GlmConfig.from_dict(COGVIEW4_GLM), rngs=nnx.Rngs(0))),
        }, COGVIEW4_SCHEDULER
    if family == "zimage":
        from xdit_jax.models import llama, qwen3, zimage

        tcfg = {**ZIMAGE_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("ZImageTransformer2DModel", tcfg,
                            lambda: zimage.ZImageTransformer2DModel(zimage.ZImageConfig.from_dict(tcfg),
                                                                    rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("Qwen3Model", ZIMAGE_QWEN3,
                             lambda: llama.LlamaModel(qwen3.Qwen3Config.from_dict(ZIMAGE_QWEN3), rngs=nnx.Rngs(0))),
        }, ZIMAGE_SCHEDULER
    if family == "ovis-image":
        from xdit_jax.models import llama, ovis_image, qwen3

        tcfg = {**OVIS_IMAGE_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("OvisImageTransformer2DModel", tcfg,
                            lambda: ovis_image.OvisImageTransformer2DModel(ovis_image.OvisImageConfig.from_dict(tcfg),
                                                                           rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("Qwen3Model", OVIS_IMAGE_QWEN3,
                             lambda: llama.LlamaModel(qwen3.Qwen3Config.from_dict(OVIS_IMAGE_QWEN3),
                                                      rngs=nnx.Rngs(0))),
        }, FLUX_SCHEDULER
    if family == "flux2":
        from xdit_jax.models import flux2, llama, qwen3, vae_flux2

        tcfg = {**FLUX2_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("Flux2Transformer2DModel", tcfg,
                            lambda: flux2.Flux2Transformer2DModel(flux2.Flux2Config.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLFlux2", FLUX2_VAE,
                    lambda: vae_flux2.module_fn(vae_flux2.AutoencoderKLFlux2Config.from_dict(FLUX2_VAE))()),
            "text_encoder": ("Qwen3ForCausalLM", FLUX2_QWEN3,
                             lambda: llama.LlamaModel(qwen3.Qwen3Config.from_dict(FLUX2_QWEN3), rngs=nnx.Rngs(0))),
        }, FLUX2_SCHEDULER
    if family == "latte":
        tcfg = {**LATTE_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("LatteTransformer3DModel", tcfg,
                            lambda: latte.LatteTransformer3DModel(latte.LatteConfig.from_dict(tcfg),
                                                                  rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", LATTE_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(LATTE_VAE), jnp.float32)()),
            "text_encoder": text,
        }, LATTE_SCHEDULER
    if family in ("sana", "sana-sprint"):
        from xdit_jax.models import gemma2, sana, vae_dc

        sprint = family == "sana-sprint"
        tcfg = {**(SANA_SPRINT_TRANSFORMER if sprint else SANA_TRANSFORMER), **(transformer or {})}
        return {
            "transformer": ("SanaTransformer2DModel", tcfg,
                            lambda: sana.SanaTransformer2DModel(sana.SanaConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderDC", SANA_VAE,
                    lambda: vae_dc.module_fn(vae_dc.AutoencoderDCConfig.from_dict(SANA_VAE), jnp.float32)()),
            "text_encoder": ("Gemma2Model", SANA_GEMMA,
                             lambda: gemma2.Gemma2Model(gemma2.Gemma2Config.from_dict(SANA_GEMMA), rngs=nnx.Rngs(0))),
        }, SANA_SPRINT_SCHEDULER if sprint else SANA_SCHEDULER
    if family == "sana-video":
        from xdit_jax.models import gemma2, sana_video

        tcfg = {**SANA_VIDEO_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("SanaVideoTransformer3DModel", tcfg,
                            lambda: sana_video.SanaVideoTransformer3DModel(sana_video.SanaVideoConfig.from_dict(tcfg),
                                                                           rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLWan", WAN_VAE,
                    lambda: vae_wan.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE), jnp.float32)()),
            "text_encoder": ("Gemma2Model", SANA_GEMMA,
                             lambda: gemma2.Gemma2Model(gemma2.Gemma2Config.from_dict(SANA_GEMMA), rngs=nnx.Rngs(0))),
        }, SANA_SCHEDULER
    if family == "lumina2":
        from xdit_jax.models import gemma2, lumina2

        tcfg = {**LUMINA2_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("Lumina2Transformer2DModel", tcfg,
                            lambda: lumina2.Lumina2Transformer2DModel(lumina2.Lumina2Config.from_dict(tcfg),
                                                                      rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("Gemma2Model", LUMINA2_GEMMA,
                             lambda: gemma2.Gemma2Model(gemma2.Gemma2Config.from_dict(LUMINA2_GEMMA),
                                                        rngs=nnx.Rngs(0))),
        }, LUMINA2_SCHEDULER
    if family == "cogview3":
        from xdit_jax.models import cogview3plus

        tcfg = {**COGVIEW3_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("CogView3PlusTransformer2DModel", tcfg,
                            lambda: cogview3plus.CogView3PlusTransformer2DModel(
                                cogview3plus.CogView3PlusConfig.from_dict(tcfg), rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", COGVIEW3_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(COGVIEW3_VAE), jnp.float32)()),
            "text_encoder": text,
        }, COGVIEW3_SCHEDULER
    if family == "pixart":
        tcfg = {**PIXART_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("PixArtTransformer2DModel", tcfg,
                            lambda: pixart.PixArtTransformer2DModel(pixart.PixArtConfig.from_dict(tcfg),
                                                                    rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", PIXART_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(PIXART_VAE), jnp.float32)()),
            "text_encoder": text,
        }, PIXART_SCHEDULER
    if family == "hidream":  # (the CLI's tiny-hidream: make_torch_hidream's configs, FlowMatch Euler)
        from xdit_jax.models import hidream, llama

        tcfg = {**HIDREAM_TRANSFORMER, **(transformer or {})}
        clip_with_projection = lambda c: lambda: clip.CLIPTextModelWithProjection(  # noqa: E731
            clip.CLIPTextWithProjectionConfig.from_dict(c), rngs=nnx.Rngs(0))
        return {
            "transformer": ("HiDreamImageTransformer2DModel", tcfg,
                            lambda: hidream.HiDreamImageTransformer2DModel(hidream.HiDreamConfig.from_dict(tcfg),
                                                                           rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKL", FLUX_VAE,
                    lambda: vae_kl.module_fn(vae_kl.AutoencoderKLConfig.from_dict(FLUX_VAE), jnp.float32)()),
            "text_encoder": ("CLIPTextModelWithProjection", HIDREAM_CLIP, clip_with_projection(HIDREAM_CLIP)),
            "text_encoder_2": ("CLIPTextModelWithProjection", HIDREAM_CLIP_G, clip_with_projection(HIDREAM_CLIP_G)),
            "text_encoder_3": text,
            "text_encoder_4": ("LlamaForCausalLM", HUNYUAN_VIDEO_LLAMA,
                               lambda: llama.LlamaModel(llama.LlamaConfig.from_dict(HUNYUAN_VIDEO_LLAMA),
                                                        rngs=nnx.Rngs(0))),
        }, HIDREAM_SCHEDULER
    if family == "consisid":  # (DDIM: the parity tests' scheduler; the release's CogVideoXDPMScheduler draws noise)
        from xdit_jax.models import consisid

        tcfg = {**CONSISID_TRANSFORMER, **(transformer or {})}
        return {
            "transformer": ("ConsisIDTransformer3DModel", tcfg,
                            lambda: consisid.ConsisIDTransformer3DModel(consisid.ConsisIDConfig.from_dict(tcfg),
                                                                        rngs=nnx.Rngs(0))),
            "vae": ("AutoencoderKLCogVideoX", VAE,
                    lambda: vae_cogvideox.CogVideoXVAEDecoder(vae_cogvideox.CogVideoXVAEConfig.from_dict(VAE),
                                                              dtype=jnp.float32)),
            "text_encoder": text,
        }, SCHEDULER
    if family != "cogvideox":
        raise ValueError(f"Unknown tiny model family {family!r}; use one of {sorted(set(TINY_NAMES.values()))}.")
    tcfg = {**TRANSFORMER, **(transformer or {})}
    return {
        "transformer": ("CogVideoXTransformer3DModel", tcfg,
                        lambda: cogvideox.CogVideoXTransformer3DModel(cogvideox.CogVideoXConfig.from_dict(tcfg),
                                                                      rngs=nnx.Rngs(0))),
        "vae": ("AutoencoderKLCogVideoX", VAE,
                lambda: vae_cogvideox.CogVideoXVAEDecoder(vae_cogvideox.CogVideoXVAEConfig.from_dict(VAE),
                                                          dtype=jnp.float32)),
        "text_encoder": text,
    }, SCHEDULER


def write_configs(folder: str | os.PathLike, family: str = "cogvideox", transformer: dict | None = None) -> dict:
    """Write the configs of a tiny ``family`` model into ``folder`` (diffusers' layout: model_index.json, each
    component's config.json, the scheduler's), no weights: what ``Pipeline.from_config`` builds from. Returns
    :func:`_parts`' {component: (class name, config, module maker)}."""
    folder = Path(folder)
    parts, scheduler = _parts(family, transformer)
    for name, (_, cfg, _) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(model_index(family), indent=2))
    if family == "hunyuanimage":  # the guiders' configs (diffusers' AdaptiveProjectedMixGuidance saves)
        for name, cfg in (("guider", HUNYUANIMAGE_GUIDER), ("ocr_guider", HUNYUANIMAGE_OCR_GUIDER)):
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "guider_config.json").write_text(json.dumps(cfg, indent=2))
    if family == "hunyuan_video15":  # the guider's config (diffusers' ClassifierFreeGuidance save)
        (folder / "guider").mkdir(exist_ok=True)
        (folder / "guider" / "guider_config.json").write_text(json.dumps(HUNYUAN_VIDEO15_GUIDER, indent=2))
    if family == "chronoedit":  # the CLIP image processor's settings
        (folder / "image_processor").mkdir(exist_ok=True)
        (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(WAN_IMAGE_PROCESSOR, indent=2))
    if family.startswith("qwenimage-edit"):  # the image processor's settings (Qwen2VLProcessor's save)
        (folder / "processor").mkdir(exist_ok=True)
        (folder / "processor" / "preprocessor_config.json").write_text(json.dumps(QWEN_EDIT_PROCESSOR, indent=2))
    return parts


# Wan 2.1 image-to-video at tiny size: a 12-channel transformer (noise 4 + mask 4 + image latents 4) taking 16-wide CLIP
# image states (added K/V of the model's width, 24), and a 2-layer CLIP vision tower at 28 x 28 (patch 14: 5 states).
WAN_I2V_TRANSFORMER = dict(WAN_TRANSFORMER, in_channels=12, image_dim=16, added_kv_proj_dim=24)
WAN_IMAGE_ENCODER = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu", projection_dim=8)
WAN_IMAGE_PROCESSOR = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def write_wan_i2v_configs(folder: str | os.PathLike, flf2v: bool = False) -> Path:
    """The configs of a tiny Wan 2.1 image-to-video model (``WanImageToVideoPipeline`` with a CLIP ``image_encoder``
    and its ``image_processor``) in ``folder``; ``flf2v``: first-last-frame (the image embedder's position table over
    two images' 5 states). For ``from_config`` / ``--random-weights`` trials and tests."""
    folder = Path(folder)
    write_configs(folder, "wan", dict(WAN_I2V_TRANSFORMER, pos_embed_seq_len=10 if flf2v else None))
    for name, file, cfg in [("image_encoder", "config.json", WAN_IMAGE_ENCODER),
                            ("image_processor", "preprocessor_config.json", WAN_IMAGE_PROCESSOR)]:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / file).write_text(json.dumps(cfg, indent=2))
    index = dict(model_index("wan"), _class_name="WanImageToVideoPipeline",
                 image_encoder=["transformers", "CLIPVisionModel"],
                 image_processor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# ChronoEdit at tiny size: Wan 2.1 I2V's tiny layout as a ChronoEditTransformer3DModel, heads of 16 (16 % 6 = 4: its
# RoPE's split of the head dim, 6 + 5 + 5, differs from Wan's 8 + 4 + 4 as it would for such a width) and the two
# frames at RoPE positions 0 and 4.
CHRONOEDIT_TRANSFORMER = dict(WAN_I2V_TRANSFORMER, attention_head_dim=16, added_kv_proj_dim=32,
                              rope_temporal_skip_len=5)


TINY_NAMES["tiny-chronoedit"] = "chronoedit"


def write_chronoedit_configs(folder: str | os.PathLike) -> Path:
    """The configs of a tiny ChronoEdit model (``ChronoEditPipeline``: Wan 2.1 I2V's tiny parts, a CLIP
    ``image_encoder`` and its ``image_processor``, :data:`CHRONOEDIT_TRANSFORMER`) in ``folder``. For ``from_config`` /
    ``--random-weights`` trials and tests."""
    folder = write_wan_i2v_configs(folder)
    (folder / "transformer" / "config.json").write_text(json.dumps(CHRONOEDIT_TRANSFORMER, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="ChronoEditPipeline", _diffusers_version="0.36.0",
                 transformer=["diffusers", "ChronoEditTransformer3DModel"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_hunyuan_video15_i2v_configs(folder: str | os.PathLike) -> Path:
    """The configs of a tiny HunyuanVideo-1.5 image-to-video model (``HunyuanVideo15ImageToVideoPipeline``: the
    text-to-video parts, a SigLIP ``image_encoder`` (:data:`HUNYUAN_VIDEO15_SIGLIP`) and its ``feature_extractor``) in
    ``folder``. For ``from_config`` / ``--random-weights`` trials and tests."""
    folder = Path(folder)
    write_configs(folder, "hunyuan_video15")
    size = HUNYUAN_VIDEO15_SIGLIP["image_size"]
    for name, file, cfg in [("image_encoder", "config.json", HUNYUAN_VIDEO15_SIGLIP),
                            ("feature_extractor", "preprocessor_config.json",
                             {"image_processor_type": "SiglipImageProcessor", "size": {"height": size, "width": size},
                              "do_resize": True, "do_rescale": True, "do_normalize": True,
                              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2})]:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / file).write_text(json.dumps(cfg, indent=2))
    index = dict(model_index("hunyuan_video15"), _class_name="HunyuanVideo15ImageToVideoPipeline",
                 image_encoder=["transformers", "SiglipVisionModel"],
                 feature_extractor=["transformers", "SiglipImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# The tiny folders' contents: a folder made by an older version is made again (2: SkyReels-V2's and LTX's VAE
# encoders; 3: FLUX.1's and SD3's, for image-to-image; 4: Chroma's, Qwen-Image's and Wan's, the same)
TINY_VERSION = 4


def make_tiny_model(folder: str | os.PathLike | None = None, seed: int = 0, transformer: dict | None = None,
                    family: str = "cogvideox") -> Path:
    """Write a converted xdit_jax folder holding a tiny random model of ``family`` ("cogvideox" or
    "pixart", "hunyuandit", "mochi"), once; reused after. ``transformer``: overrides of the tiny transformer config."""
    from flax import nnx

    from xdit_jax.checkpoint import save_params
    from xdit_jax.conversion import FORMAT_VERSION, MARKER, staged_folder
    from xdit_jax.keymap import to_pure_dict

    folder = Path(folder) if folder is not None else default_tiny_dir(family)
    if (folder / MARKER).exists():
        try:
            made = json.loads((folder / MARKER).read_text()).get("tiny")
        except (OSError, ValueError):
            made = None
        if made == TINY_VERSION:
            return folder
        # made by an older xdit_jax (a part missing since added, e.g. SkyReels-V2's VAE encoder): made again
    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(folder) as tmp:
        parts = write_configs(tmp, family, transformer)
        for name, (_, cfg, make) in parts.items():
            abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
            save_params(tmp / name / "params", random_params(abstract, seed + len(name)))
        for name, spec in model_index(family).items():
            if name.startswith("tokenizer"):
                encoder = model_index(family).get(name.replace("tokenizer", "text_encoder"), [None, ""])[1]
                stand_in_tokenizer(spec[1], encoder, model_index(family)["_class_name"]).save_pretrained(tmp / name)
        if family == "consisid":  # the CogVideoX VAE's encoder (image-to-video), as conversion writes it
            from xdit_jax.models import vae_cogvideox, vae_cogvideox_encoder

            vcfg = vae_cogvideox.CogVideoXVAEConfig.from_dict(VAE)
            make = vae_cogvideox_encoder.module_fn(vcfg, jnp.float32)
            abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
            save_params(tmp / "vae" / "encoder_params", random_params(abstract, seed + 7))
        if family in (*FLUX_KINDS, "flux2", "sd3", "chroma", "zimage"):  # the VAE's encoder, as conversion writes it
            from xdit_jax.models import vae_flux2, vae_kl, vae_kl_encoder  # (vae/encoder_params)

            vcfg = (vae_flux2.AutoencoderKLFlux2Config.from_dict(FLUX2_VAE) if family == "flux2"
                    else vae_kl.AutoencoderKLConfig.from_dict(SD3_VAE if family == "sd3" else FLUX_VAE))
            make = vae_kl_encoder.module_fn(vcfg)
            abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
            save_params(tmp / "vae" / "encoder_params", random_params(abstract, seed + 7))
        if family in ("skyreels_v2", "ltx", "wan", "sana-video", "cosmos-v2w"):  # the VAE's encoder (SkyReels-V2 DF from an image /
            # a video; LTX I2V; Wan video-to-video; SANA-Video image-to-video)
            from xdit_jax.models import vae_ltx, vae_ltx_encoder, vae_wan, vae_wan_encoder

            make = (vae_ltx_encoder.module_fn(vae_ltx.LTXVAEConfig.from_dict(LTX_VAE)) if family == "ltx"
                    else vae_wan_encoder.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE)))
            abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
            save_params(tmp / "vae" / "encoder_params", random_params(abstract, seed + 7))
        if family == "chronoedit":  # the Wan VAE's encoder (the image to edit)
            from xdit_jax.models import vae_wan, vae_wan_encoder

            make = vae_wan_encoder.module_fn(vae_wan.WanVAEConfig.from_dict(WAN_VAE))
            abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
            save_params(tmp / "vae" / "encoder_params", random_params(abstract, seed + 7))
        if family.startswith("qwenimage"):  # the Wan VAE's encoder (image-to-image, Edit), Qwen2.5-VL's vision tower
            from xdit_jax.models import qwen2_5_vl_vision, vae_qwenimage, vae_wan_encoder  # (Edit)

            for path, make, extra in (
                    ("vae/encoder_params", vae_wan_encoder.module_fn(
                        vae_qwenimage.QwenImageVAEConfig.from_dict(QWEN_IMAGE_VAE)), 7),
                    ("text_encoder/vision_params", lambda: qwen2_5_vl_vision.Qwen25VisionTransformer(
                        qwen2_5_vl_vision.VisionConfig.from_dict(QWEN_EDIT_TEXT_ENCODER)), 8))[
                    :2 if family.startswith("qwenimage-edit") else 1]:
                abstract = to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
                save_params(tmp / path, random_params(abstract, seed + extra))
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT_VERSION, "tiny": TINY_VERSION,
                                              "source": "tiny random",
                                              "components": {k: v[0] for k, v in parts.items()}}))
    return folder


# Wan VACE at tiny size: Wan's tiny transformer with a VACE stack of 2 blocks (hints after layers 0 and 1) taking the
# control latents: inactive 4 + reactive 4 latent channels + the mask folded 8 x 8 into 64.
WAN_VACE_TRANSFORMER = dict(WAN_TRANSFORMER, vace_layers=[0, 1], vace_in_channels=72)


def write_wan_vace_configs(folder: str | os.PathLike) -> Path:
    """The configs of a tiny Wan VACE model (``WanVACEPipeline``: :data:`WAN_VACE_TRANSFORMER` with Wan's tiny UMT5,
    VAE and UniPC) in ``folder``, for ``from_config`` / ``--random-weights`` trials."""
    folder = Path(folder)
    write_configs(folder, "wan", WAN_VACE_TRANSFORMER)
    index = dict(model_index("wan"), _class_name="WanVACEPipeline",
                 transformer=["diffusers", "WanVACETransformer3DModel"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder

# HunyuanVideo image-to-video (latent_concat) shaped: the HunyuanVideo transformer on 4 + 4 + 1 input channels; the
# text encoder a LLaVA of a 2-layer CLIP vision tower 16 wide (32 x 32 images, patch 8: 16 image tokens) and
# HunyuanVideo's tiny Llama (its vocabulary + "<image>", id 275); its template diffusers' with the stand-in
# tokenizer's positions (<image> at 8, the prompt at 122).
HUNYUAN_VIDEO_I2V_TRANSFORMER = dict(HUNYUAN_VIDEO_TRANSFORMER, in_channels=9, image_condition_type="latent_concat")
HUNYUAN_VIDEO_LLAVA_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=16, model_type="clip_vision_model")
HUNYUAN_VIDEO_LLAVA = dict(image_token_index=LLAMA_VOCAB, pad_token_id=5, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")


def hunyuan_video_i2v_template() -> dict:
    """diffusers' HunyuanVideo I2V DEFAULT_PROMPT_TEMPLATE with the stand-in tokenizer's positions."""
    from xdit_jax.pipelines.hunyuan_video_i2v import DEFAULT_PROMPT_TEMPLATE

    n = (HUNYUAN_VIDEO_LLAVA_VISION["image_size"] // HUNYUAN_VIDEO_LLAVA_VISION["patch_size"]) ** 2
    return dict(DEFAULT_PROMPT_TEMPLATE, crop_start=122, image_emb_start=8, image_emb_end=8 + n, image_emb_len=n)


def train_llava_tokenizer():
    """:func:`train_llama_tokenizer` with LLaVA's "<image>" token (id :data:`LLAMA_VOCAB`)."""
    tok = train_llama_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok
