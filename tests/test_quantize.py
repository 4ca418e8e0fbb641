"""Quantized checkpoints: mlx-lm's load here with mlx-lm's logits, ours load in mlx-lm, and
what each width costs in fidelity. All on tiny random fixtures, so every case runs in well
under a second."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map

from apertus_mlx import quantize as q
from apertus_mlx.cli import cli
from apertus_mlx.errors import DestinationError, UsageError, WeightsError
from apertus_mlx.fidelity import fidelity_report, format_report
from apertus_mlx.loading import load_model
from apertus_mlx.quantize import quantize_checkpoint
from tests.checkpoints import build_checkpoint

BF16 = "gqa-llama3-bf16"  # hidden 64, intermediate 160, 2 layers, untied
TIED = "tied-bf16-sharded"  # 3 layers, tied embeddings, sharded safetensors
WIDE = {  # every group size (32, 64, 128) divides every input dimension
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    out = tmp_path_factory.mktemp("wide-bf16")
    return build_checkpoint(out, tokenizer_dir, vocab_size, WIDE, "bfloat16")


@pytest.fixture(scope="module")
def ids(vocab_size) -> mx.array:
    return mx.array(np.random.default_rng(0).integers(0, vocab_size, size=(1, 40)))


# -- helpers: mlx-lm on one side, us on the other ------------------------------------------


def mlx_lm_convert(src: Path, out: Path, bits: int, group_size: int, mode="affine", recipe=None):
    """What `mlx_lm.convert(..., quantize=True)` writes, minus the tokenizer it would re-save."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = mlx_lm_load(src, lazy=True)
    predicate = recipe and mixed_quant_predicate_builder(recipe, model, group_size)
    model, config = quantize_model(
        model, config, group_size, bits, mode=mode, quant_predicate=predicate
    )
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def mlx_lm_model(path: Path):
    """mlx-lm's model for `path`, cast to float32 as our CPU loading is (mlx-lm computes in the
    stored dtype; scales and biases become float32, packed weights stay packed)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(path))
    model.update(
        tree_map(
            lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    return model


def logits(model, ids: mx.array) -> np.ndarray:
    return np.array(model(ids).astype(mx.float32))


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= tol, f"relative error {err:.2e}"


def quantized_layers(model) -> dict[str, tuple[int, int, str]]:
    return {
        p: (m.bits, m.group_size, m.mode) for p, m in model.named_modules() if hasattr(m, "bits")
    }


def mode_supported(mode: str) -> bool:
    group, bits = q.FP_MODES[mode]
    try:
        mx.eval(mx.quantize(mx.ones((8, 64)), group_size=group, bits=bits, mode=mode))
    except (ValueError, RuntimeError):
        return False
    return True


# -- checkpoints made by mlx-lm load here ---------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_mlx_lm_affine_checkpoints_give_mlx_lm_logits(wide, tmp_path, ids, bits, group_size):
    path = mlx_lm_convert(wide, tmp_path / "q", bits, group_size)
    model = load_model(path, fuse=True)
    assert model.model.norm.weight.dtype == mx.float32  # CPU: computes in float32
    # but keeps the scales as stored (memory)
    assert model.layers[0].self_attn.qkv_proj.scales.dtype == mx.bfloat16
    assert model.model.embed_tokens.scales.dtype == mx.bfloat16
    layers = quantized_layers(model)
    assert layers["model.embed_tokens"] == (bits, group_size, "affine")
    assert layers["model.layers.0.self_attn.qkv_proj"] == (bits, group_size, "affine")
    assert_close(logits(model, ids), logits(mlx_lm_model(path), ids))


def fp_mode(mode: str):
    """The floating-point format `mode` as a parameter, skipped where MLX cannot run it."""
    return pytest.param(
        mode,
        marks=pytest.mark.skipif(
            not mode_supported(mode),
            reason=f"the installed MLX cannot quantize to {mode} on {mx.default_device()}",
        ),
    )


FP_MODES = [fp_mode(m) for m in q.FP_MODES]


@pytest.mark.parametrize("mode", FP_MODES)
def test_mlx_lm_float_formats_load(checkpoint, tmp_path, ids, mode):
    group, bits = q.FP_MODES[mode]
    path = mlx_lm_convert(checkpoint(BF16), tmp_path / "q", bits, group, mode=mode)
    for fuse in (False, True):
        model = load_model(path, fuse=fuse)
        layers = quantized_layers(model)
        assert layers["lm_head"] == layers["model.embed_tokens"] == (bits, group, mode)
        assert_close(logits(model, ids), logits(mlx_lm_model(path), ids))


def test_mlx_lm_mixed_recipe_and_false_overrides(checkpoint, tmp_path, ids):
    path = mlx_lm_convert(checkpoint(BF16), tmp_path / "q", 4, 32, recipe="mixed_4_6")
    block = json.loads((path / "config.json").read_text())["quantization"]
    assert block["lm_head"]["bits"] == 6 and block["model.layers.0.mlp.up_proj"]["bits"] == 4
    model = load_model(path, fuse=False)
    assert quantized_layers(model)["lm_head"] == (6, 32, "affine")
    assert_close(logits(model, ids), logits(mlx_lm_model(path), ids))

    # `false` for a layer: stays a float Linear even where the weights look quantized-able
    unq = mlx_lm_convert(checkpoint(BF16), tmp_path / "g64", 4, 64)  # down_proj (160) skipped
    cfg = json.loads((unq / "config.json").read_text())
    cfg["quantization"]["model.layers.0.mlp.down_proj"] = False
    (unq / "config.json").write_text(json.dumps(cfg))
    model = load_model(unq)
    assert type(model.layers[0].mlp.down_proj) is nn.Linear
    assert_close(logits(model, ids), logits(mlx_lm_model(unq), ids))


def test_mlx_lm_tied_checkpoint_head_is_the_quantized_embedding(checkpoint, tmp_path, ids):
    path = mlx_lm_convert(checkpoint(TIED), tmp_path / "q", 4, 32)
    model = load_model(path)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert "lm_head" not in model
    assert_close(logits(model, ids), logits(mlx_lm_model(path), ids))


def test_quantization_block_contradicting_tensors_is_named(checkpoint, tmp_path):
    path = quantize_checkpoint(checkpoint(BF16), tmp_path / "q8", 8, group_size=32).out
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"]["bits"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"says .+ 4 bits in groups of 32.+packed as 8 bits"):
        load_model(path)


# -- checkpoints we make ---------------------------------------------------------------------


def test_our_checkpoint_is_mlx_lm_format_and_loads_there(checkpoint, tmp_path, ids):
    src = checkpoint(BF16)
    result = quantize_checkpoint(src, tmp_path / "q4", 4, group_size=32)
    out = result.out
    assert result.unquantized == [] and result.quantization == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == result.quantization
    assert cfg["hidden_size"] == 64 and list(cfg) == sorted(cfg)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_parameters"] == result.total_parameters
    weights, meta = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "mlx"} and set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())
    assert weights["lm_head.weight"].dtype == mx.uint32
    assert weights["lm_head.scales"].dtype == mx.bfloat16  # the source dtype, as mlx-lm
    assert weights["model.layers.1.mlp.act_fn.alpha_p"].shape == ()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).is_file() == (src / f).is_file()
    assert 5.0 <= result.bits_per_weight <= 5.1  # 4 + (16 + 16) / 32, norms are negligible

    ours = logits(load_model(out), ids)
    assert_close(ours, logits(mlx_lm_model(out), ids))
    # and the same as mlx-lm's own conversion of the same source
    theirs = mlx_lm_convert(src, tmp_path / "mlx-lm", 4, 32)
    assert_close(ours, logits(load_model(theirs), ids), tol=1e-6)


@pytest.mark.parametrize("mode", FP_MODES)
def test_our_float_format_checkpoints_load_in_mlx_lm(checkpoint, tmp_path, ids, mode):
    group, bits = q.FP_MODES[mode]
    result = quantize_checkpoint(checkpoint(BF16), tmp_path / "q", bits, mode=mode)
    assert result.group_size == group and result.unquantized == []
    scales = mx.load(str(result.out / "model.safetensors"))["lm_head.scales"]
    assert scales.dtype == mx.uint8
    ours = logits(load_model(result.out), ids)
    assert_close(ours, logits(mlx_lm_model(result.out), ids))


def test_mixed_recipe_overrides_as_mlx_lm_writes_them(checkpoint, tmp_path, ids):
    result = quantize_checkpoint(
        checkpoint(BF16), tmp_path / "mixed", 4, embedding_bits=6, head_bits=8
    )
    block = json.loads((result.out / "config.json").read_text())["quantization"]
    assert block == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 64, "bits": 6, "mode": "affine"},
        "lm_head": {"group_size": 64, "bits": 8, "mode": "affine"},
    }
    # group 64 does not divide the MLP's 160: down_proj stays in bf16, and we say so
    assert result.unquantized == [
        (f"model.layers.{i}.mlp.down_proj", "input dimension 160 is not divisible by group size 64")
        for i in range(2)
    ]
    model = load_model(result.out)
    layers = quantized_layers(model)
    assert layers["lm_head"][0] == 8 and layers["model.embed_tokens"][0] == 6
    assert layers["model.layers.0.self_attn.qkv_proj"][0] == 4
    assert type(model.layers[0].mlp.down_proj) is nn.Linear
    assert_close(logits(model, ids), logits(mlx_lm_model(result.out), ids))


def test_tied_checkpoint_quantized_embedding_serves_as_head(checkpoint, tmp_path, ids):
    src = checkpoint(TIED)
    result = quantize_checkpoint(src, tmp_path / "tied", 3, group_size=32, head_bits=6)
    assert result.quantization["model.embed_tokens"]["bits"] == 6
    assert "lm_head" not in result.quantization
    model = load_model(result.out)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and "lm_head" not in model
    assert_close(logits(model, ids), logits(mlx_lm_model(result.out), ids))


def test_source_without_xielu_buffers_gets_the_defaults(checkpoint, tmp_path, ids):
    src = tmp_path / "src"
    shutil.copytree(checkpoint(BF16), src)
    weights = mx.load(str(src / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.endswith((".act_fn.beta", ".act_fn.eps"))}
    assert len(kept) == len(weights) - 4
    mx.save_safetensors(str(src / "model.safetensors"), kept)
    out = quantize_checkpoint(src, tmp_path / "q", 8, group_size=32).out
    written = mx.load(str(out / "model.safetensors"))
    for i in range(2):
        assert written[f"model.layers.{i}.mlp.act_fn.beta"].item() == 0.5
        assert written[f"model.layers.{i}.mlp.act_fn.eps"].item() == pytest.approx(-1e-6, rel=1e-2)
    assert_close(logits(load_model(out), ids), logits(mlx_lm_model(out), ids))  # strict load


def test_fidelity_falls_as_bits_rise(checkpoint, tmp_path, vocab_size):
    src = checkpoint(BF16)
    widths = (2, 3, 4, 6, 8)
    outs = [quantize_checkpoint(src, tmp_path / f"q{b}", b, group_size=32).out for b in widths]
    text = np.random.default_rng(1).integers(0, vocab_size, size=96).tolist()
    rows = fidelity_report(src, outs, text)
    assert "Δppl" in format_report(rows).splitlines()[0]
    source, quantized = rows[0], rows[1:]
    assert source["kl"] == 0 and source["top1"] == 1 and source["bits_per_weight"] == 16
    assert [r["bits"] for r in quantized] == list(widths)
    kl = [r["kl"] for r in quantized]
    # each extra bit roughly quarters the KL; ask only for a clear fall (robust to the seed)
    assert all(a > 1.5 * b for a, b in zip(kl, kl[1:])), kl
    bpw = [r["bits_per_weight"] for r in quantized]
    assert bpw == sorted(bpw) and bpw[-1] < 9.1
    eight = quantized[-1]
    assert eight["kl"] < 1e-4 and eight["top1"] >= 0.95 and abs(eight["ppl_change"]) < 0.01
    # a loaded model works as well as a directory
    model_row = fidelity_report(src, [load_model(outs[-1])], text)[1]
    assert model_row["kl"] == pytest.approx(eight["kl"], rel=1e-3)


# -- bad input and atomic writes -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 7}, "cannot quantize to 7 bits"),
        ({"bits": 4, "group_size": 48}, "group size 48"),
        ({"bits": 4, "mode": "int4"}, "unknown quantization mode"),
        ({"bits": 8, "mode": "mxfp4"}, "mxfp4 means 4 bits"),
        ({"bits": 4, "embedding_bits": 7}, "7 bits"),
        ({"bits": 4, "mode": "mxfp4", "head_bits": 8}, "needs --mode affine"),
    ],
)
def test_bad_settings_fail_before_any_work(checkpoint, tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        quantize_checkpoint(checkpoint(BF16), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_group_size_dividing_nothing_is_refused(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="no layer's input dimension is divisible by group size"):
        quantize_checkpoint(checkpoint(BF16), tmp_path / "out", 4, group_size=128)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(checkpoint, tmp_path):
    src, out = checkpoint(BF16), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="--force"):
        quantize_checkpoint(src, out, 4, group_size=32)
    assert (out / "keep.txt").is_file()
    quantize_checkpoint(src, out, 4, group_size=32, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftovers beside it
    with pytest.raises(UsageError, match="is the source"):
        quantize_checkpoint(src, src, 4, force=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_checkpoint(checkpoint, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(q, "save_config", fail)  # after the weights are written
    with pytest.raises(DestinationError, match="disk full"):
        quantize_checkpoint(checkpoint(BF16), out, 4, group_size=32, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_sharding_respects_the_limit(checkpoint, tmp_path, ids):
    result = q.quantize_checkpoint(checkpoint(TIED), tmp_path / "q", 4, group_size=32)
    shutil.rmtree(result.out)
    result = q.quantize_checkpoint(
        checkpoint(TIED), tmp_path / "q", 4, group_size=32, max_shard_bytes=20_000
    )
    shards = sorted(result.out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (result.out / "model.safetensors").exists()
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_close(logits(load_model(result.out), ids), logits(mlx_lm_model(result.out), ids))


# -- the command -----------------------------------------------------------------------------


def test_convert_command(checkpoint, tmp_path, monkeypatch):
    src = checkpoint(BF16)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(src), "--bits", "4"])
    assert res.exit_code == 0, res.output
    default_out = tmp_path / f"{src.name}-4bit"
    assert (default_out / "config.json").is_file()
    assert "bits per weight" in res.output
    assert "model.layers.0.mlp.down_proj: input dimension 160" in res.output

    out = tmp_path / "json"
    res = runner.invoke(
        cli, ["convert", str(src), "--bits", "8", "--group-size", "32", "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["out"] == str(out) and data["bits"] == 8 and data["unquantized"] == []
    assert 9.0 < data["bits_per_weight"] < 9.1

    if (src / "tokenizer.json").is_file():  # the report tokenizes the built-in text
        res = runner.invoke(
            cli, ["convert", str(src), "--bits", "8", "--out", str(out), "--force", "--report"]
        )
        assert res.exit_code == 0, res.output
        assert "fidelity" in res.output and "top-1" in res.output


def test_convert_command_bad_bits_is_a_usage_error(checkpoint, tmp_path, monkeypatch, capsys):
    from apertus_mlx.cli import main

    out = tmp_path / "out"
    monkeypatch.setattr(
        sys, "argv", ["apertus-mlx", "convert", str(checkpoint(BF16)), "--bits", "7", "--out", out]
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "cannot quantize to 7 bits" in capsys.readouterr().err
    assert not out.exists()


def test_output_containing_or_inside_the_source_is_refused(checkpoint, tmp_path):
    parent = tmp_path / "models"
    src = parent / "src"
    shutil.copytree(checkpoint(BF16), src)
    (parent / "other.txt").write_text("unrelated")
    for out, message in ((parent, "contains the source"), (src / "q", "inside the source")):
        with pytest.raises(UsageError, match=message):
            quantize_checkpoint(src, out, 4, group_size=32, force=True)
    link = tmp_path / "link"
    link.symlink_to(parent)
    with pytest.raises(UsageError, match="contains the source"):
        quantize_checkpoint(src, link, 4, group_size=32, force=True)
    assert (parent / "other.txt").is_file() and (src / "config.json").is_file()


def test_output_being_written_by_another_conversion_is_refused(checkpoint, tmp_path):
    out = tmp_path / "out"
    busy = pytest.raises(DestinationError, match="another conversion is writing")
    with q._writing(out), busy:
        quantize_checkpoint(checkpoint(BF16), out, 4, group_size=32)
    assert not out.exists()


def test_partials_of_killed_conversions_are_removed(checkpoint, tmp_path):
    proc = subprocess.Popen(["true"])  # its PID is free once it has exited
    proc.wait()
    stale = tmp_path / f".out.partial-{proc.pid}-0123abcd"
    live = tmp_path / f".out.partial-{os.getpid()}-0123abcd"
    stale.mkdir()
    live.mkdir()
    quantize_checkpoint(checkpoint(BF16), tmp_path / "out", 4, group_size=32)
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_destination_fails_before_any_work(checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    monkeypatch.setattr(q, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    try:
        with pytest.raises(DestinationError, match="cannot write"):
            quantize_checkpoint(checkpoint(BF16), folder / "out", 4, group_size=32)
    finally:
        folder.chmod(0o755)


def test_too_little_space_fails_before_any_work(checkpoint, tmp_path, monkeypatch):
    free = type("Usage", (), {"free": 1000})()
    monkeypatch.setattr(q.shutil, "disk_usage", lambda path: free)
    monkeypatch.setattr(q, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(DestinationError, match="needs at least"):
        quantize_checkpoint(checkpoint(BF16), tmp_path / "out", 4, group_size=32)
    assert list(tmp_path.iterdir()) == []
