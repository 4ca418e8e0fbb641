"""The fused qk-norm+RoPE Metal kernel, checked without a Mac: its text compiled by g++.

`metal_stand_in` runs `KERNEL_SOURCE` over the grid that `launch_geometry` returns on x read
through its strides, and the results are compared with `qk_norm_rope_reference`, which is the
model's plain path. On a Mac the real kernel is compared too. Path selection and fallback are
tested with stand-in kernel objects, so no Metal API is called where there is no Metal.
"""

from __future__ import annotations

import importlib
import logging
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apertus_mlx.config import ModelArgs
from apertus_mlx.model import RMSNorm, RoPE, rope_inv_freq
from apertus_mlx.plan import Plan
from tests import metal_stand_in as stand_in
from tests.metal_stand_in import bits as _bits
from tests.metal_stand_in import cpu_plan, metal_plan

qk = importlib.import_module("apertus_mlx.kernels.qk_rope")

DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
# MLX's parameter types: x and weight share T (the kernel requires it); 0-d inputs by reference.
TYPES = {"x": "T*", "weight": "T*", "inv_freq": "float*", "eps": "float&", "offset": "int32_t&"}
EPS = 1e-5  # rms_norm_eps of the Apertus checkpoints

# (B, L, heads, head_dim, offset, layout): layout "qkv" reads x as a slice of a fused
# projection, as the model does; "dense" a contiguous x; "transposed" a (B, heads, L, D) buffer.
CASES = [
    (1, 1, 8, 128, 0, "qkv"),
    (1, 1, 8, 128, 70000, "qkv"),
    (2, 1, 3, 64, 70001, "qkv"),
    (1, 7, 5, 64, 0, "dense"),
    (2, 5, 3, 128, 69990, "qkv"),
    (1, 9, 1, 128, 65530, "transposed"),
    (2, 3, 7, 64, 123, "transposed"),
]


def _plan(fast: bool) -> Plan:
    """The model's plan on a Mac with our kernels (fast) or on the CPU."""
    return metal_plan() if fast else cpu_plan()


def _args(head_dim: int) -> ModelArgs:
    """Apertus-8B's RoPE settings (llama3: theta 12e6, factor 8, original 8192), 4 heads."""
    return ModelArgs.from_dict(
        dict(
            model_type="apertus",
            hidden_size=4 * head_dim,
            num_attention_heads=4,
            num_hidden_layers=1,
            intermediate_size=8,
            vocab_size=8,
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 12e6,
                "factor": 8,
                "low_freq_factor": 1,
                "high_freq_factor": 4,
                "original_max_position_embeddings": 8192,
            },
        )
    )


def _inv_freq(head_dim: int) -> mx.array:
    return mx.array(rope_inv_freq(_args(head_dim)))


class Case:
    """One kernel input: x as a view of a buffer (element offset, strides), weight, frequencies."""

    def __init__(self, shape, offset, layout, dtype, seed=0, values=None):
        B, L, H, D = shape
        rng = np.random.default_rng(seed)
        if layout == "qkv":  # q heads, then H heads of k (our x), then H of v
            buffer = rng.standard_normal((B, L, (3 * H + 2) * D)).astype(np.float32)
            start, strides = (H + 2) * D, (L * buffer.shape[2], buffer.shape[2], D, 1)
        elif layout == "transposed":
            buffer = rng.standard_normal((B, H, L, D)).astype(np.float32)
            start, strides = 0, (H * L * D, D, L * D, 1)
        else:
            buffer = rng.standard_normal((B, L, H, D)).astype(np.float32)
            start, strides = 0, (L * H * D, H * D, D, 1)
        buffer *= rng.choice([0.01, 1.0, 30.0], buffer.shape[:-1])[..., None]  # row scales
        flat = buffer.reshape(-1)
        view = np.lib.stride_tricks.as_strided(
            flat[start:], shape, [s * flat.itemsize for s in strides]
        )
        if values is not None:
            view[...] = values
        self.buffer = mx.array(flat).astype(dtype)
        self.start, self.strides, self.offset = start, strides, offset
        # The same view in MLX (the model's own slicing for "qkv"), for the reference.
        whole = self.buffer.reshape(buffer.shape)
        if layout == "qkv":
            self.x = whole[..., start : start + H * D].reshape(shape)
        elif layout == "transposed":
            self.x = whole.transpose(0, 2, 1, 3)
        else:
            self.x = whole
        self.weight = mx.array(1.0 + 0.2 * rng.standard_normal(D).astype(np.float32)).astype(dtype)
        self.inv_freq = _inv_freq(D)

    def reference(self) -> mx.array:
        return qk.qk_norm_rope_reference(self.x, self.weight, EPS, self.offset, self.inv_freq)


def _run_gpp(case: Case, source: str | None = None, header: str | None = None) -> mx.array:
    """The kernel text's (or a variant's) output for `case`: (B, heads, L, D) of x's dtype."""
    program = stand_in.compile_kernel(qk.KERNEL, TYPES, header=header, source=source)
    x = stand_in.Strided(case.buffer, case.start, tuple(case.x.shape), case.strides)
    scalars = [mx.array(EPS, dtype=mx.float32), mx.array(case.offset, dtype=mx.int32)]
    launch = qk.launch_geometry(x.shape, case.x.dtype)
    [out] = program([x, case.weight, case.inv_freq, *scalars], launch)
    return out


def _assert_matches(got: mx.array, case: Case) -> None:
    """The module's own agreement rule (as the self-check uses it), with a readable failure."""
    want = case.reference()
    assert got.shape == want.shape and got.dtype == want.dtype
    ok = np.array(qk.agrees(got, want, case.x, case.weight, EPS))
    g, w = (np.array(a.astype(mx.float32)) for a in (got, want))
    where = np.argwhere(~ok)[:5].tolist()
    assert ok.all(), f"{case.x.dtype}: {(~ok).sum()} differ at {where}: {g[~ok][:5]} {w[~ok][:5]}"


# --- the kernel text, compiled with g++ --------------------------------------------------------


@pytest.mark.parametrize("shape_offset_layout", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_text_matches_reference(dtype, shape_offset_layout):
    *shape, offset, layout = shape_offset_layout
    case = Case(tuple(shape), offset, layout, DTYPES[dtype])
    _assert_matches(_run_gpp(case), case)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_text_edge_rows(dtype):
    """Rows of zeros, -0.0, underflowing squares, the type's largest values, inf and nan."""
    D = 64
    big = {"f32": 1e18, "f16": 6e4, "bf16": 1e30}[dtype]
    rows = [np.zeros(D), np.full(D, -0.0), np.full(D, 1e-30), np.full(D, 3e-3)]
    rows += [
        np.linspace(-big, big, D),
        np.r_[np.inf, np.ones(D - 1)],
        np.r_[np.ones(D - 1), np.nan],
    ]
    rows += [np.r_[-np.inf, np.zeros(D - 1)]]
    values = np.stack(rows).astype(np.float32).reshape(1, 2, 4, D)
    case = Case((1, 2, 4, D), 70000, "qkv", DTYPES[dtype], values=values)
    got = _run_gpp(case)
    _assert_matches(got, case)
    g = np.array(got.astype(mx.float32))
    assert (g[0, :2, 0] == 0).all() and np.isnan(g[0, 1, 1]).any()  # zero row, inf row


def test_check_catches_a_wrong_sin_sign():
    """A rotation the wrong way round must fail the agreement rule (and so the self-check)."""
    broken = qk.KERNEL_HEADER.replace("metal::precise::sin(angle)", "-metal::precise::sin(angle)")
    assert broken != qk.KERNEL_HEADER
    for dtype in DTYPES.values():
        case = Case((1, 3, 2, 64), 70000, "qkv", dtype)
        got = _run_gpp(case, header=broken)
        ok = np.array(qk.agrees(got, case.reference(), case.x, case.weight, EPS))
        assert ok.mean() < 0.5, f"{dtype}: a wrong sign of sin goes unnoticed"


def test_check_catches_positions_off_by_one():
    broken = qk.KERNEL_SOURCE.replace("static_cast<float>(l) +", "static_cast<float>(l + 1) +")
    assert broken != qk.KERNEL_SOURCE
    case = Case((1, 2, 3, 64), 5, "qkv", mx.bfloat16)
    ok = np.array(qk.agrees(_run_gpp(case, broken), case.reference(), case.x, case.weight, EPS))
    # One position further turns the fastest pair (inv_freq 1) by a radian; the slowest
    # llama3-scaled pairs by less than the tolerance.
    assert not ok[..., [0, 32]].any()


def test_self_check_probe_passes_for_the_reference():
    x, weight, eps, offset, inv_freq = qk.probe()
    assert x.shape == (2, 3, 5, 128) and offset + x.shape[1] > 70000
    for dtype in DTYPES.values():
        xd, wd = x.astype(dtype), weight.astype(dtype)
        want = qk.qk_norm_rope_reference(xd, wd, eps, offset, inv_freq)
        assert np.array(qk.agrees(want, want, xd, wd, eps)).all()


# --- the reference is the model's plain path ---------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("offset", [0, 70000, "array"])
def test_reference_equals_model_plain_path(dtype, offset):
    case = Case((2, 3, 5, 128), 0, "qkv", dtype)
    rope, norm = RoPE(_args(128), _plan(fast=False)), RMSNorm(128, EPS, fast=False)
    norm.weight = case.weight
    position = mx.array(69999, dtype=mx.int32) if offset == "array" else offset
    with mx.stream(mx.cpu):
        plain = rope.rotation(3, position)(case.x, norm)
        want = qk.qk_norm_rope_reference(case.x, case.weight, EPS, position, _inv_freq(128))
    assert plain.dtype == dtype and plain.shape == (2, 5, 3, 128)
    np.testing.assert_array_equal(_bits(plain), _bits(want))


# --- launch geometry ---------------------------------------------------------------------------


@given(st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.sampled_from([2, 64])))
def test_geometry_covers_every_row_once(shape):
    B, L, H, D = shape
    launch = qk.launch_geometry(shape, mx.bfloat16)
    gx, gy, gz = launch["grid"]
    assert (gx, gy, gz) == (B * L * H, 1, 1)  # thread r <-> row r of x's (B, L, H) rows
    assert launch["output_shapes"] == [(B, H, L, D)] and launch["output_dtypes"] == [mx.bfloat16]
    assert launch["template"] == [("T", mx.bfloat16)]
    tg = launch["threadgroup"]
    assert 1 <= math.prod(tg) <= 1024 and all(1 <= t <= g for t, g in zip(tg, launch["grid"]))


@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 1, 32, 128), (4, 2048, 32, 128)])
def test_geometry_sizes(shape):
    rows = math.prod(shape[:3])
    launch = qk.launch_geometry(shape, mx.float16)
    assert launch["grid"] == (rows, 1, 1)
    assert launch["threadgroup"] == (min(rows, qk.THREADGROUP), 1, 1)


@pytest.mark.parametrize(
    "shape",
    [
        (0, 1, 8, 64),
        (1, 0, 8, 64),
        (1, 1, 8, 0),
        (1, 1, 8, 63),
        (8, 64),
        (qk.MAX_GRID + 1, 1, 1, 2),
    ],
)
def test_geometry_rejects_shapes_it_cannot_serve(shape):
    with pytest.raises(ValueError):
        qk.launch_geometry(shape, mx.float32)


# --- path selection and fallback ---------------------------------------------------------------


fresh_state = stand_in.kernel_fixtures(qk.KERNEL)


def _computed(wrong: bool = False):
    """What a stand-in kernel object computes: the reference (negated, to disagree)."""

    def compute(x, weight, inv_freq, eps, offset):
        assert (eps.ndim, eps.dtype, offset.ndim, offset.dtype) == (0, mx.float32, 0, mx.int32)
        assert weight.dtype == x.dtype and inv_freq.shape == (x.shape[-1] // 2,)
        out = qk.qk_norm_rope_reference(x, weight, eps.item(), offset, inv_freq)
        return -out if wrong else out

    return compute


def _rotation_inputs(dtype, offset=70000):
    """A case and the model's pieces for it: q_norm-like RMSNorm, RoPE on its Metal path."""
    case = Case((1, 4, 3, 64), offset, "qkv", dtype)
    norm, rope = RMSNorm(64, EPS, fast=True), RoPE(_args(64), _plan(fast=True))
    norm.weight = case.weight
    return case, norm, rope


def test_plain_backend_without_metal(fresh_state, monkeypatch):
    monkeypatch.setattr(qk.KERNEL, "_make", lambda: pytest.fail("kernel built on the CPU"))
    assert qk.qk_rope_backend(cpu_plan()) == "plain"
    case, *_ = _rotation_inputs(mx.float32)
    assert not qk.qk_rope_kernel_usable(case.x, case.weight, cpu_plan())
    got = qk.qk_norm_rope(case.x, case.weight, EPS, 70000, case.inv_freq, cpu_plan())
    np.testing.assert_array_equal(_bits(got), _bits(case.reference()))


def test_switched_off_at_load_forces_fallback(fresh_state, monkeypatch):
    def use(plan):
        assert qk.qk_rope_backend(plan) == "mx.fast"
        case, *_ = _rotation_inputs(mx.float16)
        assert not qk.qk_rope_kernel_usable(case.x, case.weight, plan)

    stand_in.check_switched_off(qk.KERNEL, monkeypatch, use)


def test_passing_self_check_uses_kernel_per_dtype(fresh_state, monkeypatch, caplog):
    calls = stand_in.use_stand_in(qk.KERNEL, monkeypatch, _computed())
    case, *_ = _rotation_inputs(mx.float16)
    plan = metal_plan()
    # First use inside an outer mx.compile with the offset an array, as in fast_decode.
    outer = mx.compile(lambda x, w, off: qk.qk_norm_rope(x, w, EPS, off[0], case.inv_freq, plan))
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"):
        got = outer(case.x, case.weight, mx.array([70000], dtype=mx.int32))
    np.testing.assert_array_equal(_bits(got), _bits(case.reference()))
    assert qk.qk_rope_backend(plan) == "metal" and not caplog.records
    assert calls == [mx.float16, mx.float16]  # probe, then the real launch
    qk.qk_norm_rope(case.x, case.weight, EPS, 70000, case.inv_freq, plan)
    bf = _rotation_inputs(mx.bfloat16)[0]
    qk.qk_norm_rope(bf.x, bf.weight, EPS, 3, bf.inv_freq, plan)
    assert calls == [mx.float16] * 3 + [mx.bfloat16] * 2  # bfloat16 checked on its first use
    # Mixed dtypes are not for the kernel.
    assert not qk.qk_rope_kernel_usable(case.x, case.weight.astype(mx.float32), plan)


def test_model_rotation_takes_the_kernel_on_metal(fresh_state, monkeypatch):
    calls = stand_in.use_stand_in(qk.KERNEL, monkeypatch, _computed())
    case, norm, rope = _rotation_inputs(mx.bfloat16)
    got = rope.rotation(4, 70000)(case.x, norm)
    np.testing.assert_array_equal(_bits(got), _bits(case.reference()))
    assert calls == [mx.bfloat16, mx.bfloat16]


@pytest.mark.parametrize("builder", stand_in.failing_builders(qk.KERNEL, _computed(wrong=True)))
def test_failing_self_check_falls_back_for_good(fresh_state, monkeypatch, caplog, builder):
    case, norm, rope = _rotation_inputs(mx.bfloat16)

    def use(dtype):
        x, norm.weight = case.x.astype(dtype), case.weight.astype(dtype)
        with mx.stream(mx.cpu):  # the mx.fast fallback, run here on the CPU
            got = rope.rotation(4, 70000)(x, norm)
            fast = mx.fast.rope(
                mx.fast.rms_norm(x, norm.weight, EPS).transpose(0, 2, 1, 3),
                64,
                traditional=False,
                base=None,
                scale=1.0,
                offset=70000,
                freqs=rope._wavelengths,
            )
        np.testing.assert_array_equal(_bits(got), _bits(fast))

    stand_in.check_falls_back_for_good(qk.KERNEL, monkeypatch, caplog, builder, use)
    assert qk.qk_rope_backend(metal_plan()) == "mx.fast"


def test_other_dtypes_skip_the_kernel(fresh_state, monkeypatch):
    stand_in.check_other_dtypes_skip_the_kernel(qk.KERNEL, monkeypatch)
    case = Case((1, 2, 3, 64), 5, "qkv", mx.float32)
    x, w = case.x.astype(mx.int32), case.weight.astype(mx.int32)
    assert not qk.qk_rope_kernel_usable(x, w, metal_plan())


# --- the real kernel, on a Mac -----------------------------------------------------------------


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (runs on a Mac)")
@pytest.mark.parametrize("shape_offset_layout", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_real_kernel_matches_reference(fresh_state, dtype, shape_offset_layout):
    *shape, offset, layout = shape_offset_layout
    with mx.stream(mx.gpu):
        case = Case(tuple(shape), offset, layout, dtype)
        got = qk.qk_norm_rope_metal(case.x, case.weight, EPS, offset, case.inv_freq)
        _assert_matches(got, case)
        array_offset = mx.array([offset], dtype=mx.int32)
        again = qk.qk_norm_rope_metal(case.x, case.weight, EPS, array_offset, case.inv_freq)
        np.testing.assert_array_equal(_bits(again), _bits(got))
        assert qk.qk_rope_kernel_usable(case.x, case.weight, metal_plan())
    assert qk.qk_rope_backend(metal_plan()) == "metal"
