"""`apertus-mlx` as a user runs it: a real process, stdout, stderr and exit status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from apertus_mlx import load
from tests.checkpoints import cli, finish, stream_generate


def test_greedy_json_matches_the_engine(tiny_model_dir):
    from apertus_mlx.generate import generate
    from apertus_mlx.sampling import SamplingParams

    out = cli(
        "generate",
        "Grüezi mitenand!",
        "-m",
        str(tiny_model_dir),
        "--temp",
        "0",
        "-n",
        "12",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in (
        "text",
        "prompt_tokens",
        "cached_tokens",
        "generated_tokens",
        "ttft_s",
        "prefill_tps",
        "decode_tps",
        "peak_memory_gb",
        "finish_reason",
    ):
        assert key in result
    model, tokenizer = load(tiny_model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Grüezi mitenand!"}])
    *_, done = generate(model, tokenizer, ids, params=SamplingParams(temperature=0), max_tokens=12)
    assert result["text"] == done.text
    assert result["prompt_tokens"] == len(ids)
    assert result["generated_tokens"] == len(done.tokens)


def test_prompt_from_stdin_equals_argument(tiny_model_dir):
    args = ("-m", str(tiny_model_dir), "--temp", "0", "-n", "8")
    from_arg = cli("generate", "Bonjour", *args)
    from_pipe = cli("generate", *args, stdin="Bonjour")
    from_dash = cli("generate", "-", *args, stdin="Bonjour")
    assert from_arg.returncode == from_pipe.returncode == from_dash.returncode == 0
    assert from_arg.stdout == from_pipe.stdout == from_dash.stdout
    assert from_arg.stdout.strip()


def test_seed_repeats_and_stats_go_to_stderr(tiny_model_dir):
    args = (
        "generate",
        "Ciao",
        "-m",
        str(tiny_model_dir),
        "--seed",
        "3",
        "--temp",
        "1.0",
        "-n",
        "10",
        "--stats",
    )
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    assert "tok/s" in a.stderr and "tok/s" not in a.stdout
    assert "stopped: reached the limit of 10 tokens" in a.stderr


def test_raw_completion_and_system_prompt_change_the_prompt(tiny_model_dir):
    base = ("-m", str(tiny_model_dir), "--temp", "0", "-n", "1", "--json")
    chat = json.loads(cli("generate", "Hallo", *base).stdout)
    raw = json.loads(cli("generate", "Hallo", "--no-chat-template", *base).stdout)
    system = json.loads(cli("generate", "Hallo", "--system", "Sei kurz.", *base).stdout)
    assert raw["prompt_tokens"] < system["prompt_tokens"]
    assert chat["prompt_tokens"] != system["prompt_tokens"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "hi", "-m", "/no/such/dir"), "no model directory"),
        (("generate", "hi", "-m", "swiss-ai/Not-Downloaded"), "apertus-mlx download"),
        (("generate", "hi", "-m", "{model}", "--top-p", "0"), "top-p"),
        (("generate", "   ", "-m", "{model}"), "empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    out = cli(*(a.format(model=tiny_model_dir) for a in args))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    out = cli("generate", "hi", "-m", str(tmp_path))
    assert out.returncode == 2 and "model_type 'llama'" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from apertus_mlx.cli import cli\n"
        "try: cli.main(['--help'], standalone_mode=False)\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('transformers', 'torch', 'textual', 'mlx.core', 'tokenizers',"
        " 'starlette', 'uvicorn')"
        " if m in sys.modules]\n"
        "print('heavy:', ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Commands" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "heavy:"


def test_generate_imports_no_transformers_torch_textual_or_the_store(tiny_model_dir):
    """Start-up stays fast: a plain `generate` loads none of the heavy or unused modules."""
    code = (
        "import sys; from apertus_mlx.cli import cli\n"
        f"cli.main(['generate', 'hi', '-m', {str(tiny_model_dir)!r}, '-n', '2'],"
        " standalone_mode=False)\n"
        "heavy = ('transformers', 'torch', 'textual', 'sqlite3', 'apertus_mlx.store',"
        " 'starlette', 'uvicorn', 'apertus_mlx.server')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_flushes_the_partial_answer(endless_model, sig, status):
    proc = stream_generate(endless_model, "--stats")
    try:
        first = proc.stdout.read(1)  # the answer is streaming: the model is generating
        proc.send_signal(sig)
        rest, stderr = finish(proc, 60)
    finally:
        proc.kill()
    assert first and proc.returncode == status, stderr
    assert "Traceback" not in stderr
    generated = int(stderr.split("answer: ")[1].split(" tokens")[0])
    assert 0 < generated < 50000 and rest.endswith("\n")
