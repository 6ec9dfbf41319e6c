# The GPU measurements still pending (issue 4), for a lent H100 / H200, one device call per part (each under
# the 10-minute limit of a call, most important first; 30 device-minutes do not cover all four). Run from the repository root on the device machine:
#
#     bash scripts/gpu_session.sh 1        # then 2, 3, ..., 17
#
# It installs a diffusers wheel from out/wheels (carry that folder: the machine reaches no registry), runs each
# command under its own timeout, prints the tables and tars every output into $OUT/partN.tgz after each
# command (a call returns at most 8 files; what finished before a timeout still comes back).
set -u
part=${1:?usage: bash scripts/gpu_session.sh 1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
O=/tmp/gpu-part$part; mkdir -p "$O"; OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index out/wheels/diffusers-*.whl 2>&1 | tail -2
python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, jaxlib.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
save() { tar czf "$OUT/part$part.tgz" -C "$O" .; }
step() {  # step NAME TIMEOUT benchmark.py-step-args...
  n=$1; t=$2; shift 2; echo "== $n"
  timeout "$t" python3 scripts/benchmark.py step "$@" --json > "$O/$n.jsonl" 2> "$O/$n.log"; echo "rc=$?"
  grep -A8 "^mesh" "$O/$n.log" | grep -v "^per row"; grep -E "check |skipped|Error|error:" "$O/$n.log" | head -5; save
}
case $part in
1)  # the mosaic backend (jax's FlashAttention-3 kernel): correctness, the kernel alone; the 5B step with it and
    # with unstacked weights (no per-layer weight copies out of the stacked arrays; compiles unrolled: slow)
  echo "== GPU-only tests"
  JAX_PLATFORMS=cuda,cpu timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_parallel_attention.py \
      -k "mosaic or cudnn or cross" 2>&1 | tail -6
  echo "== attention kernels at the 5B layer (B,S,H,D = 2,17776,48,64)"
  timeout 150 python3 scripts/bench_attention.py --steps 10 > "$O/attn.txt" 2> "$O/attn.log"; echo "rc=$?"
  grep -E "skipped|Error" "$O/attn.log" | head -8; cat "$O/attn.txt"; save
  step 5b 300 --model cogvideox-5b --steps 5 --variant mosaic:backend=mosaic --variant unstacked:scan=unstacked
  ;;
2)  # FLUX.1-dev and SD3.5 Large: the weight copies were 11 % / 9 % of their steps; head_dim 128 under mosaic
  step flux 300 --model flux.1-dev --steps 5 --variant mosaic:backend=mosaic --variant unstacked:scan=unstacked
  step sd35 240 --model sd3.5-large --steps 5 --variant mosaic:backend=mosaic --variant unstacked:scan=unstacked
  ;;
3)  # never run on a GPU: Mochi end to end (the VAE decode's compile-OOM fallback to tiles), FLUX.1-schnell; 2B
  step mochi-e2e 300 --model mochi-1-preview --steps 0 --e2e 2
  step schnell-e2e 150 --model flux.1-schnell --steps 3 --e2e 4
  step 2b 120 --model cogvideox-2b --steps 5 --variant mosaic:backend=mosaic
  ;;
4)  # PixArt-alpha against diffusers; Mochi's step under mosaic (head_dim 128, the joint caption on cuDNN)
  step alpha-vs 120 --model pixart-alpha-1024 --steps 5 --compare diffusers
  step mochi 240 --model mochi-1-preview --layers 8 --steps 3 --variant mosaic:backend=mosaic
  ;;
5)  # image-to-video, never run on a GPU (session 14): CogVideoX-5b-I2V end to end (the VAE encoder, bf16) and Wan 2.1
    # I2V-14B-480P's step (attn2 also over 257 CLIP image states) and end to end (the CLIP tower in float32)
  step cog-i2v-e2e 300 --model cogvideox-5b-i2v --steps 3 --e2e 2
  step wan21-i2v 270 --model wan2.1-i2v-14b-480p --steps 3 --e2e 1
  ;;
6)  # the families of session 15, never run on a GPU: Latte-1 against diffusers and end to end (the frames decoded
    # over the mesh); HunyuanVideo at full width with 4 double + 4 single blocks, then end to end at 544 x 960 x 61
  step latte-vs 240 --model latte-1 --steps 5 --compare diffusers
  step latte-e2e 150 --model latte-1 --steps 0 --e2e 2
  step hyv 180 --model hunyuanvideo --layers 4 --steps 3
  step hyv-e2e 300 --model hunyuanvideo --height 544 --width 960 --frames 61 --steps 0 --e2e 2
  ;;
7)  # the image families of session 16, never run on a GPU: Qwen-Image (20 of its 60 blocks beside diffusers' copy:
    # both in bf16 would not fit whole), Z-Image-Turbo against diffusers
  step qwen-vs 300 --model qwen-image --layers 20 --steps 3 --compare diffusers
  step zimage-vs 240 --model z-image-turbo --steps 5 --compare diffusers
  ;;
8)  # SANA 1600M against diffusers (linear attention, the grid conv) and end to end (Gemma 2, DC-AE); FLUX.1
    # Kontext-dev's step (4096 + 4096 image tokens at 1024 px)
  step sana-vs 180 --model sana-1600m-1024px --steps 5 --compare diffusers
  step sana-e2e 150 --model sana-1600m-1024px --steps 0 --e2e 2
  step kontext 240 --model flux.1-kontext-dev --steps 3
  ;;
9)  # Chroma1-HD, never run on a GPU: the full model against diffusers (both CFG halves; diffusers on the text cropped
    # to the kept tokens, as our key mask computes), then its step under mosaic
  step chroma-vs 300 --model chroma1-hd --steps 5 --compare diffusers
  step chroma 240 --model chroma1-hd --steps 3 --variant mosaic:backend=mosaic
  ;;
10) # Lumina-Image 2.0 (session 17), never run on a GPU: its step against diffusers (CFG: 2 samples, 4096 image + 128
    # caption tokens) and end to end (Gemma 2 with the system prompt, FLUX's VAE)
  step lumina2-vs 240 --model lumina-image-2.0 --steps 5 --compare diffusers
  step lumina2-e2e 150 --model lumina-image-2.0 --steps 0 --e2e 2
  ;;
11) # the session-18 families, never run on a GPU: SkyReels-V2 DF 1.3B (a timestep per latent frame, causal blocks
    # of 5 frames over 51,000 tokens: the segment mask on the XLA path) against diffusers; Qwen-Image-Edit-2511 (4096
    # noisy + 4096 condition tokens, zero_cond_t; 20 of 60 blocks beside diffusers' copy); Sana Sprint end to end
  step skyreels-vs 300 --model skyreels-v2-df-1.3b-540p --steps 3 --compare diffusers
  step edit-vs 240 --model qwen-image-edit-2511 --layers 20 --steps 3 --compare diffusers
  step sprint-e2e 120 --model sana-sprint-1.6b-1024px --steps 3 --e2e 2
  ;;
12) # the session-19 families, never run on a GPU: LTX-Video 0.9.1 (7,392 tokens: a light step) and ConsisID (CogVideoX-5B
    # I2V + the face branch) against diffusers, end to end for LTX (its 32x VAE with timestep conditioning);
    # HunyuanVideo-1.5 480p with 12 of its 54 blocks (49,290 video tokens)
  step ltx-vs 240 --model ltx-video-0.9.1 --steps 5 --compare diffusers
  step ltx-e2e 150 --model ltx-video-0.9.1 --steps 0 --e2e 2
  step consisid-vs 240 --model consisid-preview --steps 3 --compare diffusers
  step hv15 240 --model hunyuanvideo-1.5-480p --layers 12 --steps 3
  ;;
13) # the session-22 rows, never run on a GPU: HunyuanImage-2.1 at 2048 x 2048 (4,096 image + 1,128 text tokens, CFG) with
    # 10 + 10 of its 20 + 40 blocks beside diffusers' copy (17.4B in bf16 twice would not fit), then its full step
    # alone; Kandinsky 5.0 T2V Lite 5 s at 512 x 768 (47,616 visual tokens, CFG; diffusers called per half)
  step hyimage-vs 300 --model hunyuanimage-2.1 --layers 10 --steps 3 --compare diffusers
  step hyimage 180 --model hunyuanimage-2.1 --steps 3
  step k5-vs 300 --model kandinsky5-t2v-lite-5s --steps 3 --compare diffusers
  ;;
14) # the session-22 video rows, never run on a GPU: SANA-Video 2B at 81 x 480 x 832 (32,760 video + 300 Gemma tokens,
    # CFG; linear attention, the frame conv) against diffusers; Wan2.1-VACE-14B at 81 x 480 x 832 (32,760 video + 512
    # UMT5 tokens, CFG, random control latents) with 20 of its 40 blocks (VACE blocks after 0, 5, 10, 15) beside
    # diffusers' copy (its 17.3B in bf16 twice would not fit), then its full step (40 + 8 VACE blocks) alone
  step sanavideo-vs 300 --model sana-video-2b-480p --steps 3 --compare diffusers
  step vace-vs 300 --model wan2.1-vace-14b --layers 20 --steps 3 --compare diffusers
  step vace 240 --model wan2.1-vace-14b --steps 3
  ;;
15) # the session-23 image row, never run on a GPU: HiDream-I1-Full at 1024 x 1024 (4,096 image + 128 T5 + 128 Llama
    # tokens, CFG; the mixture of experts run densely) with 8 + 8 of its 16 + 32 blocks beside diffusers' copy (6.0B a
    # side: its 17.1B in bf16 twice would not fit), then its full step (34 GB of bf16 weights) alone
  step hidream-vs 300 --model hidream-i1-full --layers 8 --steps 3 --compare diffusers
  step hidream 240 --model hidream-i1-full --steps 3
  ;;
16) # the session-23 Cosmos-Predict2 rows, never run on a GPU: 2B Text2Image at 768 x 1360 (4,080 image + 512 T5 tokens,
    # CFG) against diffusers; 2B Video2World at 93 x 704 x 1280 (84,480 video tokens, a timestep per latent frame, CFG:
    # 3.85 PFLOP a step, 86 % attention) with 7 of its 28 blocks beside diffusers' copy (diffusers' SDPA on 84,480
    # tokens: minutes a step)
  step cosmos-t2i-vs 240 --model cosmos-predict2-2b-text2image --steps 5 --compare diffusers
  step cosmos-v2w-vs 300 --model cosmos-predict2-2b-video2world --layers 7 --steps 3 --compare diffusers
  ;;
17) # the session-23 LongCat-Image row, never run on a GPU: 1024 x 1024 (4,096 image + 512 Qwen2.5-VL tokens, CFG; FLUX's
    # blocks, 10 + 20) against diffusers; then Cosmos-Predict2 2B Video2World's full step (28 blocks) alone
  step longcat-vs 240 --model longcat-image --steps 5 --compare diffusers
  step cosmos-v2w 300 --model cosmos-predict2-2b-video2world --steps 3
  ;;
*) echo "unknown part $part: use 1 to 17"; exit 2 ;;
esac
ls -la "$O"
