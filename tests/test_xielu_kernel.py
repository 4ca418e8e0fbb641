"""The xIELU Metal kernel, checked without a Mac: its text compiled by g++ against stand-ins.

`metal_stand_in` runs `KERNEL_SOURCE` over the grid that `launch_geometry` returns, and the
results are compared with `xielu_reference`. On a Mac the real kernel is compared too. The
fallback (self-check, the plan's switch) is tested with stand-in kernel objects, so no Metal
API is called where there is no Metal.
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

from tests import metal_stand_in as stand_in
from tests.metal_stand_in import bits as _to_bits
from tests.metal_stand_in import cpu_plan, metal_plan

# `apertus_mlx.kernels.xielu` the attribute is the function; the module comes from importlib.
xk = importlib.import_module("apertus_mlx.kernels.xielu")

DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
SIZES = [1, 7, 1000, 4097]
# Realistic folded constants (a_p != a_n so a swap shows); beta and eps as in the checkpoints.
A_P, A_N, BETA, EPS = 0.83, 0.77, 0.5, -1e-6
TYPES = {"x": "T*", "a_p": "float&", "a_n": "float&", "beta": "float&", "eps": "float&"}


# --- inputs and comparison -------------------------------------------------------------------


def _inputs(size: int, dtype: mx.Dtype, seed: int = 0) -> mx.array:
    """Edge values first (as many as fit), then random normals of several scales, shuffled."""
    edges = xk.probe_values() + [1e-7, 2e-6, -3e-38, 3e-38, 1e-45, -1e-45, 3e38, -3e38]
    rng = np.random.default_rng(seed + size)
    normals = rng.standard_normal(size) * rng.choice([0.01, 1.0, 4.0, 30.0], size)
    values = np.concatenate([np.array(edges, np.float32), normals.astype(np.float32)])[:size]
    if size > len(edges):
        rng.shuffle(values)
    return mx.array(values).astype(dtype)


def _from_bits(bits: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """Raw element bytes -> float64 values."""
    if dtype == mx.float32:
        return bits.view(np.float32).astype(np.float64)
    if dtype == mx.float16:
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _consts() -> list[mx.array]:
    return [mx.array(v, dtype=mx.float32) for v in (A_P, A_N, BETA, EPS)]


def _reference(x: mx.array) -> mx.array:
    return xk.xielu_reference(x, *_consts())


def _assert_matches(got: np.ndarray, x: mx.array) -> None:
    """The module's own agreement rule (as the self-check uses it), with a readable failure."""
    want = _reference(x)
    ok = np.array(xk.agrees(mx.array(got.astype(np.float32)).astype(x.dtype), want, x))
    values = {"x": _from_bits(_to_bits(x), x.dtype), "got": got}
    values["want"] = _from_bits(_to_bits(want), x.dtype)
    assert ok.all(), f"{x.dtype}: " + " ".join(f"{k}={v[~ok][:8]}" for k, v in values.items())


def _run_gpp(x: mx.array, header: str | None = None) -> np.ndarray:
    """The kernel text's output for x (with `header` instead of the kernel's), as float64."""
    program = stand_in.compile_kernel(xk.KERNEL, TYPES, header=header)
    [out] = program([x, *_consts()], xk.launch_geometry(x.shape, x.dtype))
    return _from_bits(_to_bits(out), x.dtype)


# --- the kernel text, compiled with g++ ------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_text_matches_reference(dtype, size):
    x = _inputs(size, DTYPES[dtype])
    _assert_matches(_run_gpp(x), x)


def test_kernel_text_edge_values():
    """Specials land where the formula puts them: -inf gives nan (inf - inf), as torch does."""
    x = mx.array([math.inf, -math.inf, math.nan, 0.0, -0.0, -1e-6])
    got = _run_gpp(x)
    assert got[0] == math.inf and math.isnan(got[1]) and math.isnan(got[2])
    assert got[3] == got[4] == pytest.approx(A_N * math.expm1(EPS), rel=1e-6)
    assert got[5] == pytest.approx(A_N * (math.expm1(-1e-6) + 1e-6) - BETA * 1e-6, rel=1e-6)


def test_check_catches_a_naive_expm1():
    """exp(m) - 1 loses the digits that matter near eps: the agreement rule must notice."""
    naive = xk.KERNEL_HEADER.replace("if (m < -0.5f)", "if (true)")
    assert naive != xk.KERNEL_HEADER
    x = mx.array([-1e-6, -1e-7, -2e-6, -1e-5])
    got = mx.array(_run_gpp(x, header=naive).astype(np.float32))
    assert not np.array(xk.agrees(got, _reference(x), x)).any()


def test_agreement_rule():
    x = mx.array([1.0, -1.0, -2.65, math.inf, -math.inf, math.nan, -1e-6])
    want = _reference(x)
    assert np.array(xk.agrees(want, want, x)).all()
    # Near the root of the negative branch an error of a float32 ulp of the terms is fine.
    near_root = mx.array([-2.65])
    assert xk.agrees(_reference(near_root) + 2e-7, _reference(near_root), near_root).item()
    swapped = xk.xielu_reference(x, mx.array(A_N), mx.array(A_P), mx.array(BETA), mx.array(EPS))
    assert np.array(xk.agrees(swapped, want, x)).tolist()[:3] == [False, False, False]
    wrong = mx.array([1.0, math.nan, 1.0, 1e30, 0.0, 0.0, 0.0])
    assert not np.array(xk.agrees(wrong, want, x)).any()


# --- launch geometry -------------------------------------------------------------------------


def _threads(launch: dict) -> list[int]:
    """Element index of every thread MLX dispatches (dispatchThreads: exact grid)."""
    gx, gy, gz = launch["grid"]
    return [x for _ in range(gz) for _ in range(gy) for x in range(gx)]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_geometry_covers_every_element_once(shape):
    shape = tuple(shape)
    size = math.prod(shape)
    launch = xk.launch_geometry(shape, mx.bfloat16)
    assert sorted(_threads(launch)) == list(range(size))
    assert launch["output_shapes"] == [shape] and launch["output_dtypes"] == [mx.bfloat16]
    assert launch["template"] == [("T", mx.bfloat16)]
    tg = launch["threadgroup"]
    assert 1 <= math.prod(tg) <= 1024 and all(t >= 1 for t in tg)
    assert all(t <= g for t, g in zip(tg, launch["grid"]))


@pytest.mark.parametrize("size", [1, 255, 256, 257, 12288 * 4096, xk.MAX_GRID])
def test_geometry_large_sizes(size):
    launch = xk.launch_geometry((size,), mx.float16)
    assert launch["grid"] == (size, 1, 1)
    assert launch["threadgroup"] == (min(size, 256), 1, 1)


@pytest.mark.parametrize("shape", [(0,), (2, 0), (xk.MAX_GRID + 1,)])
def test_geometry_rejects_sizes_the_grid_cannot_hold(shape):
    with pytest.raises(ValueError):
        xk.launch_geometry(shape, mx.float32)


# --- path selection and fallback -------------------------------------------------------------


fresh_state = stand_in.kernel_fixtures(xk.KERNEL)


def _computed(scale: float = 1.0):
    """What a stand-in kernel object computes: the reference (times `scale`, to disagree)."""

    def compute(x, *consts):
        assert [(c.ndim, c.dtype) for c in consts] == [(0, mx.float32)] * 4
        return (xk.xielu_reference(x, *consts).astype(mx.float32) * scale).astype(x.dtype)

    return compute


def test_compiled_path_without_metal(fresh_state, monkeypatch):
    monkeypatch.setattr(xk.KERNEL, "_make", lambda: pytest.fail("kernel built on the CPU"))
    assert xk.xielu_backend(cpu_plan()) == "compiled"
    assert not xk.xielu_kernel_usable(_inputs(7, mx.float32), cpu_plan())


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_compiled_path_equals_reference_bitwise(fresh_state, dtype):
    with mx.stream(mx.cpu):
        x = _inputs(4097, dtype).reshape(17, 241)
        got, want = xk.xielu(x, *_consts(), cpu_plan()), xk.xielu_reference(x, *_consts())
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(_to_bits(got), _to_bits(want))


def test_compiled_path_inside_outer_compile_and_empty(fresh_state):
    x, plan = _inputs(1000, mx.bfloat16), cpu_plan()
    outer = mx.compile(lambda x, *c: xk.xielu(x * 1, *c, plan))
    np.testing.assert_array_equal(
        _to_bits(outer(x, *_consts())), _to_bits(xk.xielu(x, *_consts(), plan))
    )
    assert xk.xielu(mx.zeros((0, 8), mx.float16), *_consts(), metal_plan()).shape == (0, 8)


def test_switched_off_at_load_forces_fallback(fresh_state, monkeypatch):
    def use(plan):
        x = _inputs(7, mx.float32)
        assert xk.xielu_backend(plan) == "compiled" and not xk.xielu_kernel_usable(x, plan)
        _assert_matches(_from_bits(_to_bits(xk.xielu(x, *_consts(), plan)), x.dtype), x)

    stand_in.check_switched_off(xk.KERNEL, monkeypatch, use)


def test_passing_self_check_uses_kernel_per_dtype(fresh_state, monkeypatch, caplog):
    calls = stand_in.use_stand_in(xk.KERNEL, monkeypatch, _computed())
    x, plan = _inputs(1000, mx.float16), metal_plan()
    # First use inside an outer mx.compile: the self-check must work while tracing.
    outer = mx.compile(lambda x, *c: xk.xielu(x, *c, plan))
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"):
        got = outer(x, *_consts())
    np.testing.assert_array_equal(_to_bits(got), _to_bits(_reference(x)))
    assert xk.xielu_backend(plan) == "metal" and not caplog.records
    assert calls == [mx.float16, mx.float16]  # probe, then the real launch
    xk.xielu(x, *_consts(), plan)
    xk.xielu(x.astype(mx.bfloat16), *_consts(), plan)
    assert calls == [mx.float16] * 3 + [mx.bfloat16] * 2  # bfloat16 checked on its first use


@pytest.mark.parametrize("builder", stand_in.failing_builders(xk.KERNEL, _computed(scale=1.5)))
def test_failing_self_check_falls_back_for_good(fresh_state, monkeypatch, caplog, builder):
    x = _inputs(1000, mx.bfloat16)

    def use(dtype):
        got = xk.xielu(x.astype(dtype), *_consts(), metal_plan())
        _assert_matches(_from_bits(_to_bits(got), dtype), x.astype(dtype))

    stand_in.check_falls_back_for_good(xk.KERNEL, monkeypatch, caplog, builder, use)
    assert xk.xielu_backend(metal_plan()) == "compiled"


def test_other_dtypes_skip_the_kernel(fresh_state, monkeypatch):
    stand_in.check_other_dtypes_skip_the_kernel(xk.KERNEL, monkeypatch)
    x = mx.array([-2, 0, 3], dtype=mx.int32)
    assert xk.xielu(x, *_consts(), metal_plan()).dtype == mx.int32  # the compiled path keeps it


# --- the real kernel, on a Mac ---------------------------------------------------------------


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (runs on a Mac)")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_real_kernel_matches_reference(fresh_state, dtype, size):
    with mx.stream(mx.gpu):
        x = _inputs(size, dtype)
        got = xk.xielu_metal(x, *_consts())
        _assert_matches(_from_bits(_to_bits(got), dtype), x)
        xk.xielu(x, *_consts(), metal_plan())
    assert xk.xielu_backend(metal_plan()) == "metal"
