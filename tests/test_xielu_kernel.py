"""The xIELU Metal kernel, checked without a Mac: its text compiled by g++ against stand-ins.

The driver below wraps `KERNEL_SOURCE` in the signature MLX generates, runs it over the grid
that `launch_geometry` returns, and the results are compared with `xielu_reference`. On a Mac
the real kernel is compared too. The fallback (self-check, environment switch) is tested with
a fake kernel builder, so no Metal API is called where there is no Metal.
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# `apertus_mlx.kernels.xielu` the attribute is the function; the module comes from importlib.
xk = importlib.import_module("apertus_mlx.kernels.xielu")

HERE = Path(__file__).parent
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
CPP_TYPES = {"f32": "float", "f16": "half", "bf16": "bfloat16_t"}
SIZES = [1, 7, 1000, 4097]
# Realistic folded constants (a_p != a_n so a swap shows); beta and eps as in the checkpoints.
A_P, A_N, BETA, EPS = 0.83, 0.77, 0.5, -1e-6


def _signature() -> str:
    """The parameter list MLX generates: arrays as device pointers, 0-d inputs as references."""
    x, *scalars = xk.INPUT_NAMES
    params = [f"const device T* {x}"]
    params += [f"const constant float& {name}" for name in scalars]
    params += [f"device T* {name}" for name in xk.OUTPUT_NAMES]
    return ",\n    ".join([*params, "uint3 thread_position_in_grid"])


DRIVER = """
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "stand_in_metal.h"

{header}

template <typename T>
void kernel_body(
    {signature}) {{
{source}
}}

// argv: in.bin out.bin grid(3) threadgroup(3) a_p a_n beta eps
template <typename T>
int run(char** argv) {{
  FILE* f = std::fopen(argv[2], "rb");
  std::vector<T> in;
  T v;
  while (std::fread(&v, sizeof v, 1, f) == 1) in.push_back(v);
  std::fclose(f);
  const size_t n = in.size(), guard = 64;
  std::vector<unsigned char> raw((n + guard) * sizeof(T), 0x5A);  // sentinel: writes show
  T* out = reinterpret_cast<T*>(raw.data());
  uint grid[3], tg[3];
  for (int d = 0; d < 3; ++d) grid[d] = std::atoi(argv[4 + d]);
  for (int d = 0; d < 3; ++d) tg[d] = std::atoi(argv[7 + d]);
  const float a_p = std::atof(argv[10]), a_n = std::atof(argv[11]);
  const float beta = std::atof(argv[12]), eps = std::atof(argv[13]);
  // dispatchThreads: whole threadgroups, threads past the grid edge do not run.
  uint3 p;
  for (uint gz = 0; gz < (grid[2] + tg[2] - 1) / tg[2]; ++gz)
    for (uint gy = 0; gy < (grid[1] + tg[1] - 1) / tg[1]; ++gy)
      for (uint gx = 0; gx < (grid[0] + tg[0] - 1) / tg[0]; ++gx)
        for (uint lz = 0; lz < tg[2]; ++lz)
          for (uint ly = 0; ly < tg[1]; ++ly)
            for (uint lx = 0; lx < tg[0]; ++lx) {{
              p = {{gx * tg[0] + lx, gy * tg[1] + ly, gz * tg[2] + lz}};
              if (p.x < grid[0] && p.y < grid[1] && p.z < grid[2])
                kernel_body<T>(in.data(), a_p, a_n, beta, eps, out, p);
            }}
  for (size_t i = n * sizeof(T); i < raw.size(); ++i)
    if (raw[i] != 0x5A) return 3;  // wrote past the output
  f = std::fopen(argv[3], "wb");
  std::fwrite(out, sizeof(T), n, f);
  std::fclose(f);
  return 0;
}}

int main(int argc, char** argv) {{
  if (argc != 14) return 2;
  std::string dtype = argv[1];
{dispatch}
  return 2;
}}
"""


def _build(out: Path, header: str, source: str) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the Metal kernel text cannot be checked on this machine")
    dispatch = "\n".join(
        f'  if (dtype == "{name}") return run<{cpp}>(argv);' for name, cpp in CPP_TYPES.items()
    )
    text = DRIVER.format(header=header, signature=_signature(), source=source, dispatch=dispatch)
    (out / "driver.cpp").write_text(text)
    command = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    command += ["-I", str(HERE), str(out / "driver.cpp"), "-o", str(out / "driver")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"kernel text does not compile:\n{result.stderr}"
    return out / "driver"


@pytest.fixture(scope="module")
def kernel_binary(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("xielu_gpp"), xk.KERNEL_HEADER, xk.KERNEL_SOURCE)


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


def _to_bits(x: mx.array) -> np.ndarray:
    """Raw element bytes, as the kernel's buffers hold them."""
    view = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}[x.dtype]
    return np.array(x.view(view))


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


def _run_gpp(binary: Path, tmp_path: Path, x: mx.array) -> np.ndarray:
    name = next(k for k, v in DTYPES.items() if v == x.dtype)
    launch = xk.launch_geometry(x.shape, x.dtype)
    bits = _to_bits(x)
    (tmp_path / "in.bin").write_bytes(bits.tobytes())
    args = [str(binary), name, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")]
    args += [str(v) for v in (*launch["grid"], *launch["threadgroup"])]
    args += [repr(v) for v in (A_P, A_N, BETA, EPS)]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, f"driver failed ({result.returncode}): {result.stderr}"
    out = np.frombuffer((tmp_path / "out.bin").read_bytes(), dtype=bits.dtype)
    assert out.shape == (x.size,)
    return _from_bits(out, x.dtype)


# --- the kernel text, compiled with g++ ------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_text_matches_reference(kernel_binary, tmp_path, dtype, size):
    x = _inputs(size, DTYPES[dtype])
    _assert_matches(_run_gpp(kernel_binary, tmp_path, x), x)


def test_kernel_text_edge_values(kernel_binary, tmp_path):
    """Specials land where the formula puts them: -inf gives nan (inf - inf), as torch does."""
    x = mx.array([math.inf, -math.inf, math.nan, 0.0, -0.0, -1e-6])
    got = _run_gpp(kernel_binary, tmp_path, x)
    assert got[0] == math.inf and math.isnan(got[1]) and math.isnan(got[2])
    assert got[3] == got[4] == pytest.approx(A_N * math.expm1(EPS), rel=1e-6)
    assert got[5] == pytest.approx(A_N * (math.expm1(-1e-6) + 1e-6) - BETA * 1e-6, rel=1e-6)


def test_check_catches_a_naive_expm1(tmp_path):
    """exp(m) - 1 loses the digits that matter near eps: the agreement rule must notice."""
    naive = xk.KERNEL_HEADER.replace("if (m < -0.5f)", "if (true)")
    assert naive != xk.KERNEL_HEADER
    binary = _build(tmp_path, naive, xk.KERNEL_SOURCE)
    x = mx.array([-1e-6, -1e-7, -2e-6, -1e-5])
    got = mx.array(_run_gpp(binary, tmp_path, x).astype(np.float32))
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


@pytest.fixture
def fresh_state(monkeypatch):
    """Undecided backend; restored after the test."""
    monkeypatch.setattr(xk, "_disabled", None)
    monkeypatch.setattr(xk, "_checked", set())
    monkeypatch.setattr(xk, "_kernel_object", None)
    monkeypatch.delenv("APERTUS_MLX_NO_METAL_KERNELS", raising=False)


@pytest.fixture
def pretend_metal(monkeypatch, fresh_state):
    """Make the module believe a Metal GPU is the default device; the kernel stays fake."""
    monkeypatch.setattr(xk.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(xk.mx, "default_device", lambda: mx.gpu)


def _fake_kernel(scale: float = 1.0, calls: list | None = None):
    """Stands in for the metal_kernel object: checks the launch arguments, computes in mx."""

    def kernel(*, inputs, grid, threadgroup, output_shapes, output_dtypes, template):
        x, *consts = inputs
        assert [c.ndim for c in consts] == [0, 0, 0, 0]
        assert grid == (x.size, 1, 1) and threadgroup == (min(xk.THREADGROUP, x.size), 1, 1)
        assert output_shapes == [x.shape] and output_dtypes == [x.dtype]
        assert template == [("T", x.dtype)]
        if calls is not None:
            calls.append(x.dtype)
        return [(xk.xielu_reference(x, *consts).astype(mx.float32) * scale).astype(x.dtype)]

    return kernel


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal")
def test_compiled_path_without_metal(fresh_state):
    assert xk.xielu_backend() == "compiled"


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_compiled_path_equals_reference_bitwise(fresh_state, monkeypatch, dtype):
    monkeypatch.setenv("APERTUS_MLX_NO_METAL_KERNELS", "1")
    with mx.stream(mx.cpu):
        x = _inputs(4097, dtype).reshape(17, 241)
        got, want = xk.xielu(x, *_consts()), xk.xielu_reference(x, *_consts())
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_array_equal(_to_bits(got), _to_bits(want))


def test_compiled_path_inside_outer_compile_and_empty(fresh_state):
    x = _inputs(1000, mx.bfloat16)
    outer = mx.compile(lambda x, *c: xk.xielu(x * 1, *c))
    np.testing.assert_array_equal(_to_bits(outer(x, *_consts())), _to_bits(xk.xielu(x, *_consts())))
    assert xk.xielu(mx.zeros((0, 8), mx.float16), *_consts()).shape == (0, 8)


def test_environment_forces_fallback(pretend_metal, monkeypatch):
    monkeypatch.setenv("APERTUS_MLX_NO_METAL_KERNELS", "1")
    monkeypatch.setattr(xk, "_kernel", lambda: pytest.fail("kernel built despite the switch"))
    assert xk.xielu_backend() == "compiled"
    xk.xielu(_inputs(7, mx.float32), *_consts())


def test_passing_self_check_uses_kernel_per_dtype(pretend_metal, monkeypatch, caplog):
    calls: list = []
    monkeypatch.setattr(xk, "_kernel", lambda: _fake_kernel(calls=calls))
    x = _inputs(1000, mx.float16)
    # First use inside an outer mx.compile: the self-check must work while tracing.
    outer = mx.compile(lambda x, *c: xk.xielu(x, *c))
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"):
        got = outer(x, *_consts())
    np.testing.assert_array_equal(_to_bits(got), _to_bits(_reference(x)))
    assert xk.xielu_backend() == "metal" and not caplog.records
    assert calls == [mx.float16, mx.float16]  # probe, then the real launch
    xk.xielu(x, *_consts())
    xk.xielu(x.astype(mx.bfloat16), *_consts())
    assert calls == [mx.float16] * 3 + [mx.bfloat16] * 2  # bfloat16 checked on its first use


@pytest.mark.parametrize(
    "builder",
    [
        pytest.param(lambda: _fake_kernel(scale=1.5), id="disagrees"),
        pytest.param(
            lambda: (_ for _ in ()).throw(RuntimeError("Unable to build metal library\nline 2")),
            id="fails-to-compile",
        ),
    ],
)
def test_failing_self_check_falls_back_for_good(pretend_metal, monkeypatch, caplog, builder):
    built: list = []
    monkeypatch.setattr(xk, "_kernel", lambda: built.append(1) or builder())
    x = _inputs(1000, mx.bfloat16)
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"):
        for dtype in (mx.bfloat16, mx.bfloat16, mx.float32):
            got = xk.xielu(x.astype(dtype), *_consts())
            _assert_matches(_from_bits(_to_bits(got), dtype), x.astype(dtype))
    assert xk.xielu_backend() == "compiled"
    assert len(built) == 1, "the kernel was tried again after failing"
    [record] = caplog.records
    assert record.name == "apertus_mlx" and "\n" not in record.getMessage()
    assert "mx.compile" in record.getMessage()


# --- the real kernel, on a Mac ---------------------------------------------------------------


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (runs on a Mac)")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_real_kernel_matches_reference(fresh_state, dtype, size):
    with mx.stream(mx.gpu):
        x = _inputs(size, dtype)
        got = xk._xielu_metal(x, *_consts())
        _assert_matches(_from_bits(_to_bits(got), dtype), x)
        xk.xielu(x, *_consts())
    assert xk.xielu_backend() == "metal"
