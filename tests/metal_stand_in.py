"""Run a Metal kernel's text without Metal: g++ compiles it against tests/stand_in_metal.h.

`compile_kernel` wraps a kernel's header and source in the signature MLX generates (arrays as
device pointers, plus `<name>_shape` / `_strides` / `_ndim` only where the source mentions them;
0-d inputs as `constant` references; the thread attributes the source mentions) and a driver
that runs every threadgroup of the launch grid, as dispatchThreads does, its threads in
lock-step simdgroups of 32 (the header's scheduler). Kernels with template parameters beyond T
are compiled for a list of instantiations in one program. Builds are cached for the session.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from apertus_mlx.plan import Plan

HERE = Path(__file__).parent
CPP_TYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t"}
VIEWS = {mx.float32: mx.uint32, mx.int32: mx.int32, mx.uint32: mx.uint32}
BITS = {mx.float32: np.uint32, mx.float16: np.uint16, mx.bfloat16: np.uint16, mx.int32: np.int32}
_BUILDS = tempfile.TemporaryDirectory(prefix="metal_stand_in_")

# The thread attributes MLX passes when a kernel's source mentions them, in MLX's order, with
# how the driver computes each (i: index in the threadgroup; local, group: uint3 positions).
ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": ("uint", "static_cast<uint>(i) / 32"),
    "simdgroups_per_threadgroup": ("uint", "(threads + 31) / 32"),
    "thread_index_in_simdgroup": ("uint", "static_cast<uint>(i) % 32"),
    "thread_index_in_threadgroup": ("uint", "static_cast<uint>(i)"),
    "thread_position_in_grid": ("uint3", "global"),
    "thread_position_in_threadgroup": ("uint3", "local"),
    "threadgroup_position_in_grid": ("uint3", "group"),
    "threads_per_threadgroup": ("uint3", "uint3{tg[0], tg[1], tg[2]}"),
}


@dataclass(frozen=True)
class Strided:
    """An array input read as `shape`/`strides` (in elements) from `start` of a flat buffer."""

    buffer: mx.array
    start: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def bits(x: mx.array) -> np.ndarray:
    """Raw element bytes, as a kernel's buffer holds them."""
    return np.array(x.view(VIEWS.get(x.dtype, mx.uint16)))


DRIVER = """
#include <cstdio>
#include <string>
#include <vector>
#include "stand_in_metal.h"

{header}

{template}
void kernel_body(
    {signature}) {{
{source}
}}

template <typename E>
std::vector<E> read_all(const std::string& path) {{
  FILE* f = std::fopen(path.c_str(), "rb");
  std::vector<E> data;
  E v;
  while (f && std::fread(&v, sizeof v, 1, f) == 1) data.push_back(v);
  if (f) std::fclose(f);
  return data;
}}

// dir holds <input>.bin (raw elements), <array input>.meta (start ndim shape strides) and
// launch.meta (grid(3) threadgroup(3) output sizes); the driver writes <output>.bin.
{template}
int run(const std::string& dir) {{
  const std::vector<long long> launch = read_all<long long>(dir + "/launch.meta");
  uint grid[3], tg[3];
  for (int d = 0; d < 3; ++d) grid[d] = launch[d], tg[d] = launch[3 + d];
  const size_t guard = 64;
  const int threads = tg[0] * tg[1] * tg[2];
{setup}
  // dispatchThreads: whole threadgroups, threads past the grid edge do not exist.
  for (uint gz = 0; gz < (grid[2] + tg[2] - 1) / tg[2]; ++gz)
    for (uint gy = 0; gy < (grid[1] + tg[1] - 1) / tg[1]; ++gy)
      for (uint gx = 0; gx < (grid[0] + tg[0] - 1) / tg[0]; ++gx) {{
        const uint3 group = {{gx, gy, gz}};
        std::vector<bool> live(threads);
        for (int i = 0; i < threads; ++i)
          live[i] = gx * tg[0] + i % tg[0] < grid[0] && gy * tg[1] + i / tg[0] % tg[1] < grid[1] &&
                    gz * tg[2] + i / (tg[0] * tg[1]) < grid[2];
        auto one_thread = [&](int i) {{
          const uint3 local = {{i % tg[0], i / tg[0] % tg[1], i / (tg[0] * tg[1])}};
          const uint3 global = {{group.x * tg[0] + local.x, group.y * tg[1] + local.y,
                                group.z * tg[2] + local.z}};
          (void)local, (void)global;
          kernel_body{instance}({arguments});
        }};
        stand_in::run_threadgroup(threads, live, one_thread);
      }}
{finish}
  return 0;
}}

int main(int argc, char** argv) {{
  if (argc != 3) return 2;
  const std::string which = argv[1];
{dispatch}
  return 2;
}}
"""

ARRAY_SETUP = """  const std::vector<{t}> {n}_buffer = read_all<{t}>(dir + "/{n}.bin");
  const std::vector<long long> {n}_meta = read_all<long long>(dir + "/{n}.meta");
  const {t}* {n}_data = {n}_buffer.data() + {n}_meta[0];
  const int {n}_ndim_value = {n}_meta[1];
  int {n}_shape_value[8];
  int64_t {n}_strides_value[8];
  for (int d = 0; d < {n}_ndim_value; ++d)
    {n}_shape_value[d] = {n}_meta[2 + d], {n}_strides_value[d] = {n}_meta[2 + {n}_ndim_value + d];
  (void){n}_shape_value, (void){n}_strides_value;"""
SCALAR_SETUP = """  const {t} {n}_value = read_all<{t}>(dir + "/{n}.bin").at(0);"""
# Sentinel 0xFF: nan in every float type, so an element left unwritten shows.
OUTPUT_SETUP = """  const size_t {n}_size = launch[6 + {i}];
  std::vector<unsigned char> {n}_raw(({n}_size + guard) * sizeof(T), 0xFF);
  T* {n} = reinterpret_cast<T*>({n}_raw.data());"""
OUTPUT_FINISH = """  for (size_t i = {n}_size * sizeof(T); i < {n}_raw.size(); ++i)
    if ({n}_raw[i] != 0xFF) return 3;  // wrote past the output
  FILE* {n}_file = std::fopen((dir + "/{n}.bin").c_str(), "wb");
  std::fwrite({n}, sizeof(T), {n}_size, {n}_file);
  std::fclose({n}_file);"""

Instance = tuple[tuple[str, object], ...]  # a template's (name, dtype or int) pairs, in order


def _cpp(value: object) -> str:
    if isinstance(value, mx.Dtype):
        return CPP_TYPES[value]
    return str(int(value))


def _generate(
    header: str,
    source: str,
    types: dict[str, str],
    outputs: Sequence[str],
    instances: Sequence[Instance],
) -> str:
    """The driver's C++ text. `types` maps each input to MLX's parameter type: `T*`, `float&`."""
    params, args, setup = [], [], []
    for name, kind in types.items():
        element = kind[:-1]
        if kind.endswith("&"):
            params.append(f"const constant {element}& {name}")
            args.append(f"{name}_value")
            setup.append(SCALAR_SETUP.format(t=element, n=name))
            continue
        params.append(f"const device {element}* {name}")
        args.append(f"{name}_data")
        setup.append(ARRAY_SETUP.format(t=element, n=name))
        for suffix, kind in (("shape", "int*"), ("strides", "int64_t*"), ("ndim", "int&")):
            if f"{name}_{suffix}" in source:
                params.append(f"const constant {kind} {name}_{suffix}")
                args.append(f"{name}_{suffix}_value")
    params += [f"device T* {name}" for name in outputs]
    args += list(outputs)
    for attribute, (kind, value) in ATTRIBUTES.items():
        if attribute in source:
            params.append(f"{kind} {attribute}")
            args.append(value)
    setup += [OUTPUT_SETUP.format(n=name, i=i) for i, name in enumerate(outputs)]
    names = [name for name, _ in instances[0]]
    kinds = [("typename" if isinstance(v, mx.Dtype) else "int") for _, v in instances[0]]
    dispatch = "\n".join(
        f'  if (which == "{i}") return run<{", ".join(_cpp(v) for _, v in instance)}>(argv[2]);'
        for i, instance in enumerate(instances)
    )
    return DRIVER.format(
        header=header,
        template="template <" + ", ".join(f"{k} {n}" for k, n in zip(kinds, names)) + ">",
        instance="<" + ", ".join(names) + ">",
        signature=",\n    ".join(params),
        source=source,
        setup="\n".join(setup),
        arguments=", ".join(args),
        finish="\n".join(OUTPUT_FINISH.format(n=name) for name in outputs),
        dispatch=dispatch,
    )


@dataclass(frozen=True)
class Program:
    """A kernel text compiled with g++: call it like the kernel object, get mx arrays back."""

    path: Path
    types: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    instances: tuple[Instance, ...]

    def __call__(self, inputs: Sequence[mx.array | Strided], launch: dict) -> list[mx.array]:
        instance = tuple(launch["template"])
        assert instance in self.instances, f"not compiled for {instance}"
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            for (name, _), value in zip(self.types, inputs):
                if not isinstance(value, Strided):
                    strides = [math.prod(value.shape[d + 1 :]) for d in range(value.ndim)]
                    value = Strided(value, 0, tuple(value.shape), tuple(strides))
                (run / f"{name}.bin").write_bytes(bits(value.buffer).tobytes())
                meta = [value.start, len(value.shape), *value.shape, *value.strides]
                (run / f"{name}.meta").write_bytes(np.array(meta, np.int64).tobytes())
            sizes = [math.prod(s) for s in launch["output_shapes"]]
            meta = [*launch["grid"], *launch["threadgroup"], *sizes]
            (run / "launch.meta").write_bytes(np.array(meta, np.int64).tobytes())
            which = str(self.instances.index(instance))
            result = subprocess.run([str(self.path), which, tmp], capture_output=True, text=True)
            assert result.returncode == 0, f"driver failed ({result.returncode}): {result.stderr}"
            outs = []
            for name, shape, out_dtype in zip(
                self.outputs, launch["output_shapes"], launch["output_dtypes"]
            ):
                raw = np.frombuffer((run / f"{name}.bin").read_bytes(), BITS[out_dtype])
                assert raw.size == math.prod(shape)
                outs.append(mx.array(raw).view(out_dtype).reshape(shape))
        return outs


@functools.cache
def _compile(
    header: str,
    source: str,
    types: tuple[tuple[str, str], ...],
    outputs: tuple[str, ...],
    instances: tuple[Instance, ...],
) -> Program:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the Metal kernel text cannot be checked on this machine")
    out = Path(tempfile.mkdtemp(dir=_BUILDS.name))
    (out / "driver.cpp").write_text(_generate(header, source, dict(types), outputs, instances))
    command = [compiler, "-std=c++17", "-O0", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    command += ["-Wno-deprecated-declarations"]  # ucontext, deprecated on macOS
    command += ["-I", str(HERE), str(out / "driver.cpp"), "-o", str(out / "driver")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"kernel text does not compile:\n{result.stderr}"
    return Program(out / "driver", types, outputs, instances)


def compile_kernel(
    kernel,
    types: dict[str, str],
    header: str | None = None,
    source: str | None = None,
    instances: Sequence[Instance] | None = None,
) -> Program:
    """`kernel`'s text (or a variant of its header/source) as a g++ program; cached.

    `types` gives each of `kernel.input_names` its parameter type: `T*`, `float*`, `int32_t&`.
    `instances` lists the template instantiations to build (each as launch["template"] says
    it); by default `T` alone, for every float type.
    """
    assert tuple(types) == kernel.input_names, "one type per kernel input, in order"
    header = kernel.header if header is None else header
    source = kernel.source if source is None else source
    if instances is None:
        instances = [(("T", dtype),) for dtype in CPP_TYPES]
    instances = tuple(tuple(instance) for instance in instances)
    return _compile(header, source, tuple(types.items()), kernel.output_names, instances)


# --- path selection and fallback, with stand-ins for the kernel object -------------------------


def metal_plan(dtype: mx.Dtype = mx.float32, fuse_qkv: bool = False) -> Plan:
    """The plan of a Mac with our kernels allowed: nothing asks the device after the plan."""
    return Plan(on_gpu=True, dtype=dtype, fast_ops=True, metal_kernels=True, fuse_qkv=fuse_qkv)


def cpu_plan(dtype: mx.Dtype = mx.float32, fuse_qkv: bool = False) -> Plan:
    return Plan(on_gpu=False, dtype=dtype, fast_ops=False, metal_kernels=False, fuse_qkv=fuse_qkv)


def pretend_gpu(monkeypatch) -> None:
    """Make MLX claim a Metal GPU as the default device (for `make_plan` only)."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)


def kernel_fixtures(*kernels) -> Callable:
    """The fixture `fresh_state` for a test module of `kernels`: undecided before, reset after."""

    @pytest.fixture
    def fresh_state():
        for kernel in kernels:
            kernel.reset()
        yield
        for kernel in kernels:
            kernel.reset()

    return fresh_state


def stand_in(
    kernel, compute: Callable[..., object], calls: list | None = None, geometry: bool = True
):
    """A kernel object computing `compute(*inputs)` in mx (an array, or a tuple for kernels
    with several outputs). With `geometry`, the launch must be `kernel.geometry(x)`'s; without,
    `compute` also receives the launch, as `launch=`."""

    def run(*, inputs, **launch):
        x = inputs[0]
        if geometry:
            assert launch == kernel.geometry(x.shape, x.dtype)
        if calls is not None:
            calls.append(x.dtype)
        out = compute(*inputs) if geometry else compute(*inputs, launch=launch)
        return list(out) if isinstance(out, tuple) else [out]

    return run


def use_stand_in(
    kernel, monkeypatch, compute: Callable[..., object], geometry: bool = True
) -> list:
    """Have `kernel` build `stand_in(compute)`; returns the dtypes it is launched on."""
    calls: list = []
    monkeypatch.setattr(kernel, "_make", lambda: stand_in(kernel, compute, calls, geometry))
    return calls


def _fails_to_compile():
    raise RuntimeError("Unable to build metal library\nline 2")


def failing_builders(kernel, wrong: Callable[..., object], geometry: bool = True) -> list:
    """Parameters for `check_falls_back_for_good`: a kernel that disagrees, one that fails."""
    return [
        pytest.param(lambda: stand_in(kernel, wrong, geometry=geometry), id="disagrees"),
        pytest.param(_fails_to_compile, id="fails-to-compile"),
    ]


def check_switched_off(kernel, monkeypatch, use: Callable[[Plan], None]) -> None:
    """`APERTUS_MLX_NO_METAL_KERNELS=1` at load keeps a (pretended) Metal GPU off the kernel, and
    the environment is not read again: `use(plan)` must take the fallback, the kernel unbuilt."""
    from apertus_mlx.plan import make_plan

    pretend_gpu(monkeypatch)
    monkeypatch.setenv("APERTUS_MLX_NO_METAL_KERNELS", "1")
    plan = make_plan(mx.bfloat16)
    assert plan.on_gpu and plan.fast_ops and not plan.metal_kernels
    monkeypatch.setenv("APERTUS_MLX_NO_METAL_KERNELS", "0")  # too late: read at load only
    monkeypatch.setattr(kernel, "_make", lambda: pytest.fail("kernel built despite the switch"))
    assert kernel.status(plan) == kernel.fallback
    use(plan)


def check_other_dtypes_skip_the_kernel(kernel, monkeypatch, *variant) -> None:
    """A dtype the kernel does not serve goes to the fallback unchecked, the kernel unbuilt."""
    monkeypatch.setattr(kernel, "_make", lambda: pytest.fail("kernel built for another dtype"))
    assert not kernel.usable(mx.int32, *variant) and not kernel.usable(mx.complex64, *variant)
    assert kernel.status(metal_plan()) == "metal" and kernel.disabled is None


def check_falls_back_for_good(kernel, monkeypatch, caplog, builder, use: Callable) -> None:
    """A failing self-check: one log line, the fallback from then on, no second attempt.

    `use(dtype)` calls the public function and asserts it returned the fallback's result.
    """
    built: list = []
    monkeypatch.setattr(kernel, "_make", lambda: built.append(1) or builder())
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"):
        for dtype in (mx.bfloat16, mx.bfloat16, mx.float32):
            use(dtype)
    assert kernel.status(metal_plan()) == kernel.fallback
    assert len(built) == 1, "the kernel was tried again after failing"
    [record] = caplog.records
    assert record.name == "apertus_mlx" and "\n" not in record.getMessage()
    assert record.getMessage().startswith(f"{kernel.label} Metal kernel ")
    assert record.getMessage().endswith(f"; using {kernel.fallback_note}")
