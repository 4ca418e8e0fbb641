"""Metal essentials, with the device calls stubbed: generation raises the wired-memory limit
for its duration and puts it back, and runs on the generation stream. Whether MLX runs on
Metal is the plan's answer, made once at load: a model loaded with `on_gpu=True` stands for a
Mac, and nothing asks the device again."""

from __future__ import annotations

import logging

import mlx.core as mx
import pytest

import apertus_mlx.device as device
import apertus_mlx.generate as gen
from apertus_mlx.generate import Done, generate
from apertus_mlx.loading import load_model
from apertus_mlx.plan import make_plan
from apertus_mlx.sampling import SamplingParams
from apertus_mlx.tokenizer import load_tokenizer


@pytest.fixture
def pretend_mac(monkeypatch):
    """A Mac with `recommended` bytes of GPU working set; records the wired limits set."""
    limits: list[int] = []
    state = {"limit": 0, "recommended": 8 << 30}

    def set_wired_limit(value: int) -> int:
        old, state["limit"] = state["limit"], value
        limits.append(value)
        return old

    monkeypatch.setattr(
        device.mx,
        "device_info",
        lambda: {"max_recommended_working_set_size": state["recommended"]},
    )
    monkeypatch.setattr(device.mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(device, "generation_stream", lambda plan=None: mx.default_device())
    return limits, state


def test_wired_limit_is_raised_then_restored(pretend_mac, tiny_model_dir):
    limits, state = pretend_mac
    model = load_model(tiny_model_dir, on_gpu=True)
    with device.wired_limit(model):
        assert state["limit"] == 8 << 30
    assert limits == [8 << 30, 0] and state["limit"] == 0


def test_a_model_near_the_limit_is_warned_about(pretend_mac, tiny_model_dir, caplog):
    limits, state = pretend_mac
    model = load_model(tiny_model_dir, on_gpu=True)
    state["recommended"] = device.model_bytes(model)  # the model alone fills the GPU
    with caplog.at_level(logging.WARNING, logger="apertus_mlx"), device.wired_limit(model):
        pass
    assert "generation may be slow" in caplog.text


def test_generation_keeps_the_limit_raised_and_runs_on_its_stream(
    pretend_mac, tiny_model_dir, monkeypatch
):
    limits, state = pretend_mac
    streams: list = []
    monkeypatch.setattr(
        gen, "generation_stream", lambda plan=None: streams.append(1) or mx.default_device()
    )
    model, tokenizer = load_model(tiny_model_dir, on_gpu=True), load_tokenizer(tiny_model_dir)
    events = generate(
        model, tokenizer, [1, 2, 3], params=SamplingParams(temperature=0), max_tokens=4,
        end_tokens=(),
    )  # fmt: skip
    seen_while_generating = [(event, state["limit"]) for event in events]
    assert isinstance(seen_while_generating[-1][0], Done)
    seen_while_generating = [limit for _, limit in seen_while_generating]
    assert set(seen_while_generating[:-1]) == {8 << 30}  # raised while tokens stream
    assert state["limit"] == 0 and streams == [1]


def test_nothing_happens_on_the_cpu(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(
        device.mx, "set_wired_limit", lambda v: pytest.fail("wired limit set on the CPU")
    )
    with device.wired_limit(load_model(tiny_model_dir, on_gpu=False)):
        pass


def test_the_stream_follows_the_plan_not_the_device(monkeypatch, tiny_model_dir):
    """A model's plan answers "on Metal?"; the device is asked once, by `make_plan`."""
    model = load_model(tiny_model_dir, on_gpu=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: pytest.fail("the device was asked"))
    monkeypatch.setattr(mx, "new_thread_local_stream", lambda d: pytest.fail("a GPU stream"))
    assert device.generation_stream(model.plan) == mx.default_device()


def test_the_plan_reads_the_device_and_the_switch_once(monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: asked.append("metal") or True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    plan = make_plan(mx.bfloat16, environ={"APERTUS_MLX_NO_METAL_KERNELS": "1"})
    assert asked == ["metal"] and plan.on_gpu and plan.fast_ops and not plan.metal_kernels
    assert plan.kernels_off() == "APERTUS_MLX_NO_METAL_KERNELS=1"
    assert "qmv mlx (APERTUS_MLX_NO_METAL_KERNELS=1)" in plan.describe()
    on = make_plan(mx.bfloat16, environ={"APERTUS_MLX_NO_METAL_KERNELS": "0"})
    assert on.metal_kernels and on.kernels_off() is None and on.dtype == mx.bfloat16
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    cpu = make_plan(mx.float32, environ={})
    assert not (cpu.on_gpu or cpu.fast_ops or cpu.metal_kernels) and cpu.dtype == mx.float32
    assert cpu.kernels_off() == "no Metal GPU"
    assert cpu.describe().startswith("cpu, float32 activations, float32 KV, xielu compiled")


@pytest.mark.parametrize(
    ("stored", "quantized", "asked", "compute", "kv"),
    [
        # dense bfloat16: its own dtype (2x faster matmuls than float32 at prompt sizes)
        (mx.bfloat16, False, None, mx.bfloat16, mx.bfloat16),
        # quantized (bfloat16 scales): float32 activations, the checkpoint's dtype in the cache
        (mx.bfloat16, True, None, mx.float32, mx.bfloat16),
        (mx.float16, False, None, mx.float32, mx.float16),
        (mx.float32, False, None, mx.float32, mx.float32),
        # a dtype asked for applies to the cache too
        (mx.bfloat16, True, "float32", mx.float32, mx.float32),
        (mx.bfloat16, False, "float32", mx.float32, mx.float32),
    ],
)
def test_the_cpu_plan_picks_dtypes_by_checkpoint(
    monkeypatch, stored, quantized, asked, compute, kv
):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    plan = make_plan(stored, asked, environ={}, quantized=quantized)
    assert (plan.dtype, plan.cache_dtype) == (compute, kv)
    assert f"{str(kv)[9:]} KV" in plan.describe()
