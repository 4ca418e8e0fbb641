"""The quantized Metal kernels (`kernels/qmv.py`), checked without a Mac.

The real kernel texts are compiled with g++ against tests/stand_in_metal.h, whose threadgroups
run as lock-step simdgroups with threadgroup memory and barriers, and compared with
`qmv.quantized_reference` (mx.quantized_matmul accumulating in float32) over bits x group sizes
x dtypes x rows x shapes and the edge cases of the packing; deliberately broken texts must
fail. Where the kernels run (`kernels/linear.py`: the plan, the self-check, the timing against
MLX's path) is tested with stand-in kernel objects. On a Mac the real kernels are compared too.

Each kernel text is compiled once, for every instance the module uses (`*_INSTANCES`).
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from apertus_mlx.kernels import linear, metal, qk_rope, qmv
from apertus_mlx.plan import KernelRecord, Plan
from tests import metal_stand_in as stand_in
from tests.metal_stand_in import cpu_plan, metal_plan

# `apertus_mlx.kernels.xielu` the attribute is the function; the module comes from importlib.
xk = importlib.import_module("apertus_mlx.kernels.xielu")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
QMV_TYPES = {"x": "T*", "w": "uint32_t*", "scales": "S*", "biases": "S*"}
XIELU_TYPES = {**QMV_TYPES, "a_p": "float&", "a_n": "float&", "beta": "float&", "eps": "float&"}
QKV_TYPES = {
    **QMV_TYPES,
    "q_norm": "T*",
    "k_norm": "T*",
    "inv_freq": "float*",
    "eps": "float&",
    "offset": "int32_t&",
}

# (x dtype, scales dtype, bits, group, rows of x, output rows N, input dims K). K = 384 is 48
# chunks of 8: the second simdgroup of a threadgroup works a partial round; K = 96 leaves it
# idle; K = 2048 takes four rounds. N is odd or below a threadgroup's 4 rows.
QMV_CASES = [
    *[(BF16, BF16, bits, group, 1, 13, 384) for bits in qmv.BITS for group in qmv.GROUPS],
    *[(dtype, dtype, bits, 64, 1, 7, 320) for dtype in (F32, F16) for bits in (3, 4, 6)],
    *[(BF16, BF16, 3, 32, rows, 33, 96) for rows in (2, 3, 5, 8)],
    (F16, F16, 6, 128, 8, 5, 1024),
    (F32, BF16, 3, 64, 2, 9, 640),  # float32 activations over bfloat16 scales
    (BF16, BF16, 4, 128, 1, 4, 2048),
    (F32, F32, 8, 32, 1, 1, 64),
]
# (x dtype, bits, group, rows, N, K)
XIELU_CASES = [
    (BF16, 3, 64, 1, 13, 384),
    (F16, 4, 32, 3, 7, 320),
    (F32, 6, 128, 2, 9, 384),
    (BF16, 4, 64, 8, 5, 256),
]
# (x dtype, bits, group, batch, length, head_dim, heads, kv_heads, K, offset)
QKV_CASES = [
    (BF16, 4, 64, 1, 1, 128, 4, 2, 384, 69999),
    (F16, 3, 32, 1, 4, 64, 4, 1, 320, 0),
    (F32, 6, 128, 2, 3, 64, 2, 2, 384, 4093),
    (BF16, 3, 64, 8, 1, 128, 2, 1, 256, 12),
    (F32, 4, 32, 1, 2, 24, 4, 2, 96, 7),  # head_dim below a pass of the simdgroups' rows
]


def _qmv_launch(x, out_dims, bits, group, scales_dtype):
    return qmv.qmv_geometry(
        x.shape, x.dtype, out_dims=out_dims, bits=bits, group=group, scales_dtype=scales_dtype
    )


def _instance_of(launch: dict) -> tuple:
    return tuple(launch["template"])


QMV_INSTANCES = sorted(
    {
        _instance_of(_qmv_launch(mx.zeros((rows, k), dtype), n, bits, group, sdtype))
        for dtype, sdtype, bits, group, rows, n, k in QMV_CASES
    },
    key=str,
)
XIELU_INSTANCES = sorted(
    {
        _instance_of(_qmv_launch(mx.zeros((rows, k), dtype), n, bits, group, dtype))
        for dtype, bits, group, rows, n, k in XIELU_CASES
    },
    key=str,
)


def _qkv_launch(x, bits, group, head_dim, heads, kv_heads, scales_dtype):
    return qmv.qkv_geometry(
        x.shape,
        x.dtype,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        bits=bits,
        group=group,
        scales_dtype=scales_dtype,
    )


QKV_INSTANCES = sorted(
    {
        _instance_of(_qkv_launch(mx.zeros((b, length, k), dt), bits, g, d, h, kv, dt))
        for dt, bits, g, b, length, d, h, kv, k, _ in QKV_CASES
    },
    key=str,
)


# --- running the texts with g++ -------------------------------------------------------------------


def _qmv_gpp(x, w, s, b, bits, group, source=None, instances=None):
    program = stand_in.compile_kernel(
        qmv.QMV, QMV_TYPES, source=source, instances=instances or QMV_INSTANCES
    )
    [out] = program([x, w, s, b], _qmv_launch(x, w.shape[0], bits, group, s.dtype))
    return out


def _xielu_gpp(x, w, s, b, bits, group, consts):
    program = stand_in.compile_kernel(qmv.QMV_XIELU, XIELU_TYPES, instances=XIELU_INSTANCES)
    [out] = program([x, w, s, b, *consts], _qmv_launch(x, w.shape[0], bits, group, s.dtype))
    return out


def _qkv_gpp(args, source=None, instances=None):
    x, w, s, b, bits, group, q_norm, k_norm, eps, offset, inv_freq, heads, kv_heads = args
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    program = stand_in.compile_kernel(
        qmv.QKV_ROPE, QKV_TYPES, source=source, instances=instances or QKV_INSTANCES
    )
    scalars = [mx.array(eps, dtype=F32), mx.array(offset, dtype=mx.int32)]
    launch = _qkv_launch(x, bits, group, head_dim, heads, kv_heads, s.dtype)
    return program([x, w, s, b, q_norm, k_norm, inv_freq, *scalars], launch)


def _assert_qmv(got, x, w, s, b, bits, group):
    want = qmv.quantized_reference(x, w, s, b, bits, group)
    assert got.shape == want.shape and got.dtype == want.dtype
    ok = np.array(qmv.agrees(got, want, qmv.magnitude(x, w, s, b, bits, group)))
    g, v = (np.array(a.astype(F32)) for a in (got, want))
    where = np.argwhere(~ok)[:5].tolist()
    assert ok.all(), f"{(~ok).sum()} of {ok.size} differ at {where}: {g[~ok][:5]} vs {v[~ok][:5]}"


def _fails(got, x, w, s, b, bits, group) -> float:
    """Fraction of outputs that disagree with the reference."""
    want = qmv.quantized_reference(x, w, s, b, bits, group)
    ok = np.array(qmv.agrees(got, want, qmv.magnitude(x, w, s, b, bits, group)))
    return 1.0 - ok.mean()


def pack(values: np.ndarray, bits: int) -> mx.array:
    """Integers (N, K) < 2**bits as MLX packs them: one little-endian bit stream per row."""
    n, k = values.shape
    words = np.zeros((n, k * bits // 32 + 1), np.uint64)
    for i in range(k):
        bit = i * bits
        v = values[:, i].astype(np.uint64)
        words[:, bit // 32] |= (v << np.uint64(bit % 32)) & np.uint64(0xFFFFFFFF)
        if bit % 32 + bits > 32:
            words[:, bit // 32 + 1] |= v >> np.uint64(32 - bit % 32)
    return mx.array(words[:, :-1].astype(np.uint32))


# --- the QMV text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", QMV_CASES, ids=lambda c: "-".join(str(v).removeprefix("mlx.core.") for v in c)
)
def test_qmv_text_matches_reference(case):
    dtype, sdtype, bits, group, rows, n, k = case
    x, w, s, b = qmv.probe_layer(n, k, bits, group, dtype, sdtype, (rows, k), seed=n + k)
    _assert_qmv(_qmv_gpp(x, w, s, b, bits, group), x, w, s, b, bits, group)


def test_pack_is_mlx_packing():
    """The tests' own packing (value k at bit k*bits) is what mx.quantize writes."""
    rng = np.random.default_rng(0)
    for bits in qmv.BITS:
        q, s, b = mx.quantize(mx.array(rng.standard_normal((3, 128)), F32), 32, bits)
        ones = mx.ones(s.shape)
        values = np.array(mx.dequantize(q, ones, mx.zeros(s.shape), 32, bits)).astype(np.int64)
        np.testing.assert_array_equal(np.array(pack(values, bits)), np.array(q))


@pytest.mark.parametrize("bits", [3, 6])
def test_values_straddling_words(bits):
    """Only the values that straddle two words are non-zero: each must be read whole."""
    k, n = 384, 13
    straddles = np.array([(i * bits) % 32 + bits > 32 for i in range(k)])
    values = np.where(straddles, np.random.default_rng(1).integers(1, 2**bits, (n, k)), 0)
    w = pack(values, bits)
    s = mx.full((n, k // 64), 0.25, BF16)
    b = mx.zeros((n, k // 64), BF16)
    x = mx.array(np.random.default_rng(2).standard_normal((1, k)), F32).astype(BF16)
    _assert_qmv(_qmv_gpp(x, w, s, b, bits, 64), x, w, s, b, bits, 64)
    # The same text without the second word of a straddling chunk reads them wrong.
    broken = qmv.QMV_SOURCE.replace("if (shift + VPT * BITS > 32) {", "if (false) {")
    assert broken != qmv.QMV_SOURCE
    instances = [_instance_of(_qmv_launch(x, n, width, 64, BF16)) for width in (3, 6)]
    got = _qmv_gpp(x, w, s, b, bits, 64, source=broken, instances=instances)
    assert _fails(got, x, w, s, b, bits, 64) > 0.5


def test_the_last_group_alone():
    """Every group zero but the last, which the second simdgroup's partial round reads."""
    x, w, s, b = qmv.probe_layer(13, 384, 4, 128, BF16, BF16, (1, 384), seed=3)
    keep = mx.arange(3) == 2
    s, b = mx.where(keep, s, 0).astype(BF16), mx.where(keep, b, 0).astype(BF16)
    got = _qmv_gpp(x, w, s, b, 4, 128)
    _assert_qmv(got, x, w, s, b, 4, 128)
    assert mx.all(got != 0).item()


@pytest.mark.parametrize("sign", ["zero-scales", "negative"])
def test_zero_and_negative_scales_and_biases(sign):
    x, w, s, b = qmv.probe_layer(13, 384, 3, 64, BF16, BF16, (1, 384), seed=4)
    if sign == "zero-scales":  # y = sum over groups of bias * sum(x)
        s = mx.zeros_like(s)
    else:
        s, b = -mx.abs(s), -mx.abs(b)
    _assert_qmv(_qmv_gpp(x, w, s, b, 3, 64), x, w, s, b, 3, 64)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["f32", "f16", "bf16"])
def test_large_magnitudes(dtype):
    """Results near the top of each type's range (float16: 2e4, the others: 1e30)."""
    x, w, s, b = qmv.probe_layer(7, 320, 6, 64, F32, F32, (1, 320), seed=5)
    x = mx.abs(x)  # same-signed terms, so the sum is as large as the terms allow
    s, b = mx.abs(s), mx.abs(b)
    size = mx.max(qmv.magnitude(x, w, s, b, 6, 64)).item()
    target = 2e4 if dtype == F16 else 1e30
    s, b = (a * (target / size) for a in (s, b))
    x, s, b = x.astype(dtype), s.astype(dtype), b.astype(dtype)
    got = _qmv_gpp(x, w, s, b, 6, 64)
    _assert_qmv(got, x, w, s, b, 6, 64)
    assert mx.max(mx.abs(got.astype(F32))).item() > target / 4


def test_reference_is_mx_quantized_matmul():
    """In float32 the reference is mx.quantized_matmul itself; in half types MLX's CPU kernel
    accumulates in the half type, so it is only near the (float32-accumulated) reference."""
    for dtype in (F32, F16, BF16):
        x, w, s, b = qmv.probe_layer(13, 384, 4, 64, dtype, dtype, (2, 384), seed=6)
        cpu = mx.quantized_matmul(x, w, s, b, True, 64, 4)
        want = qmv.quantized_reference(x, w, s, b, 4, 64)
        if dtype == F32:
            np.testing.assert_array_equal(np.array(cpu), np.array(want))
        else:
            size = np.array(qmv.magnitude(x, w, s, b, 4, 64))
            err = np.abs(np.array(cpu.astype(F32)) - np.array(want.astype(F32)))
            assert (err <= 2.0**-5 * size).all()


# --- broken texts fail ----------------------------------------------------------------------------


BROKEN = {
    "wrong-shift": ("const uint shift = bit % 32;", "const uint shift = bit % 16;"),
    "wrong-group": ("const uint g = c * VPT / GROUP;", "const uint g = c / GROUP;"),
    "missing-barrier": ("threadgroup_barrier(mem_flags::mem_threadgroup);", ""),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_qmv_texts_fail(name):
    """K = 640: both simdgroups add parts (so a missing barrier shows); 3 bits: shifts vary."""
    old, new = BROKEN[name]
    broken = qmv.QMV_SOURCE.replace(old, new)
    assert broken != qmv.QMV_SOURCE
    x, w, s, b = qmv.probe_layer(9, 640, 3, 64, F32, BF16, (2, 640), seed=7)
    instance = [_instance_of(_qmv_launch(x, 9, 3, 64, BF16))]
    got = _qmv_gpp(x, w, s, b, 3, 64, source=broken, instances=instance)
    assert _fails(got, x, w, s, b, 3, 64) > 0.5
    # The same case passes with the real text.
    _assert_qmv(_qmv_gpp(x, w, s, b, 3, 64), x, w, s, b, 3, 64)


# --- the xIELU epilogue ---------------------------------------------------------------------------


def _consts() -> tuple[mx.array, ...]:
    return tuple(mx.array(c, dtype=F32) for c in qmv.XIELU_CONSTANTS)


@pytest.mark.parametrize(
    "case", XIELU_CASES, ids=lambda c: "-".join(str(v).removeprefix("mlx.core.") for v in c)
)
def test_xielu_text_matches_reference(case):
    dtype, bits, group, rows, n, k = case
    x, w, s, b = qmv.probe_layer(n, k, bits, group, dtype, dtype, (rows, k), seed=k)
    got = _xielu_gpp(x, w, s, b, bits, group, _consts())
    pre = qmv.quantized_reference(x, w, s, b, bits, group)
    size = qmv.magnitude(x, w, s, b, bits, group)
    ok = np.array(qmv.agrees_xielu(got, pre, size, _consts()))
    assert ok.all(), f"{(~ok).sum()} of {ok.size} differ"
    # Both branches of xIELU are exercised.
    assert mx.any(pre > 0).item() and mx.any(pre < 0).item()


@pytest.mark.parametrize(
    "case", XIELU_CASES[:3], ids=lambda c: "-".join(str(v).removeprefix("mlx.core.") for v in c)
)
def test_xielu_epilogue_rounds_like_the_unfused_path(case):
    """An exact projection (small integers and eighths): the output must be xIELU of the
    projection rounded to the dtype, within xIELU's own tolerance only."""
    dtype, bits, group, rows, n, k = case
    rng = np.random.default_rng(8)
    w = pack(rng.integers(0, 2**bits, (n, k)), bits)
    s = mx.array(rng.integers(-2, 3, (n, k // group)).astype(np.float32) / 8).astype(dtype)
    b = mx.array(rng.integers(-3, 4, (n, k // group)).astype(np.float32) / 4).astype(dtype)
    x = mx.array(rng.integers(-3, 4, (rows, k)).astype(np.float32) / 16).astype(dtype)
    got = _xielu_gpp(x, w, s, b, bits, group, _consts())
    pre = qmv.quantized_reference(x, w, s, b, bits, group)
    want = xk.xielu_reference(pre, *_consts())
    assert np.array(xk.agrees(got, want, pre)).all()


# --- the fused q/k/v projection with QK-norm and RoPE ---------------------------------------------


def _qkv_args(case, seed=0):
    dtype, bits, group, batch, length, head_dim, heads, kv_heads, k, offset = case
    out_dims = (heads + 2 * kv_heads) * head_dim
    x, w, s, b = qmv.probe_layer(out_dims, k, bits, group, dtype, dtype, (batch, length, k), seed)
    q_norm, k_norm, inv_freq = qmv.probe_norms(head_dim, dtype)
    return (x, w, s, b, bits, group, q_norm, k_norm, 1e-5, offset, inv_freq, heads, kv_heads)


def _qkv_ok(got, args) -> list[np.ndarray]:
    x, w, s, b, bits, group, q_norm, k_norm, eps, _, _, heads, kv_heads = args
    want = qmv.qkv_reference(*args)
    B, L, _ = x.shape
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    pre = qmv.quantized_reference(x, w, s, b, bits, group).reshape(B, L, -1, head_dim)
    size = qmv.magnitude(x, w, s, b, bits, group)
    for g, v in zip(got, want):
        assert g.shape == v.shape and g.dtype == v.dtype
    return [
        np.array(ok) for ok in qmv.agrees_qkv(got, want, pre, size, (q_norm, k_norm), eps, heads)
    ]


@pytest.mark.parametrize(
    "case", QKV_CASES, ids=lambda c: "-".join(str(v).removeprefix("mlx.core.") for v in c)
)
def test_qkv_text_matches_reference(case):
    args = _qkv_args(case)
    for name, ok in zip("qkv", _qkv_ok(_qkv_gpp(args), args)):
        assert ok.all(), f"{name}: {(~ok).sum()} of {ok.size} differ"


def test_qkv_missing_barrier_fails():
    broken = qmv.QKV_SOURCE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    assert broken != qmv.QKV_SOURCE
    args = _qkv_args(QKV_CASES[0], seed=9)
    launch = _qkv_launch(args[0], 4, 64, 128, 4, 2, BF16)
    got = _qkv_gpp(args, source=broken, instances=[_instance_of(launch)])
    assert all(ok.mean() < 0.5 for ok in _qkv_ok(got, args))


def test_qkv_swapped_norms_fail():
    """q and k have their own norms: reading one for the other must not pass."""
    args = list(_qkv_args(QKV_CASES[0], seed=10))
    got = _qkv_gpp(tuple(args))
    args[6], args[7] = args[7], args[6]
    ok_q, ok_k, ok_v = _qkv_ok(got, tuple(args))
    assert ok_q.mean() < 0.5 and ok_k.mean() < 0.5 and ok_v.all()


# --- the stand-in's own semantics -----------------------------------------------------------------

SEMANTICS = SimpleNamespace(
    input_names=("x",),
    output_names=("out",),
    header="",
    source="""
    threadgroup float shared[64];
    const uint i = thread_position_in_grid.x;
    const uint t = thread_index_in_threadgroup;
    const float v = static_cast<float>(x[i]);
    float ladder = v;
    for (ushort d = 16; d > 0; d /= 2) {
        ladder += simd_shuffle_down(ladder, d);
    }
    const float total = simd_sum(v);
    const float down = simd_shuffle_down(v, 3);
    shared[t] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float other = shared[(t + 32) % threads_per_threadgroup.x];
    out[4 * i] = ladder;
    out[4 * i + 1] = total;
    out[4 * i + 2] = down;
    out[4 * i + 3] = other;
""",
)


def _semantics(v: np.ndarray) -> np.ndarray:
    """What Metal gives for SEMANTICS on threadgroups of 64 (two simdgroups of 32)."""
    out = np.zeros((v.size, 4), np.float32)
    for start in range(0, v.size, 32):
        lanes = v[start : start + 32].astype(np.float32)
        ladder = lanes.copy()
        for d in (16, 8, 4, 2, 1):
            shifted = np.concatenate([ladder[d:], ladder[32 - d :]])  # upper lanes keep theirs
            ladder = ladder + shifted
        out[start : start + 32, 0] = ladder
        out[start : start + 32, 1] = lanes.sum(dtype=np.float32)
        out[start : start + 32, 2] = np.concatenate([lanes[3:], lanes[29:]])
    groups = v.reshape(-1, 64)
    out[:, 3] = np.roll(groups, -32, axis=1).reshape(-1)
    return out


@pytest.mark.parametrize("barrier", [True, False])
def test_stand_in_simdgroups_and_barriers(barrier):
    """Lock-step simdgroups: simd_sum over 32 lanes, shuffle_down leaving the upper lanes
    their own value; threadgroup memory seen after a barrier, stale without it."""
    source = SEMANTICS.source
    if not barrier:
        source = source.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    program = stand_in.compile_kernel(
        SEMANTICS, {"x": "T*"}, source=source, instances=[(("T", F32),)]
    )
    v = np.random.default_rng(11).integers(-8, 8, 128).astype(np.float32)
    launch = {
        "grid": (128, 1, 1),
        "threadgroup": (64, 1, 1),
        "output_shapes": [(128 * 4,)],
        "output_dtypes": [F32],
        "template": [("T", F32)],
    }
    [out] = program([mx.array(v)], launch)
    got, want = np.array(out).reshape(128, 4), _semantics(v)
    np.testing.assert_array_equal(got[:, :3], want[:, :3])
    if barrier:
        np.testing.assert_array_equal(got[:, 3], want[:, 3])
    else:  # simdgroup 0 runs ahead and reads what simdgroup 1 has not written yet
        assert (got[:32, 3] != want[:32, 3]).any()


# --- launch geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dims", [1, 3, 4, 5, 131072])
def test_qmv_geometry(out_dims):
    launch = qmv.qmv_geometry(
        (3, 256), BF16, out_dims=out_dims, bits=3, group=64, scales_dtype=BF16
    )
    groups = math.ceil(out_dims / qmv.RPS)
    assert launch["grid"] == (groups * qmv.SIMDGROUPS * 32, 1, 1)
    assert launch["threadgroup"] == (qmv.SIMDGROUPS * 32, 1, 1)
    assert launch["output_shapes"] == [(3, out_dims)] and launch["output_dtypes"] == [BF16]
    assert dict(launch["template"]) == dict(
        T=BF16, S=BF16, BITS=3, GROUP=64, ROWS=3, RPS=qmv.RPS, SG=qmv.SIMDGROUPS
    )


def test_qkv_geometry():
    launch = _qkv_launch(mx.zeros((2, 3, 256), F16), 4, 32, 128, 32, 8, F16)
    assert launch["grid"] == (48 * qmv.HEAD_SIMDGROUPS * 32, 1, 1)
    assert launch["output_shapes"] == [(2, 32, 3, 128), (2, 8, 3, 128), (2, 8, 3, 128)]
    assert dict(launch["template"])["ROWS"] == 6


@pytest.mark.parametrize(
    "shape, bits, group",
    [((9, 256), 4, 64), ((0, 256), 4, 64), ((1, 96), 4, 64), ((1, 256), 7, 64), ((1, 256), 4, 16)],
)
def test_geometry_rejects_what_the_kernels_do_not_serve(shape, bits, group):
    with pytest.raises(ValueError):
        qmv.qmv_geometry(shape, F32, out_dims=8, bits=bits, group=group, scales_dtype=F32)


def test_qkv_geometry_rejects_odd_or_huge_heads():
    for head_dim in (63, 2 * qmv.MAX_HEAD_DIM):
        with pytest.raises(ValueError):
            _qkv_launch(mx.zeros((1, 1, 256), F16), 4, 32, head_dim, 4, 2, F16)


# --- where the kernels run: plan, self-check, timing (stand-in kernel objects) --------------------

ALL = (qmv.QMV, qmv.QMV_XIELU, qmv.QKV_ROPE, xk.KERNEL, qk_rope.KERNEL)
fresh_state = stand_in.kernel_fixtures(*ALL)


def _quantized(in_dims, out_dims, bits, group, plan, seed=0):
    """A layer as loading makes it: our Linear, quantized by `to_quantized`."""
    mx.random.seed(seed)
    return linear.Linear(in_dims, out_dims, False, plan).to_quantized(group, bits)


def _reference_qmv(x, w, s, b, *, launch):
    t = dict(launch["template"])
    return qmv.quantized_reference(x, w, s, b, t["BITS"], t["GROUP"])


def _timed(monkeypatch, ours_s: float, theirs_s: float) -> list:
    """Make every timing report (ours_s, theirs_s); returns the thunk pairs timed."""
    timed: list = []

    def time_both(ours, theirs):
        timed.append((ours, theirs))
        return ours_s, theirs_s

    monkeypatch.setattr(metal, "time_both", time_both)
    return timed


def test_cpu_plan_keeps_mlx_layers(fresh_state, monkeypatch):
    for kernel in ALL:
        monkeypatch.setattr(kernel, "_make", lambda: pytest.fail("a kernel was built on the CPU"))
    assert type(linear.projection(256, 8, False, cpu_plan())) is nn.Linear
    layer = _quantized(256, 8, 4, 64, cpu_plan())
    assert type(layer) is nn.QuantizedLinear
    x = mx.ones((1, 256))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(layer(x)))
    assert "qmv mlx (no Metal GPU)" in cpu_plan().describe()


def test_faster_kernel_serves_decode_steps_and_is_recorded(fresh_state, monkeypatch):
    calls = stand_in.use_stand_in(qmv.QMV, monkeypatch, _reference_qmv, geometry=False)
    timed = _timed(monkeypatch, 1.0e-5, 1.25e-5)
    plan = metal_plan(BF16)
    layer = _quantized(256, 12, 3, 64, plan)
    assert isinstance(layer, linear.QuantizedLinear)
    layer.scales, layer.biases = layer.scales.astype(BF16), layer.biases.astype(BF16)
    x = mx.random.normal((1, 2, 256)).astype(BF16)
    got = layer(x)
    want = qmv.quantized_reference(x, *layer.packed(), 3, 64)
    np.testing.assert_array_equal(np.array(got.astype(F32)), np.array(want.astype(F32)))
    assert calls == [BF16, BF16] and len(timed) == 1  # self-check, then the call
    layer(x)
    assert calls == [BF16] * 3 and len(timed) == 1  # timed once per shape
    assert plan.kernels.summary("qmv") == "metal 1.25x"
    assert "qmv metal 1.25x" in plan.describe()
    # The probe that was timed has this layer's shapes.
    ours, theirs = timed[0]
    assert ours().shape == theirs().shape == (1, 2, 12)


def test_slower_kernel_leaves_mlx_in_place(fresh_state, monkeypatch):
    calls = stand_in.use_stand_in(qmv.QMV, monkeypatch, _reference_qmv, geometry=False)
    _timed(monkeypatch, 1.0e-5, 1.04e-5)  # 4% faster: not enough
    plan = metal_plan(F32)
    layer = _quantized(256, 12, 4, 32, plan)
    x = mx.random.normal((1, 256))
    np.testing.assert_array_equal(
        np.array(layer(x)), np.array(mx.quantized_matmul(x, *layer.packed(), True, 32, 4))
    )
    assert calls == [F32]  # the self-check only
    assert plan.kernels.summary("qmv") == "mlx (metal 1.04x)"


def test_prompt_chunks_and_unserved_layers_skip_the_kernel(fresh_state, monkeypatch):
    monkeypatch.setattr(qmv.QMV, "_make", lambda: pytest.fail("kernel built"))
    _timed(monkeypatch, 1.0, 2.0)
    plan = metal_plan(F32)
    layer = _quantized(256, 8, 4, 64, plan)
    layer(mx.ones((1, qmv.MAX_ROWS + 1, 256)))  # a prompt chunk
    assert layer.fits(mx.ones((1, qmv.MAX_ROWS, 256)))
    assert not layer.fits(mx.ones((1, 256), F16))  # over float32 scales MLX gives float32
    fp = linear.Linear(256, 8, False, plan).to_quantized(32, 4, mode="mxfp4")
    assert isinstance(fp, linear.QuantizedLinear) and not fp.fits(mx.ones((1, 256)))
    fp(mx.ones((1, 256)))  # MLX's path
    assert plan.kernels.summary("qmv") is None


@pytest.mark.parametrize(
    "builder",
    stand_in.failing_builders(
        qmv.QMV,
        lambda x, w, s, b, *, launch: _reference_qmv(x, w, s, b, launch=launch) * 2,
        geometry=False,
    ),
)
def test_failing_self_check_falls_back_for_good(fresh_state, monkeypatch, caplog, builder):
    _timed(monkeypatch, 1.0, 2.0)
    layer = _quantized(256, 8, 4, 64, metal_plan(F32))

    def use(dtype):
        x = mx.random.normal((1, 256)).astype(dtype)
        if dtype != F32:
            layer.scales = layer.scales.astype(dtype)
            layer.biases = layer.biases.astype(dtype)
        want = mx.quantized_matmul(x, *layer.packed(), True, 64, 4)
        np.testing.assert_array_equal(np.array(layer(x).astype(F32)), np.array(want.astype(F32)))

    stand_in.check_falls_back_for_good(qmv.QMV, monkeypatch, caplog, builder, use)
    assert "qmv mlx (failed its self-check)" in metal_plan().describe()


def test_switched_off_at_load(fresh_state, monkeypatch):
    def use(plan):
        layer = _quantized(256, 8, 4, 64, plan)
        assert type(layer) is nn.QuantizedLinear
        assert "qmv mlx (APERTUS_MLX_NO_METAL_KERNELS=1)" in plan.describe()

    stand_in.check_switched_off(qmv.QMV, monkeypatch, use)


def test_other_dtypes_skip_the_kernel(fresh_state, monkeypatch):
    stand_in.check_other_dtypes_skip_the_kernel(qmv.QMV, monkeypatch, BF16, 4, 64, 1)


def test_record_summaries():
    record = KernelRecord()
    assert record.summary("qmv") is None
    record.note("qmv", "a", 1.0, 1.18, True)
    assert record.summary("qmv") == "metal 1.18x"
    record.note("qmv", "b", 1.0, 0.9, False)
    assert record.summary("qmv") == "metal 1.18x on 1 of 2 shapes"
    record.note("qkv", "a", 2.0, 1.86, False)
    assert record.summary("qkv") == "mlx (metal 0.93x)"


# --- the model on its Metal plan, kernels as stand-ins --------------------------------------------


@pytest.fixture(scope="module")
def quantized_dir(checkpoint, tmp_path_factory):
    from apertus_mlx.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("q4") / "q4"
    return quantize_checkpoint(checkpoint("gqa-llama3-f32"), out, 4, group_size=32).out


def _stand_ins(monkeypatch) -> dict[str, list]:
    """Every kernel a stand-in computing its reference; every timing won by the kernels."""

    def qkv(x, w, s, b, q_norm, k_norm, inv_freq, eps, offset, *, launch):
        t = dict(launch["template"])
        args = (x, w, s, b, t["BITS"], t["GROUP"], q_norm, k_norm, eps.item(), offset)
        return qmv.qkv_reference(*args, inv_freq, t["QH"], t["KVH"])

    def up(x, w, s, b, a_p, a_n, beta, eps, *, launch):
        return xk.xielu_reference(_reference_qmv(x, w, s, b, launch=launch), a_p, a_n, beta, eps)

    def rope(x, weight, inv_freq, eps, offset):
        return qk_rope.qk_norm_rope_reference(x, weight, eps.item(), offset, inv_freq)

    _timed(monkeypatch, 1.0, 2.0)
    return {
        "qmv": stand_in.use_stand_in(qmv.QMV, monkeypatch, _reference_qmv, geometry=False),
        "up": stand_in.use_stand_in(qmv.QMV_XIELU, monkeypatch, up, geometry=False),
        "qkv": stand_in.use_stand_in(qmv.QKV_ROPE, monkeypatch, qkv, geometry=False),
        "xielu": stand_in.use_stand_in(xk.KERNEL, monkeypatch, xk.xielu_reference),
        "rope": stand_in.use_stand_in(qk_rope.KERNEL, monkeypatch, rope),
    }


def test_model_decodes_through_the_kernels(fresh_state, monkeypatch, quantized_dir):
    """The quantized model on a Metal plan (kernels as stand-ins computing their references)
    gives the logits of its CPU plan: prompt chunks on MLX's path, decoding steps, compiled,
    through the fused kernels."""
    from apertus_mlx.generate import Forward
    from apertus_mlx.loading import load_model

    calls = _stand_ins(monkeypatch)
    on_metal = load_model(quantized_dir, fast_ops=True, metal_kernels=True, on_gpu=True)
    on_cpu = load_model(quantized_dir, fast_ops=True)
    assert not on_cpu.plan.metal_kernels
    prompt = mx.array([[5, 9, 2, 7, 11, 3, 8, 1, 4, 6]])
    results = []
    for model in (on_metal, on_cpu):
        cache, forward = model.make_cache(), Forward(model)
        logits = [model(prompt, cache=cache)[:, -1]]
        for token in (12, 13):
            logits.append(forward(mx.array([[token]]), cache)[:, -1])
        results.append(np.array(mx.concatenate(logits)))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-4)
    assert calls["up"] and calls["qkv"] and calls["qmv"]  # down, o and the head
    summary = on_metal.plan.describe()
    for label in ("qmv metal 2.00x", "qmv+xielu metal 2.00x", "qkv+norm+rope metal 2.00x"):
        assert label in summary


# --- the real kernels, on a Mac -------------------------------------------------------------------

needs_metal = pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (runs on a Mac)")


@needs_metal
@pytest.mark.parametrize("case", QMV_CASES, ids=str)
def test_real_qmv_matches_reference(fresh_state, case):
    dtype, sdtype, bits, group, rows, n, k = case
    with mx.stream(mx.gpu):
        x, w, s, b = qmv.probe_layer(n, k, bits, group, dtype, sdtype, (rows, k), seed=n + k)
        _assert_qmv(qmv.qmv_metal(x, w, s, b, bits, group), x, w, s, b, bits, group)
        assert qmv.QMV.usable(dtype, sdtype, bits, group, rows)


@needs_metal
@pytest.mark.parametrize("case", XIELU_CASES, ids=str)
def test_real_qmv_xielu_matches_reference(fresh_state, case):
    dtype, bits, group, rows, n, k = case
    with mx.stream(mx.gpu):
        x, w, s, b = qmv.probe_layer(n, k, bits, group, dtype, dtype, (rows, k), seed=k)
        got = qmv.qmv_xielu_metal(x, w, s, b, bits, group, _consts())
        pre = qmv.quantized_reference(x, w, s, b, bits, group)
        size = qmv.magnitude(x, w, s, b, bits, group)
        assert mx.all(qmv.agrees_xielu(got, pre, size, _consts())).item()


@needs_metal
@pytest.mark.parametrize("case", QKV_CASES, ids=str)
def test_real_qkv_matches_reference(fresh_state, case):
    with mx.stream(mx.gpu):
        args = _qkv_args(case)
        assert all(ok.all() for ok in _qkv_ok(qmv.qkv_norm_rope_metal(*args), args))


# --- the benchmark --------------------------------------------------------------------------------


def test_benchmark_says_metal_is_absent(capsys):
    from benchmarks import kernels as bench

    if bench.metal_absent() is None:
        pytest.skip("this machine has Metal: `make bench ARGS=--kernels` times the kernels")
    assert bench.main([]) == 0
    assert capsys.readouterr().out.strip() == bench.metal_absent()


def test_benchmark_compares_the_same_outputs():
    """MLX's side of every benchmarked projection runs here, with the shapes ours returns."""
    from benchmarks import kernels as bench

    shape = bench.LayerShape(hidden=256, mlp=512, heads=4, kv_heads=2, head_dim=64, vocab=320)
    want = {"qkv+norm+rope": [(1, 4, 1, 64), (1, 2, 1, 64), (1, 2, 1, 64)], "o": [(1, 1, 256)]}
    want |= {"up+xielu": [(1, 1, 512)], "down": [(1, 1, 256)], "head": [(1, 1, 320)]}
    mx_fast = Plan(on_gpu=True, dtype=BF16, fast_ops=True, metal_kernels=False, fuse_qkv=True)
    with mx.stream(mx.cpu):
        rows = bench.projections(shape, 4, mx_fast)
        got = {name: theirs() for name, _, theirs in rows}
    got = {k: [a.shape for a in (v if isinstance(v, tuple) else (v,))] for k, v in got.items()}
    assert got == want
