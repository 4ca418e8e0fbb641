"""Every command against bad checkpoints, templates, arguments and environments: each ends in
one line on stderr and exit 1 (runtime) or 2 (bad input), within seconds, and deletes nothing
it was not asked to.

Cases that cannot crash the interpreter run in this process (`main()`, as the console script
does); those that could (a segfault, stdin and argv bytes, closed descriptors, signals) run as
real processes. Bad checkpoints are built once, as small edits of one tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.constants  # noqa: F401 - its import-time settings from the usual env
import mlx.core as mx
import pytest

from apertus_mlx.cli import main

# -- bad checkpoints: name -> edit of a copy of the tiny checkpoint ------------------------------


def _config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))

    return edit


def _write(name: str, content: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        text = content if isinstance(content, str) else json.dumps(content)
        (d / name).write_text(text)

    return edit


def _weights(edit_tensors: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        weights = dict(mx.load(str(d / "model.safetensors")))
        edit_tensors(weights)
        mx.save_safetensors(str(d / "model.safetensors"), weights)

    return edit


def _smaller_vocabulary(d: Path) -> None:
    """A model whose embedding ends before the tokenizer's last id (tokenizer.json of another)."""
    n = json.loads((d / "config.json").read_text())["vocab_size"] - 10
    _weights(
        lambda w: w.update({k: w[k][:n] for k in ("model.embed_tokens.weight", "lm_head.weight")})
    )(d)
    _config(vocab_size=n)(d)


def _index_outside(d: Path) -> None:
    other = d.parent / f"{d.name}-other"
    other.mkdir()
    (d / "model.safetensors").rename(other / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": f"../{other.name}/model.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncated(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


BAD_CHECKPOINTS: dict[str, Callable[[Path], None]] = {
    "vocab-mismatch": _smaller_vocabulary,
    "heads-zero": _config(num_attention_heads=0),
    "vocab-negative": _config(vocab_size=-1),
    "hidden-string": _config(hidden_size="64"),
    "heads-not-dividing": _config(num_attention_heads=3),
    "kv-not-dividing": _config(num_key_value_heads=3),
    "quantization-yes": _config(quantization="yes"),
    "rope-factor-zero": _config(
        rope_parameters={"rope_type": "llama3", "factor": 0, "rope_theta": 1e4}, rope_scaling=None
    ),
    "config-list": _write("config.json", [1, 2]),
    "config-not-json": _write("config.json", "{"),
    "tokenizer-config-list": _write("tokenizer_config.json", [1]),
    "tokenizer-json-garbage": _write("tokenizer.json", "{}"),
    "temperature-hot": _write("generation_config.json", {"temperature": "hot"}),
    "top-p-5": _write("generation_config.json", {"top_p": 5}),
    "eos-string": _write("generation_config.json", {"eos_token_id": "</s>"}),
    "index-outside": _index_outside,
    "int32-weight": _weights(
        lambda w: w.update({"model.norm.weight": w["model.norm.weight"].astype(mx.int32)})
    ),
    "truncated": _truncated,
    "template-power": _write("chat_template.jinja", "{{ 7 ** (7 ** 12) }}"),
    "template-loops": _write(
        "chat_template.jinja",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    ),
    "template-memory": _write("chat_template.jinja", "{{ 'a' * 10**10 }}"),
    "template-syntax": _write("chat_template.jinja", "{% if %}"),
    "template-not-utf8": lambda d: (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"),
}


@pytest.fixture(scope="module")
def bad(tiny_model_dir, tmp_path_factory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            d = tmp_path_factory.mktemp("bad") / name
            shutil.copytree(tiny_model_dir, d)
            BAD_CHECKPOINTS[name](d)
            built[name] = d
        return built[name]

    return get


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Case:
    """`args` may use {ckpt} (the bad checkpoint `checkpoint`), {good} (the tiny checkpoint) and
    {tmp} (a fresh directory for this case)."""

    args: tuple[str, ...]
    status: int
    message: str  # a part of the one line on stderr
    checkpoint: str | None = None
    process: bool = False  # a real subprocess (crash-type cases)
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path, Path], None] | None = None  # (tmp, good checkpoint)
    stdin_closed: bool = False  # started with `<&-` (a process case)


def _checkpoint_cases() -> dict[str, Case]:
    """Each bad checkpoint against the commands that read it."""
    expected = {
        "vocab-mismatch": "tokenizer's ids go up to",
        "heads-zero": "config.json: num_attention_heads must be a positive integer, got 0",
        "vocab-negative": "config.json: vocab_size must be a positive integer, got -1",
        "hidden-string": 'config.json: hidden_size must be a positive integer, got "64"',
        "heads-not-dividing": "is not a multiple of num_attention_heads",
        "kv-not-dividing": "is not a multiple of num_key_value_heads (3)",
        "quantization-yes": 'config.json: quantization must be an object, got "yes"',
        "rope-factor-zero": "config.json: factor must be a number > 0, got 0",
        "config-list": "config.json is not a JSON object",
        "config-not-json": "cannot read",
        "tokenizer-config-list": "tokenizer_config.json is not a JSON object",
        "tokenizer-json-garbage": "tokenizer.json cannot be read",
        "temperature-hot": 'generation_config.json: temperature must be a number >= 0, got "hot"',
        "top-p-5": "generation_config.json: top_p must be a number in (0, 1], got 5",
        "eos-string": "generation_config.json: eos_token_id must be a token id",
        "index-outside": "refusing to read outside the checkpoint",
        "int32-weight": "model.norm.weight int32 (expected float32)",
        "truncated": "truncated",
        "template-power": "is too large",
        "template-loops": "loop iterations",
        "template-memory": "limit 10,000,000",
        "template-syntax": "does not compile",
        "template-not-utf8": "chat_template.jinja",
    }
    # Which commands read what: convert and bench never tokenize (convert --report does).
    reads_weights = {"heads-zero", "vocab-negative", "hidden-string", "heads-not-dividing",
                     "kv-not-dividing", "quantization-yes", "rope-factor-zero", "config-list",
                     "config-not-json", "index-outside", "int32-weight", "truncated"}  # fmt: skip
    cases: dict[str, Case] = {}
    for name, message in expected.items():
        crash = name in ("vocab-mismatch", "index-outside", "int32-weight", "truncated")
        cases[f"generate-{name}"] = Case(
            ("generate", "hi", "-m", "{ckpt}", "-n", "2"), 2, message, name, process=crash
        )
        if name in reads_weights:
            cases[f"convert-{name}"] = Case(
                ("convert", "{ckpt}", "--bits", "4", "--group-size", "32", "--out", "{tmp}/q"),
                2,
                message,
                name,
            )
            cases[f"bench-{name}"] = Case(
                ("bench", "-m", "{ckpt}", "--prompt-tokens", "4", "--gen-tokens", "2"),
                2,
                message,
                name,
            )
    cases["convert-report-template-syntax"] = Case(
        ("convert", "{ckpt}", "--bits", "4", "--out", "{tmp}/q", "--report"),
        2,
        "does not compile",
        "template-syntax",
    )
    return cases


def _parent_of_source(tmp: Path, good: Path) -> None:
    shutil.copytree(good, tmp / "models" / "src")
    (tmp / "models" / "notes.txt").write_text("unrelated, must survive")


def _cache_with(repo: str, commit: str = "a" * 40) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, good: Path) -> None:
        fake_repo(tmp / "cache", repo, commit)

    return setup


def _conversation(tmp: Path, good: Path) -> None:
    """A saved conversation with the id `abcd1234` in {tmp}/home."""
    from apertus_mlx.store import Store

    with Store.open(tmp / "home" / "history.db") as store:
        c = store.create_conversation(title="kept")
        store._db.execute("UPDATE conversations SET id = 'abcd1234' WHERE id = ?", (c.id,))


HOME = {"APERTUS_MLX_HOME": "{tmp}/home"}
BIG_SEED = str(2**70)
CASES: dict[str, Case] = {
    # -- generate: arguments, stdin, stdout --------------------------------------------------
    "generate-seed-negative": Case(("generate", "hi", "-m", "{good}", "--seed", "-1"), 2, "--seed"),
    "generate-seed-huge": Case(("generate", "hi", "-m", "{good}", "--seed", BIG_SEED), 2, "--seed"),
    "generate-temp-nan": Case(("generate", "hi", "-m", "{good}", "--temp", "nan"), 2, "finite"),
    # (no model there: flags are checked before a model loads)
    "generate-flag-top-p-5": Case(("generate", "hi", "-m", "{tmp}/x", "--top-p", "5"), 2, "top-p"),
    "generate-top-k-negative": Case(
        ("generate", "hi", "-m", "{good}", "--top-k", "-3"), 2, "top-k"
    ),
    "generate-dtype": Case(("generate", "hi", "-m", "{good}", "--dtype", "bf16"), 2, "--dtype"),
    "generate-max-tokens-0": Case(("generate", "hi", "-m", "{good}", "-n", "0"), 2, "--max-tokens"),
    "generate-empty-prompt": Case(("generate", "  ", "-m", "{good}"), 2, "the prompt is empty"),
    "generate-prompt-too-long": Case(
        ("generate", "hallo " * 600, "-m", "{good}", "--no-chat-template"), 2, "context"
    ),
    "generate-no-such-dir": Case(("generate", "hi", "-m", "{tmp}/nope"), 2, "no model directory"),
    "generate-model-is-file": Case(
        ("generate", "hi", "-m", "{tmp}/file"),
        2,
        "is a file",
        setup=lambda tmp, good: (tmp / "file").write_text("x"),
    ),  # fmt: skip
    "generate-repo-shaped-path": Case(
        ("generate", "hi", "-m", "foo/bar"), 2, "no directory foo/bar here, and foo/bar is not in"
    ),
    "generate-bad-flag": Case(("generate", "hi", "--frobnicate"), 2, "No such option"),
    "generate-argv-not-utf8": Case(
        ("generate", "h\udcffi", "-m", "{good}"), 2, "the prompt is not valid UTF-8", process=True
    ),
    "generate-system-not-utf8": Case(
        ("generate", "hi", "-s", "\udcff", "-m", "{good}"),
        2,
        "--system is not valid UTF-8",
        process=True,
    ),  # fmt: skip
    "generate-stdin-not-utf8": Case(
        ("generate", "-m", "{good}"),
        2,
        "stdin is not valid UTF-8",
        process=True,
        stdin=b"caf\xe9 \xff",
    ),  # fmt: skip
    "generate-stdout-closed": Case(
        ("generate", "hi", "-m", "{good}", "--json", "-n", "2"),
        1,
        "standard output is closed",
        process=True,
    ),  # fmt: skip
    "generate-stdout-full": Case(
        ("generate", "hi", "-m", "{good}", "--json", "-n", "2"),
        1,
        "No space left on device",
        process=True,
    ),  # fmt: skip
    # -- convert: destinations ---------------------------------------------------------------
    "convert-out-contains-source": Case(
        ("convert", "{tmp}/models/src", "--bits", "4", "--out", "{tmp}/models", "--force"),
        2,
        "contains the source checkpoint",
        setup=_parent_of_source,
    ),  # fmt: skip
    "convert-out-inside-source": Case(
        ("convert", "{tmp}/models/src", "--bits", "4", "--out", "{tmp}/models/src/q"),
        2,
        "inside the source checkpoint",
        setup=_parent_of_source,
    ),  # fmt: skip
    "convert-out-is-source": Case(
        ("convert", "{good}", "--bits", "4", "--out", "{good}", "--force"), 2, "is the source"
    ),
    "convert-out-exists": Case(
        ("convert", "{good}", "--bits", "4", "--out", "{tmp}/models"),
        2,
        "--force",
        setup=_parent_of_source,
    ),  # fmt: skip
    "convert-out-unwritable": Case(
        ("convert", "{good}", "--bits", "4", "--out", "/proc/apertus-mlx-out"), 1, "cannot write"
    ),
    "convert-bits-7": Case(("convert", "{good}", "--bits", "7"), 2, "cannot quantize to 7 bits"),
    "convert-mxfp4-bits": Case(
        ("convert", "{good}", "--bits", "8", "--mode", "mxfp4"), 2, "mxfp4 means 4 bits"
    ),
    "convert-no-source": Case(("convert", "{tmp}/none", "--bits", "4"), 2, "no model directory"),
    # -- bench ---------------------------------------------------------------------------------
    "bench-prompt-too-long": Case(
        ("bench", "-m", "{good}", "--prompt-tokens", "600", "--gen-tokens", "2"), 2, "context"
    ),
    "bench-prompt-huge": Case(
        ("bench", "-m", "{good}", "--prompt-tokens", "1000000000"), 2, "exceed the model's context"
    ),
    "bench-gen-tokens-1": Case(("bench", "-m", "{good}", "--gen-tokens", "1"), 2, "--gen-tokens"),
    # -- download, models, rm --------------------------------------------------------------------
    "download-offline": Case(("download", "org/model"), 1, "HF_HUB_OFFLINE is set"),
    "download-not-a-repo-id": Case(("download", "no such model"), 2, "neither a catalog alias"),
    "download-unreachable": Case(
        ("download", "org/model"),
        1,
        "cannot reach the hub",
        process=True,
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ),  # fmt: skip
    "download-cache-is-file": Case(
        ("download", "org/model"),
        1,
        "is a file, not a directory",
        env={"HF_HUB_CACHE": "{tmp}/file"},
        setup=lambda tmp, good: (tmp / "file").write_text(""),
    ),  # fmt: skip
    "models-cache-is-file": Case(
        ("models",),
        1,
        "is a file, not a directory",
        env={"HF_HUB_CACHE": "{tmp}/file"},
        setup=lambda tmp, good: (tmp / "file").write_text(""),
    ),  # fmt: skip
    "rm-not-downloaded": Case(("rm", "org/missing"), 2, "org/missing is not downloaded"),
    "rm-answered-no": Case(
        ("rm", "org/model"),
        1,
        "nothing deleted",
        process=True,
        stdin=b"n\n",
        setup=_cache_with("org/model"),
    ),  # fmt: skip
    "rm-no-answer": Case(
        ("rm", "org/model"),
        1,
        "nothing deleted",
        process=True,
        stdin=b"",
        setup=_cache_with("org/model"),
    ),  # fmt: skip
    "rm-stdin-closed": Case(
        ("rm", "org/model"),
        1,
        "nothing deleted",
        process=True,
        stdin_closed=True,
        setup=_cache_with("org/model"),
    ),  # fmt: skip
    # -- history ---------------------------------------------------------------------------------
    "history-rm-stdin-closed": Case(
        ("history", "rm", "abcd1234"),
        1,
        "nothing deleted",
        process=True,
        stdin_closed=True,
        env=HOME,
        setup=_conversation,
    ),  # fmt: skip
    "history-search-argv-not-utf8": Case(
        ("history", "search", "gr\udcfcezi"), 2, "is not valid UTF-8", process=True, env=HOME
    ),
    "history-rename-argv-not-utf8": Case(
        ("history", "rename", "abcd1234", "Gr\udcfcezi"),
        2,
        "is not valid UTF-8",
        process=True,
        env=HOME,
        setup=_conversation,
    ),  # fmt: skip
    # -- filter ----------------------------------------------------------------------------------
    "filter-install-dev-zero": Case(
        ("filter", "install", "/dev/zero"), 2, "/dev/zero is not a regular file", env=HOME
    ),
    "filter-install-fifo": Case(
        ("filter", "install", "{tmp}/fifo"),
        2,
        "is not a regular file",
        env=HOME,
        setup=lambda tmp, good: os.mkfifo(tmp / "fifo"),
    ),  # fmt: skip
    "filter-install-deep-json": Case(
        ("filter", "install", "{tmp}/f.json"),
        2,
        "nested too deeply",
        env=HOME,
        setup=lambda tmp, good: (tmp / "f.json").write_text(
            '{"version": ' + "[" * 100_000 + "]" * 100_000 + "}"
        ),
    ),  # fmt: skip
    "filter-install-lone-surrogate": Case(
        ("filter", "install", "{tmp}/f.json"),
        2,
        "lone surrogate",
        env=HOME,
        setup=lambda tmp, good: _filter_file(tmp / "f.json", patterns=["\ud800"]),
    ),  # fmt: skip
    "filter-install-look-behind": Case(
        ("filter", "install", "{tmp}/f.json"),
        2,
        "patterns[0] uses look-behind",
        env=HOME,
        setup=lambda tmp, good: _filter_file(tmp / "f.json", patterns=["(?<=a)b"]),
    ),  # fmt: skip
    "filter-install-backreference": Case(
        ("filter", "install", "{tmp}/f.json"),
        2,
        "patterns[0] uses a backreference",
        env=HOME,
        setup=lambda tmp, good: _filter_file(tmp / "f.json", patterns=["(a+)\\1"]),
    ),  # fmt: skip
    "no-such-command": Case(("frobnicate",), 2, "No such command"),
}


assert not CASES.keys() & _checkpoint_cases().keys()
CASES.update(_checkpoint_cases())


def _filter_file(path: Path, **fields) -> None:
    """A valid output filter file with `fields` replaced (a lone surrogate is written as JSON
    writes it, `"\\ud800"`)."""
    doc = {"version": "1", "published": "2026-01-01", "algorithm": "sha256",
           "normalization": "nfkc-casefold-words", "max_words": 1, "entries": []}  # fmt: skip
    path.write_text(json.dumps({**doc, **fields}))


def fake_repo(cache: Path, repo: str, commit: str) -> Path:
    """A downloaded model in huggingface_hub's cache layout (refs, blobs, snapshot links)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    blob = folder / "blobs" / f"{abs(hash(repo)):x}"
    blob.write_text(json.dumps({"repo": repo}))
    (snapshot / "config.json").symlink_to(f"../../blobs/{blob.name}")
    return folder


def _files(*roots: Path) -> set[Path]:
    return {p for root in roots if root.exists() for p in root.rglob("*")}


def _run_in_process(args: list[str], env: dict[str, str], monkeypatch, capsys):
    from huggingface_hub import constants

    for key, value in env.items():
        monkeypatch.setenv(key, value)
        if key == "HF_HUB_CACHE":  # read by huggingface_hub at import
            monkeypatch.setattr(constants, "HF_HUB_CACHE", value)
    monkeypatch.setattr(sys, "argv", ["apertus-mlx", *args])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for sig, handler in handlers.items():  # main() installs its own
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return code, out, err


def _run_process(case: Case, args: list[str], env: dict[str, str]):
    kwargs = {}
    if case.stdin_closed:
        kwargs["stdin"] = subprocess.DEVNULL
        kwargs["preexec_fn"] = lambda: os.close(0)
    if case.message == "standard output is closed":
        kwargs["stdout"] = subprocess.DEVNULL
        kwargs["preexec_fn"] = lambda: os.close(1)
    elif case.message == "No space left on device":
        kwargs["stdout"] = open("/dev/full", "wb")  # noqa: SIM115 - closed with the process
    else:
        kwargs["stdout"] = subprocess.PIPE
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apertus_mlx",
            *[a.encode("utf-8", "surrogateescape") for a in args],
        ],
        input=None if case.stdin_closed else case.stdin if case.stdin is not None else b"",
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
        timeout=60,
        **kwargs,
    )
    out = proc.stdout.decode("utf-8", "replace") if proc.stdout else ""
    return proc.returncode, out, proc.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, bad, tiny_model_dir, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    if case.setup:
        case.setup(tmp_path, tiny_model_dir)
    ckpt = bad(case.checkpoint) if case.checkpoint else None
    fill = {"ckpt": str(ckpt), "good": str(tiny_model_dir), "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in case.args]
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.update({k: v.format(**fill) for k, v in case.env.items()})
    watched = [tmp_path, tiny_model_dir, *([ckpt.parent] if ckpt else [])]
    before = _files(*watched)

    if case.process:
        code, out, err = _run_process(case, args, env)
    else:
        code, out, err = _run_in_process(args, env, monkeypatch, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.status, err
    assert len(lines) == 1, err
    assert lines[0].startswith("apertus-mlx: ") and case.message in lines[0], lines[0]
    assert "internal error" not in err and "Traceback" not in err
    assert "Delete " not in out or case.stdin is not None  # asked only when there is something
    assert not before - _files(*watched), "something was deleted"


# -- cases with their own setup -----------------------------------------------------------------


def test_rm_deletes_the_named_repo_even_when_another_shares_its_commit(
    tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    keep, drop = (fake_repo(cache, repo, "c" * 40) for repo in ("org/keep", "org/drop"))
    for _ in range(3):  # the order huggingface_hub lists them in does not matter
        code, out, err = _run_in_process(
            ["rm", "org/drop", "--yes"], {"HF_HUB_CACHE": str(cache)}, monkeypatch, capsys
        )
        assert code == 0 and "deleted org/drop" in out, err
        assert not drop.exists() and (keep / "snapshots" / ("c" * 40) / "config.json").is_file()
        drop = fake_repo(cache, "org/drop", "c" * 40)


def test_rm_on_a_read_only_cache_deletes_nothing(tmp_path, monkeypatch, capsys):
    import apertus_mlx.hub as hub

    folder = fake_repo(tmp_path / "cache", "org/model", "d" * 40)
    before = _files(folder)
    monkeypatch.setattr(hub.os, "access", lambda path, mode: False)  # as a read-only mount
    code, _, err = _run_in_process(
        ["rm", "org/model", "--yes"], {"HF_HUB_CACHE": str(tmp_path / "cache")}, monkeypatch, capsys
    )
    assert code == 1 and err.count("\n") == 1 and "read-only (nothing deleted)" in err
    assert _files(folder) == before


def test_load_with_an_unknown_dtype_is_a_usage_error(tiny_model_dir):
    from apertus_mlx import load
    from apertus_mlx.errors import UsageError

    with pytest.raises(UsageError, match="unknown dtype 'bf16'"):
        load(tiny_model_dir, dtype="bf16")


def test_two_conversions_into_one_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from apertus_mlx.quantize import _writing

    out = tmp_path / "q"
    with _writing(out):  # another conversion is running
        code, _, err = _run_in_process(
            ["convert", str(tiny_model_dir), "--bits", "4", "--out", str(out)],
            {},
            monkeypatch,
            capsys,
        )
    assert code == 1 and "another conversion is writing" in err and not out.exists()


def test_download_into_a_read_only_cache_is_our_one_line_only(tiny_model_dir, tmp_path):
    """huggingface_hub printed two "Ignored error while writing ..." lines and a progress bar
    before our line; now nothing is requested and ours is the only line."""
    from tests.hub_server import FakeHub
    from tests.test_history_cli import read_only

    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with FakeHub({"org/tiny": tiny_model_dir}) as hub:
        env.update(HF_HOME=str(hf_home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
        try:
            out = subprocess.run(
                [*read_only(hf_home), sys.executable, "-m", "apertus_mlx", "download", "org/tiny"],
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
        finally:
            hf_home.chmod(0o755)
        assert hub.requests == []
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("apertus-mlx: error: cannot download into the Hugging Face cache")
    assert "is read-only" in out.stderr
