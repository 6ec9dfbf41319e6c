"""Sequence-parallel attention (Ulysses, Ring, USP) equals single-device attention.

Each case builds random global q, k, v with a real length that the sequence degree does not
divide, pads the sequence as the pipeline does, runs :func:`attention` inside
``jax.jit(shard_map(...))`` over a five-axis mesh of simulated CPU devices, drops the padded rows
and compares with :func:`local_attention` on the unpadded global arrays.

Tolerance (fp32): matmuls run at "highest" precision (conftest), so the only differences are the
order of float32 summations: block-wise exp-sums and the log-sum-exp merge of the ring, and the
reassociation of the softmax denominators. Outputs are convex combinations of N(0, 1) values, so
O(1); a few ulp (1.2e-7) per step over a handful of merges gives ~1e-6 (measured 0 to 5e-7).
1e-5 keeps a 20x margin while any mask, chunk-order or head-mapping bug gives errors of O(0.1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xdit_jax.mesh import build_mesh
from xdit_jax.parallel.attention import (
    AttentionConfig,
    _cudnn_attention,
    _xla_attention,
    attention,
    attention_context,
    block_attention,
    current_config,
    local_attention,
    merge_partials,
)

try:
    _shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _shard_map

SEQ = P(("data", "cfg"), ("ring", "ulysses"), None, None)
TOL = 1e-5


def _qkv(b, s, h, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (b, s, h, d), jnp.float32).astype(dtype) for k in ks)


def sharded_attention(spec, q, k, v, *, backend="xla", scale=None):
    """Pad (B, S, H, D) globals to the sequence degree, run attention sharded, return (B, S, H, D)."""
    mesh = build_mesh(spec)
    deg = mesh.shape["ring"] * mesh.shape["ulysses"]
    s = q.shape[1]
    s_pad = -(-s // deg) * deg
    pad = lambda x: jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    cfg = AttentionConfig(mesh=mesh, backend=backend)

    def body(q, k, v):
        with attention_context(cfg):
            return attention(q, k, v, valid_len=s, scale=scale)

    if backend in ("pallas", "mosaic"):  # a kernel's outputs carry no varying-axes type: the pipeline's
        from xdit_jax.parallel.sequence import _shard_map as unchecked  # shard_map, check_vma=False
        fn = jax.jit(unchecked(body, mesh, (SEQ,) * 3, SEQ))
    else:
        fn = jax.jit(_shard_map(body, mesh=mesh, in_specs=(SEQ,) * 3, out_specs=SEQ))
    out = fn(pad(q), pad(k), pad(v))
    assert out.shape == (q.shape[0], s_pad) + q.shape[2:] and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), "padded rows must stay finite"
    return out[:, :s]


CASES = [  # (mesh, batch, real length, heads)
    ("ulysses=2", 2, 37, 4),
    ("ring=2", 2, 37, 4),
    ("ring=3", 2, 37, 4),
    ("ring=2,ulysses=2", 2, 37, 4),
    ("ulysses=4", 2, 37, 6),             # heads not divisible: padded 6 -> 8
    ("ulysses=3", 2, 37, 4),             # heads not divisible: padded 4 -> 6
    ("ring=2,ulysses=3", 2, 37, 4),
    ("data=2,cfg=2,ulysses=2", 4, 37, 4),
    ("ring=4", 2, 9, 4),                 # 9 -> 12: the last ring block is only padding
    ("pipefusion=2,ring=2,ulysses=2", 2, 37, 3),  # an idle axis; 3 heads on ulysses=2
]


@pytest.mark.parametrize("spec,b,s,h", CASES, ids=[c[0] for c in CASES])
def test_matches_single_device(spec, b, s, h):
    q, k, v = _qkv(b, s, h, 16)
    ref = local_attention(q, k, v)
    out = sharded_attention(spec, q, k, v)
    err = float(jnp.max(jnp.abs(out - ref)))
    assert err <= TOL, f"{spec}: max abs diff {err}"


def test_custom_scale():
    q, k, v = _qkv(2, 21, 4, 16, seed=3)
    ref = local_attention(q, k, v, scale=0.37)
    out = sharded_attention("ring=2,ulysses=2", q, k, v, scale=0.37)
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL


def test_bf16_smoke():
    q, k, v = _qkv(2, 37, 4, 16, dtype=jnp.bfloat16, seed=1)
    ref = local_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = sharded_attention("ring=2,ulysses=2", q, k, v)
    assert out.dtype == jnp.bfloat16
    # bf16 inputs and bf16 probabilities into the PV matmul: ~3 significant digits.
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 3e-2


def test_local_valid_len_masks_padding():
    q, k, v = _qkv(2, 40, 4, 16, seed=2)
    ref = local_attention(q[:, :33], k[:, :33], v[:, :33])
    assert current_config().mesh is None
    out = jax.jit(lambda q, k, v: attention(q, k, v, valid_len=33))(q, k, v)
    assert float(jnp.max(jnp.abs(out[:, :33] - ref))) <= TOL
    # A mesh without sequence degrees is the local path too (also inside shard_map).
    out2 = sharded_attention("data=2", q[:, :33], k[:, :33], v[:, :33])
    assert float(jnp.max(jnp.abs(out2 - ref))) <= TOL


def test_merge_partials_is_exact_and_nan_free():
    q, k, v = _qkv(1, 12, 2, 8, seed=4)

    @jax.jit
    def parts(q, k, v):
        ref = local_attention(q, k, v, return_lse=True)
        a = block_attention(q, k[:, :5], v[:, :5], out_dtype=jnp.float32)
        b = block_attention(q, k[:, 5:], v[:, 5:], kv_start=5, out_dtype=jnp.float32)
        empty = block_attention(q, k[:, 5:], v[:, 5:], kv_start=5, valid_len=5, out_dtype=jnp.float32)
        return ref, a, b, empty, merge_partials(*a, *b), merge_partials(*a, *empty), merge_partials(*empty, *empty)

    (ref, ref_lse), a, b, empty, (out, lse), (out2, lse2), (out3, lse3) = parts(q, k, v)
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL
    assert float(jnp.max(jnp.abs(lse - ref_lse))) <= TOL
    # A block that is all padding: out 0, lse -inf; merging it changes nothing, twice is no NaN.
    assert bool(jnp.all(empty[0] == 0)) and bool(jnp.all(jnp.isneginf(empty[1])))
    assert float(jnp.max(jnp.abs(out2 - a[0]))) == 0 and bool(jnp.all(lse2 == a[1]))
    assert bool(jnp.all(out3 == 0)) and bool(jnp.all(jnp.isneginf(lse3)))


def test_dot_product_attention_branch_plumbing():
    """The cuDNN branch's masking/LSE plumbing, run through jax.nn's XLA implementation."""
    q, k, v = _qkv(2, 10, 3, 16, seed=5)
    mask = jnp.arange(10) < 4
    dpa = jax.jit(lambda q, k, v, n: _cudnn_attention(q, k, v, n, 0.25, jnp.float32, True, implementation="xla"))
    ref, ref_lse = jax.jit(_xla_attention, static_argnums=(4, 5))(q, k, v, mask, 0.25, jnp.float32)
    out, lse = dpa(q, k, v, jnp.full((2,), 4, jnp.int32))
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL and float(jnp.max(jnp.abs(lse - ref_lse))) <= TOL
    out0, lse0 = dpa(q, k, v, jnp.zeros((2,), jnp.int32))
    assert bool(jnp.all(out0 == 0)) and bool(jnp.all(jnp.isneginf(lse0)))


def test_needs_shard_map_and_rejects_bad_input():
    q, k, v = _qkv(1, 8, 2, 8)
    with attention_context(AttentionConfig(mesh=build_mesh("ring=2"))):
        with pytest.raises(RuntimeError, match="shard_map"):
            attention(q, k, v, valid_len=8)
        with pytest.raises(ValueError, match="kv_valid"):
            attention(q, k, v, kv_valid=jnp.ones(8, bool))
    with pytest.raises(TypeError, match="static"):
        attention(q, k, v, valid_len=jnp.int32(3))
    with pytest.raises(ValueError, match="backend"):
        AttentionConfig(backend="flash9000")
    np.testing.assert_array_equal(AttentionConfig(mesh=build_mesh("ring=2,ulysses=3")).degree("ulysses"), 3)


def test_resolve_backend():
    """auto: cuDNN flash attention on a GPU in half precision (no (S, S) scores), XLA elsewhere."""
    import jax.numpy as jnp

    from xdit_jax.parallel.attention import resolve_backend

    assert resolve_backend("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert resolve_backend(None, jnp.float16, "cuda") == "cudnn"
    assert resolve_backend("auto", jnp.float32, "gpu") == "xla"
    assert resolve_backend("auto", jnp.bfloat16, "cpu") == "xla"
    assert resolve_backend("xla", jnp.bfloat16, "gpu") == "xla"
    assert resolve_backend("pallas", jnp.float32, "cpu") == "pallas"
    with pytest.raises(ValueError, match="Unknown attention backend"):
        resolve_backend("flash9", jnp.bfloat16, "gpu")


# The Pallas flash kernel (the "pallas" backend) runs in Pallas' interpreter on the CPU: the same
# kernel code the GPU compiles with Triton. Small tiles make several query and key tiles (and a
# partial last tile) at these test sizes. Same fp32 tolerance as above: the kernel's online
# softmax reorders float32 sums only.

PALLAS_CASES = [("ring=2", 2, 37, 4), ("ring=4", 2, 9, 4), ("ulysses=2", 2, 37, 4), ("ring=2,ulysses=2", 2, 37, 3)]


@pytest.mark.parametrize("spec,b,s,h", PALLAS_CASES, ids=[c[0] for c in PALLAS_CASES])
def test_pallas_backend_matches_single_device(spec, b, s, h):
    q, k, v = _qkv(b, s, h, 16, seed=6)
    ref = local_attention(q, k, v)
    out = sharded_attention(spec, q, k, v, backend="pallas")
    err = float(jnp.max(jnp.abs(out - ref)))
    assert err <= TOL, f"{spec}: max abs diff {err}"


@pytest.mark.parametrize("n_valid", [None, 37, 20, 5, 0])
def test_pallas_kernel_lse_and_prefix_mask(n_valid):
    from xdit_jax.parallel.pallas_attention import flash_attention

    q, k, v = _qkv(2, 37, 3, 24, seed=7)  # head dim 24: padded to 32 inside
    mask = None if n_valid is None else jnp.arange(37) < n_valid
    ref, ref_lse = jax.jit(_xla_attention, static_argnums=(4, 5))(q, k, v, mask, 0.3, jnp.float32)
    out, lse = flash_attention(q, k, v, None if n_valid is None else jnp.int32(n_valid), scale=0.3,
                               block_q=16, block_k=16)
    assert out.shape == q.shape and lse.shape == (2, 3, 37)
    if n_valid == 0:  # no valid key: output 0, LSE -inf (what the ring's merge expects)
        assert bool(jnp.all(out == 0)) and bool(jnp.all(jnp.isneginf(lse)))
        return
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL and float(jnp.max(jnp.abs(lse - ref_lse))) <= TOL


def test_pallas_kernel_bf16():
    from xdit_jax.parallel.pallas_attention import flash_attention

    q, k, v = _qkv(1, 40, 2, 64, dtype=jnp.bfloat16, seed=8)
    ref = local_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    out, _ = flash_attention(q, k, v, scale=64 ** -0.5, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    # bf16 probabilities into the PV product, as in the XLA kernel's bf16 path (test_bf16_smoke).
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 3e-2


def test_pallas_kernel_lowers_for_gpu_on_any_host():
    """The GPU path without a GPU: the kernel lowers to a Triton custom call for CUDA (Pallas' Triton
    lowering accepts every op it uses), at the CogVideoX head dim, in bf16, with a traced key count."""
    from xdit_jax.parallel.pallas_attention import flash_attention

    x = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, n: flash_attention(q, k, v, n, scale=0.125, interpret=False))
    text = fn.trace(x, x, x, jax.ShapeDtypeStruct((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


# ----- joint attention with a context every device holds whole (Mochi's two streams) -----

def _joint_reference(q, k, v, cq, ck, cv, c_mask):
    """diffusers' rule, per sample: one softmax over the keys [sequence; unmasked context]."""
    rows = jnp.concatenate([q, cq], axis=1)
    keys, vals = jnp.concatenate([k, ck], axis=1), jnp.concatenate([v, cv], axis=1)
    valid = jnp.concatenate([jnp.ones(k.shape[:2], bool), c_mask], axis=1)
    out = local_attention(rows, keys, vals, kv_valid=valid)
    return out[:, :q.shape[1]], out[:, q.shape[1]:]


def sharded_joint_attention(spec, q, k, v, cq, ck, cv, c_mask, *, backend="xla", with_cq=True, keep_all=False):
    mesh = build_mesh(spec)
    deg = mesh.shape["ring"] * mesh.shape["ulysses"]
    s = q.shape[1]
    s_pad = -(-s // deg) * deg
    pad = lambda x: jnp.pad(x, ((0, 0), (0, s_pad - s), (0, 0), (0, 0)))
    cfg = AttentionConfig(mesh=mesh, backend=backend)
    ctx = P(("data", "cfg"), None, None, None)
    cm = P(("data", "cfg"), None)

    def body(q, k, v, cq, ck, cv, c_mask):
        with attention_context(cfg):
            return attention(q, k, v, valid_len=s, context=(cq if with_cq else None, ck, cv,
                                                            None if keep_all else c_mask))

    from xdit_jax.parallel.sequence import _shard_map as unchecked  # the pipeline's shard_map
    out_c_spec = ctx if with_cq else None
    fn = jax.jit(unchecked(body, mesh, (SEQ,) * 3 + (ctx,) * 3 + (cm,), (SEQ, out_c_spec)))
    out, out_c = fn(pad(q), pad(k), pad(v), cq, ck, cv, c_mask)
    assert out.shape == (q.shape[0], s_pad) + q.shape[2:]
    return out[:, :s], out_c


def _joint_inputs(b, s, sc, h, d=16, seed=11):
    q, k, v = _qkv(b, s, h, d, seed=seed)
    cq, ck, cv = _qkv(b, sc, h, d, seed=seed + 1)
    lengths = np.array([3, sc, 0, 5][:b])  # prefix masks as T5 makes them; one sample with no caption
    c_mask = jnp.asarray(np.arange(sc)[None] < lengths[:, None])
    return q, k, v, cq, ck, cv, c_mask


JOINT_CASES = [("one", 2), ("ulysses=2", 2), ("ring=2", 2), ("ring=3", 2), ("ulysses=3", 2),
               ("ring=2,ulysses=2", 2), ("data=2,ring=2", 4), ("ring=4", 2)]


@pytest.mark.parametrize("spec,b", JOINT_CASES, ids=[c[0] for c in JOINT_CASES])
def test_joint_attention_matches_single_device(spec, b):
    """Sequence rows and context rows equal one softmax over [sequence; valid context] keys, on every
    mesh, with a real length the degree does not divide, heads not divisible by ulysses=3, ring=4's
    last block only padding, and a sample whose caption is fully masked."""
    s = 9 if spec == "ring=4" else 37
    inputs = _joint_inputs(b, s, 7, 4)
    ref, ref_c = _joint_reference(*inputs)
    if spec == "one":
        out, out_c = jax.jit(lambda *a: attention(*a[:3], context=a[3:]))(*inputs)
    else:
        out, out_c = sharded_joint_attention(spec, *inputs)
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL, spec
    assert float(jnp.max(jnp.abs(out_c - ref_c))) <= TOL, spec


@pytest.mark.parametrize("spec,backend", [("one", "xla"), ("ring=2,ulysses=2", "xla"), ("ulysses=2", "pallas")])
def test_joint_attention_with_every_context_key_kept(spec, backend):
    """No context mask (None: SD3's and FLUX's text) is the all-true mask, each backend's kernel used as it is."""
    q, k, v, cq, ck, cv, _ = _joint_inputs(2, 37, 7, 4, seed=7)
    full = jnp.ones(ck.shape[:2], bool)
    ref, ref_c = _joint_reference(q, k, v, cq, ck, cv, full)
    if spec == "one":
        out, out_c = jax.jit(lambda *a: attention(*a[:3], context=(*a[3:], None)))(q, k, v, cq, ck, cv)
    else:
        out, out_c = sharded_joint_attention(spec, q, k, v, cq, ck, cv, full, backend=backend, keep_all=True)
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL and float(jnp.max(jnp.abs(out_c - ref_c))) <= TOL


def test_joint_attention_without_context_queries_and_pallas():
    inputs = _joint_inputs(2, 37, 7, 3, seed=5)
    ref, _ = _joint_reference(*inputs)
    out, out_c = sharded_joint_attention("ring=2,ulysses=2", *inputs, with_cq=False)
    assert out_c is None and float(jnp.max(jnp.abs(out - ref))) <= TOL
    out, out_c = sharded_joint_attention("ring=2", *inputs, backend="pallas")
    assert float(jnp.max(jnp.abs(out - ref))) <= TOL


def test_joint_attention_rejects_bad_context():
    q, k, v, cq, ck, cv, c_mask = _joint_inputs(2, 8, 5, 2)
    with pytest.raises(ValueError, match="context mask must be bool"):
        attention(q, k, v, context=(cq, ck, cv, c_mask.astype(jnp.int32)))
    with pytest.raises(ValueError, match="context q/k/v"):
        attention(q, k, v, context=(cq, ck[:, :, :1], cv, c_mask))
    with pytest.raises(ValueError, match="kv_valid"):
        attention(q, k, v, kv_valid=jnp.ones(8, bool), context=(cq, ck, cv, c_mask))


def test_joint_attention_cudnn_branch_plumbing(monkeypatch):
    """backend="cudnn" (the sequence blocks and the caption partial, whose keys are reordered so the kept
    ones lead), run through jax.nn's XLA implementation; a non-prefix caption mask and an empty one."""
    import functools

    from xdit_jax.parallel import attention as attn_mod

    monkeypatch.setattr(attn_mod, "_cudnn_attention",
                        functools.partial(attn_mod._cudnn_attention, implementation="xla"))
    q, k, v, cq, ck, cv, _ = _joint_inputs(3, 37, 7, 4, seed=9)
    c_mask = jnp.asarray(np.array([[1, 0, 1, 1, 0, 0, 1], [0] * 7, [1] * 7], bool))
    ref, ref_c = _joint_reference(q, k, v, cq, ck, cv, c_mask)
    for spec in ("one", "ring=2,ulysses=2")[:1 if len(jax.devices()) < 4 else 2]:  # one GPU: no mesh
        if spec == "one":
            cfg = AttentionConfig(backend="cudnn")
            with attention_context(cfg):
                out, out_c = jax.jit(lambda *a: attention(*a[:3], context=a[3:]))(q, k, v, cq, ck, cv, c_mask)
        else:
            out, out_c = sharded_joint_attention(spec, q, k, v, cq, ck, cv, c_mask, backend="cudnn")
        assert float(jnp.max(jnp.abs(out - ref))) <= TOL, spec
        assert float(jnp.max(jnp.abs(out_c - ref_c))) <= TOL, spec


def _cross_inputs(seed=4, b=3, sq=37, sk=7, h=3, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, sq, h, d), (b, sk, h, d), (b, sk, h, d)))
    mask = jnp.asarray(np.array([[1, 0, 1, 1, 0, 0, 1], [0] * 7, [1] * 7], bool)[:b, :sk])
    return q, k, v, mask


def _cross_reference(q, k, v, mask):
    """float64 numpy: softmax over the kept keys; a row with none kept gives 0."""
    q, k, v, m = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = np.where(m[:, None, None, :] > 0, s, -np.inf)
    p = np.exp(s - np.max(s, -1, keepdims=True, initial=-1e300))
    with np.errstate(invalid="ignore"):  # a row with no key kept: 0 / 0, then 0
        p = np.nan_to_num(p / np.sum(p, -1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_cross_attention_cudnn_branch_plumbing(monkeypatch):
    """backend="cudnn" in bf16: the caption mask as cuDNN's additive bias (run through jax.nn's XLA
    implementation here), a non-prefix mask and an empty one (0), against float64; and the XLA path."""
    import functools

    from xdit_jax.parallel import attention as attn_mod

    monkeypatch.setattr(attn_mod, "_cudnn_masked", functools.partial(attn_mod._cudnn_masked, implementation="xla"))
    q, k, v, mask = _cross_inputs()
    ref = _cross_reference(q, k, v, mask)
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    for backend in ("cudnn", "xla"):
        with attention_context(AttentionConfig(backend=backend)):
            out = jax.jit(lambda q, k, v, m: attn_mod.cross_attention(q, k, v, kv_mask=m))(*bf, mask)
            unmasked = jax.jit(lambda q, k, v: attn_mod.cross_attention(q, k, v))(*bf)
        assert out.dtype == jnp.bfloat16
        # bf16 inputs and output: |out| <= 3.5 here, bf16's relative step 2^-8 -> 0.03 at most
        assert float(np.max(np.abs(np.asarray(out, np.float64) - ref))) < 3e-2, backend
        assert not np.any(np.asarray(out[1], np.float32)), backend  # no key kept: 0
        full = _cross_reference(q, k, v, np.ones(mask.shape, bool))
        assert float(np.max(np.abs(np.asarray(unmasked, np.float64) - full))) < 3e-2, backend


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cross_attention_cudnn_on_gpu():
    """On a GPU: the masked cross-attention through cuDNN (bf16) against float64."""
    from xdit_jax.parallel.attention import cross_attention

    q, k, v, mask = _cross_inputs(b=3, sq=256, sk=7, h=4, d=72)
    with attention_context(AttentionConfig(backend="cudnn")):
        out = jax.jit(lambda *a: cross_attention(*a[:3], kv_mask=a[3]))(*(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                                                       mask)
    assert float(np.max(np.abs(np.asarray(out, np.float64) - _cross_reference(q, k, v, mask)))) < 3e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_lse_is_float32_on_gpu():
    """On a GPU: the cuDNN kernel's LSE comes in float32 (not rounded to bf16), so the joint attention's
    merge of the sequence and caption partials is as accurate in bf16 as the XLA kernel's."""
    from xdit_jax.parallel.attention import _cudnn_f32_lse

    q, k, v, cq, ck, cv, c_mask = _joint_inputs(2, 256, 64, 4, d=128, seed=3)
    bf = lambda *xs: tuple(x.astype(jnp.bfloat16) for x in xs)  # noqa: E731
    res = jax.jit(lambda q, k, v: _cudnn_f32_lse(q, k, v, None, 128 ** -0.5))(*bf(q, k, v))
    assert res is not None and res[1].dtype == jnp.float32
    _, ref_lse = local_attention(q, k, v, return_lse=True)
    assert float(jnp.max(jnp.abs(res[1] - ref_lse))) < 1e-2  # bf16 inputs; an LSE rounded to bf16 is off by 0.06
    ref, _ = _joint_reference(q, k, v, cq, ck, cv, c_mask)
    errs = {}
    for backend in ("xla", "cudnn"):
        with attention_context(AttentionConfig(backend=backend)):
            out, _ = jax.jit(lambda *a: attention(*a[:3], context=a[3:]))(*bf(q, k, v, cq, ck, cv), c_mask)
        errs[backend] = float(jnp.mean(jnp.abs(out.astype(jnp.float32) - ref)))
    assert errs["cudnn"] <= 1.5 * errs["xla"], errs


# ----- the "mosaic" backend (jax's FlashAttention-3 Mosaic GPU kernel; its reference stands in off a GPU) -----
# What is checked here is everything around the kernel: its shape contract (float16, head_dim % 64, key and
# query tiles: the stand-in refuses anything else), the scale folded into q, the split of each block's valid
# keys into whole key tiles (the kernel) and a remainder (the XLA kernel) merged by the LSE, the base-2 LSE,
# empty blocks, and the ring's traced block offsets (one branch per count of valid keys). Inputs are rounded
# to float16 first, so the only error left is the kernel's float16 output (half an ulp, 2^-11 relative),
# rounded once per partial before the ring's float32 merge: tolerance 2^-10 of the largest output. A mask or
# offset bug gives errors of O(0.1). Key blocks of 64+ keys so that the kernel part runs (tiles 64 x 64).

def _fp16_qkv(b, s, h, d, seed):
    return tuple(x.astype(jnp.float16).astype(jnp.float32) for x in _qkv(b, s, h, d, seed=seed))


@pytest.fixture
def mosaic_tiles(monkeypatch):
    from xdit_jax.parallel import mosaic_attention

    monkeypatch.setattr(mosaic_attention, "DEFAULT_TILES", mosaic_attention.Tiles(64, 64, 2))
    return mosaic_attention


def test_mosaic_kernel_prefix_counts_and_lse():
    from xdit_jax.parallel.mosaic_attention import Tiles, fa3_attention

    q, k, v = _fp16_qkv(2, 150, 3, 16, seed=12)  # head dim 16: padded to 64 inside
    for n in (None, 128, 100, 63, 0):  # whole tiles only, tiles + remainder, remainder only, nothing
        mask = None if n is None else jnp.arange(150) < n
        ref, ref_lse = _xla_attention(q, k, v, mask, 0.25, jnp.float32)
        out, lse = fa3_attention(q, k, v, n, scale=0.25, out_dtype=jnp.float32, tiles=Tiles(64, 64, 2))
        assert out.shape == q.shape and lse.shape == (2, 3, 150)
        if n == 0:
            assert bool(jnp.all(out == 0)) and bool(jnp.all(jnp.isneginf(lse)))
            continue
        tol = 2.0 ** -10 * float(jnp.max(jnp.abs(ref))) + TOL
        assert float(jnp.max(jnp.abs(out - ref))) <= tol, n
        assert float(jnp.max(jnp.abs(lse - ref_lse))) <= TOL, n
    with pytest.raises(ValueError, match="multiples of 64"):
        Tiles(96, 32)
    assert Tiles.parse("128x128x3") == Tiles(128, 128, 3)


MOSAIC_CASES = [("one", 149), ("ulysses=2", 149), ("ring=2", 149), ("ring=3", 200), ("ring=4", 200),
                ("ring=2,ulysses=2", 149)]


@pytest.mark.parametrize("spec,s", MOSAIC_CASES, ids=[c[0] for c in MOSAIC_CASES])
def test_mosaic_backend_matches_single_device(spec, s, mosaic_tiles):
    """ring=3 (200 -> 201): a last block with one padded key; ring=4 (200 -> 280, blocks of 70): blocks of
    70, 70, 60 and 0 valid keys."""
    q, k, v = _fp16_qkv(2, s, 3, 16, seed=13)
    ref = local_attention(q, k, v)
    if spec == "one":
        with attention_context(AttentionConfig(backend="mosaic")):
            out = jax.jit(lambda *a: attention(*a))(q, k, v)
    else:
        out = sharded_attention(spec, q, k, v, backend="mosaic")
    tol = 2.0 ** -10 * float(jnp.max(jnp.abs(ref))) + TOL
    assert float(jnp.max(jnp.abs(out - ref))) <= tol, spec


def test_mosaic_ring_over_pipefusion_counts(mosaic_tiles):
    """PipeFusion's ring over its buffers: each ring position's block has its own count of valid leading
    keys (static), the block offsets traced."""
    from xdit_jax.parallel.attention import _ring_attention
    from xdit_jax.parallel.sequence import _shard_map as unchecked

    counts = (70, 50)
    q, k, v = _fp16_qkv(2, 160, 3, 16, seed=14)  # two blocks of 80 keys
    mesh = build_mesh("ring=2")
    body = lambda q, k, v: _ring_attention(q, k, v, ring=2, valid_len=None, scale=None, backend="mosaic",  # noqa
                                           counts=counts)
    out = jax.jit(unchecked(body, mesh, (SEQ,) * 3, SEQ))(q, k, v)
    keep = jnp.concatenate([jnp.arange(80) < counts[0], jnp.arange(80) < counts[1]])
    ref = local_attention(q, k, v, kv_valid=keep)
    tol = 2.0 ** -10 * float(jnp.max(jnp.abs(ref))) + TOL
    assert float(jnp.max(jnp.abs(out - ref))) <= tol


def test_mosaic_joint_attention(mosaic_tiles):
    """Mochi's joint attention under the mosaic backend: a masked caption (the XLA kernel off a GPU, cuDNN
    on one) and a caption with every key kept (the kernel)."""
    q, k, v, cq, ck, cv, c_mask = (x if x.dtype == jnp.bool_ else x.astype(jnp.float16).astype(jnp.float32)
                                   for x in _joint_inputs(2, 149, 7, 3, seed=15))
    full = jnp.ones(ck.shape[:2], bool)
    for mask, keep_all in ((c_mask, False), (full, True)):
        ref, ref_c = _joint_reference(q, k, v, cq, ck, cv, mask)
        out, out_c = sharded_joint_attention("ring=2,ulysses=2", q, k, v, cq, ck, cv, mask, backend="mosaic",
                                             keep_all=keep_all)
        tol = 2.0 ** -10 * max(float(jnp.max(jnp.abs(ref))), float(jnp.max(jnp.abs(ref_c)))) + TOL
        assert float(jnp.max(jnp.abs(out - ref))) <= tol and float(jnp.max(jnp.abs(out_c - ref_c))) <= tol


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU kernel needs an H100/H200")
def test_mosaic_kernel_on_gpu():
    """On a Hopper GPU: jax's FlashAttention-3 kernel through our plumbing (bf16, CogVideoX's head dim 64, a
    padded sequence whose valid keys end mid-tile) against float32, and its LSE."""
    q, k, v = _qkv(2, 1000, 4, 64, seed=16)
    bf = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = jnp.arange(1000) < 990
    ref, ref_lse = _xla_attention(q, k, v, mask, 0.125, jnp.float32)
    out, lse = jax.jit(lambda q, k, v: block_attention(q, k, v, valid_len=990, scale=0.125, backend="mosaic",
                                                       out_dtype=jnp.float32))(*bf)
    assert float(jnp.max(jnp.abs(out - ref))) < 2e-2  # bf16 inputs
    assert float(jnp.max(jnp.abs(lse - ref_lse))) < 2e-2
