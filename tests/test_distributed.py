"""One model across several processes: MLX's ring backend between local CPU processes.

Every run here is real: ranks are processes started by `mlx.launch` or by `--hostfile`, and
their tokens are compared with the same workload on one process (itself checked against
transformers elsewhere), bit for bit. What each rank holds is compared with the one-process
model's own parameters. Faults are real signals to real ranks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from apertus_mlx import load
from apertus_mlx.launch import Host, Hostfile, rank_environments, read_hostfile
from apertus_mlx.loading import load_model
from apertus_mlx.model import Part
from apertus_mlx.placement import Footprint, footprint, plan_parts
from apertus_mlx.quantize import quantize_checkpoint
from tests.checkpoints import build_checkpoint, build_endless_checkpoint, finish, stream_generate
from tests.pipeline_driver import PROMPT, workload

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available(), reason="MLX was built without distributed support"
)

ROOT = Path(__file__).resolve().parent.parent
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
SHAPE = {  # head_dim 32: the KV cache can be quantized; a context for a 600-token prompt
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
LOST_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir, vocab_size) -> dict[str, Path]:
    """4 layers F32 untied and its INT4; 5 layers BF16 tied in 100 KB shards and its INT4."""
    made = tmp_path_factory.mktemp("pipeline")
    f32 = build_checkpoint(
        made / "f32", tokenizer_dir, vocab_size, {**SHAPE, "num_hidden_layers": 4}
    )
    tied = build_checkpoint(
        made / "tied-bf16",
        tokenizer_dir,
        vocab_size,
        {**SHAPE, "num_hidden_layers": 5, "tie_word_embeddings": True},
        "bfloat16",
        max_shard_size="100KB",
    )
    return {
        "f32": f32,
        "int4": quantize_checkpoint(f32, made / "int4", 4, group_size=32).out,
        "tied-bf16": tied,
        "tied-int4": quantize_checkpoint(tied, made / "tied-int4", 4, group_size=32).out,
    }


@pytest.fixture(scope="module")
def endless(tmp_path_factory, tokenizer_dir, vocab_size) -> Path:
    out = tmp_path_factory.mktemp("endless-3")
    return build_endless_checkpoint(out, tokenizer_dir, vocab_size, {"num_hidden_layers": 3})


def local_hostfile(tmp_path: Path, ranks: int) -> Path:
    path = tmp_path / f"hosts-{ranks}.json"
    path.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * ranks))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}


def run_driver(command: list[str], timeout: float = 240) -> list[dict]:
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env())
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def expected_share(model, part: Part) -> int:
    """Bytes of the one-process model's parameters that belong to `part`."""
    tied = model.args.tie_word_embeddings
    total = 0
    for name, array in tree_flatten(model.parameters()):
        if name.startswith("model.layers."):
            mine = part.start <= int(name.split(".")[2]) < part.stop
        elif name.startswith("model.embed_tokens."):
            mine = part.first or (part.last and tied)
        else:  # the final norm and lm_head
            mine = part.last
        total += array.nbytes if mine else 0
    return total


def check_against_one_process(
    path: Path, got: dict, layers: list[list[int]], dtype: str | None = None
) -> None:
    model, tokenizer = load(path, dtype=dtype)
    want = workload(model, tokenizer)
    for key in ("greedy", "seeded", "chat", "long", "kv8"):
        assert got[key] == want[key], key
    np.testing.assert_array_equal(np.array(got["logits"]), np.array(want["logits"]))
    ranks = got["ranks"]
    assert [r["layers"] for r in ranks] == layers
    whole = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    n = model.args.num_hidden_layers
    for r, loaded in zip(ranks, got["loaded"]):
        share = expected_share(model, Part(*r["layers"], n))
        assert r["parameter_bytes"] == loaded["parameter_bytes"] == share
        # reading its part never held the others': the peak is about the part, not the whole
        assert share <= loaded["peak_memory"] < share + 0.5 * whole, (loaded, share, whole)


def test_two_ranks_started_by_hand_under_mlx_launch_match_one_process(models):
    """`mlx.launch ... python driver.py`: every rank runs the program; the default split
    follows memory (equal here: 2 + 2 layers)."""
    paths = [models["f32"], models["int4"]]
    command = [str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--"]
    results = run_driver(
        command + [sys.executable, "-m", "tests.pipeline_driver", *map(str, paths)]
    )
    assert len(results) == 2
    for path, got in zip(paths, results):
        check_against_one_process(path, got, [[0, 2], [2, 4]])


def test_tensor_parallel_on_two_ranks_matches_one_process(models, tmp_path):
    """Heads and MLP columns split across two ranks under `mlx.launch`: every rank ends each
    step with the same logits and so the same tokens, those of one process (float32 and
    INT4 compute in float32 here; bfloat16 partial sums round, so only close)."""
    paths = [models["f32"], models["int4"], models["tied-bf16"]]
    command = [str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--"]
    out = subprocess.run(
        [*command, sys.executable, "-m", "tests.tensor_driver", str(tmp_path), *map(str, paths)],
        capture_output=True, text=True, timeout=240, env=env(),
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    SAME = ("greedy", "seeded", "unseeded", "logits")
    for mine, theirs in zip(*ranks):
        assert {k: v for k, v in mine.items() if k in SAME} == {
            k: v for k, v in theirs.items() if k in SAME
        }
    from tests.tensor_driver import workload as tensor_workload

    for path, got in zip(paths, ranks[0]):
        model, tokenizer = load(path, fuse=False)
        want = tensor_workload(model, tokenizer)
        # each rank holds half of every projection; the embedding, head and norms whole
        sizes = {name: a.nbytes for name, a in tree_flatten(model.parameters())}
        split = sum(
            n for name, n in sizes.items() if re.search(r"\.(q|k|v|o|up|down)_proj\.", name)
        )
        assert got["parameter_bytes"] == sum(sizes.values()) - split // 2
        close = 0.05 if "bf16" in path.name else 1e-5
        np.testing.assert_allclose(np.array(got["logits"]), np.array(want["logits"]), atol=close)
        if "bf16" not in path.name:
            assert (got["greedy"], got["seeded"]) == (want["greedy"], want["seeded"]), path.name


def test_tensor_parallel_refuses_what_does_not_divide(models):
    from apertus_mlx.errors import UsageError
    from apertus_mlx.tensor_parallel import shard

    class Three:  # the group's size and rank are all `shard` asks before any sum
        def size(self) -> int:
            return 3

        def rank(self) -> int:
            return 0

    with pytest.raises(UsageError, match=r"num_attention_heads \(4\) does not divide by 3"):
        shard(load(models["f32"], fuse=False)[0], Three())
    with pytest.raises(UsageError, match="q, k and v apart"):
        shard(load(models["f32"])[0], type("Two", (Three,), {"size": lambda self: 2})())


def test_three_ranks_from_a_hostfile_match_one_process(models, tmp_path):
    """`--hostfile` starts ranks 1 and 2 itself; `--split` overrides the default. In float32
    (a BF16 checkpoint computes in bfloat16 on the CPU by default, and there a split moves
    where MLX's fused graphs round, so only float32 is bit for bit)."""
    paths = [models["tied-bf16"], models["tied-int4"]]
    hosts = local_hostfile(tmp_path, 3)
    command = [sys.executable, "-m", "tests.pipeline_driver", "--hostfile", str(hosts)]
    results = run_driver(command + ["--split", "1,3,1", "--dtype", "float32", *map(str, paths)])
    assert len(results) == 2
    for path, got in zip(paths, results):
        check_against_one_process(path, got, [[0, 1], [1, 4], [4, 5]], "float32")
        assert got["describe"] == "3 ranks, layers 127.0.0.1 0-0 | 127.0.0.1 1-3 | 127.0.0.1 4-4"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apertus_mlx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
    )


def test_generate_across_hosts_prints_the_one_process_answer(models, tmp_path):
    """Sampled with a seed (greedy answers are compared above, token by token)."""
    sampling = ("--temp", "0.9", "--seed", "11")
    args = ("generate", "Grüezi mitenand!", "-m", str(models["f32"]), "-n", "12", *sampling)
    one = cli(*args, "--json")
    across = cli(*args, "--json", "--hostfile", str(local_hostfile(tmp_path, 2)))
    assert one.returncode == across.returncode == 0, across.stderr
    assert across.stderr.strip().splitlines() == one.stderr.strip().splitlines()  # ranks: silent
    mine, theirs = json.loads(across.stdout), json.loads(one.stdout)
    assert mine["text"] == theirs["text"] and mine["generated_tokens"] == 12


IDLE = """
import json, os, subprocess, sys, time
from apertus_mlx import distributed, load
distributed.start(sys.argv[1])
model, _ = load(sys.argv[2])
ranks = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
def cpu():  # seconds of CPU the other ranks used so far (Linux)
    total = 0
    for pid in ranks.stdout.split():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(") ")[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
before = cpu()
time.sleep(1.0)
print(json.dumps({"ranks": len(ranks.stdout.split()), "cpu_s": cpu() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ranks_waiting_for_rank_0_use_no_cpu(models, tmp_path):
    """Between requests (a chat waiting for its user) the other ranks wait for a bell, not in
    MLX's receive, which polls its socket without pause: a core per waiting rank."""
    hosts = local_hostfile(tmp_path, 3)
    out = subprocess.run([sys.executable, "-c", IDLE, str(hosts), str(models["f32"])],
                         capture_output=True, text=True, timeout=120, env=env())  # fmt: skip
    assert out.returncode == 0, out.stderr
    idle = json.loads(out.stdout)
    assert idle["ranks"] == 2 and idle["cpu_s"] < 0.1, idle


# --- faults ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended: only its parent's wait is missing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return True


def gone_within(pids: list[int], seconds: float) -> float | None:
    """Seconds until every pid has ended, or None if one still runs after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not any(alive(p) for p in pids):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.fixture
def streaming(endless, tmp_path):
    """An endless answer streaming from three local ranks; yields (rank 0, [rank 1, rank 2])."""
    home = tmp_path / "home"
    hosts = local_hostfile(tmp_path, 3)
    os.environ["APERTUS_MLX_HOME"], saved = str(home), os.environ["APERTUS_MLX_HOME"]
    try:
        proc = stream_generate(endless, "--hostfile", str(hosts), "--save")
    finally:
        os.environ["APERTUS_MLX_HOME"] = saved
    ranks: list[int] = []
    try:
        first = proc.stdout.read(1)
        assert first, proc.stderr.read()  # streaming: every rank is serving
        ranks = children(proc.pid)
        assert len(ranks) == 2
        yield proc, first, ranks, home
    finally:
        for pid in [proc.pid, *ranks]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("apertus-mlx: error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    "sig, rank, why",
    [(signal.SIGKILL, 2, "its process ended"), (signal.SIGSTOP, 1, "no sign of life")],
)
def test_a_lost_rank_ends_every_rank_with_one_line_naming_it(streaming, sig, rank, why):
    """A killed rank, or one that stops answering (as a host that sleeps or is unplugged):
    rank 0 names it and exits 1 within seconds, keeping the answer so far (on the screen and
    in the history), and the other ranks exit too."""
    from apertus_mlx.store import Store

    proc, first, ranks, home = streaming
    lost = ranks[rank - 1]
    os.kill(lost, sig)
    start = time.monotonic()
    rest, stderr = finish(proc, 30)
    took = time.monotonic() - start
    assert proc.returncode == 1 and took < LOST_WITHIN_S, (took, stderr)
    line = one_error_line(stderr)
    assert f"(rank {rank})" in line and why in line and "127.0.0.1" in line
    others = [p for p in ranks if p != lost]
    after = gone_within(others, LOST_WITHIN_S - took)
    assert after is not None
    print(f"\nrank 0 exited {took:.2f} s after the fault, the other ranks {after:.2f} s later")
    with Store.open(home / "history.db") as store:
        (conversation,) = store.list_conversations()
        _, answer = store.branch(conversation.id)
    # the answer so far stays: on the screen, and in the history marked as cut by an error
    assert first + rest and answer.finish_reason == "error" and len(answer.tokens) > 0


def test_ctrl_c_on_rank_0_stops_every_rank(streaming):
    proc, _, ranks, _ = streaming
    proc.send_signal(signal.SIGINT)
    stopped = gone_within(ranks, 5.0)  # told to stop by rank 0 (it kills them only after 2 s)
    rest, stderr = finish(proc, 30)
    assert proc.returncode == 130 and "error" not in stderr, stderr
    assert rest.endswith("\n")
    print(f"\nthe other ranks ended {stopped:.2f} s after Ctrl+C")
    assert stopped is not None and stopped < 1.0  # 0.5 s after a step, on a busy 2-core CPU


def test_another_checkpoint_on_one_host_is_refused_at_start(models, tmp_path):
    """Ranks started by hand (as mlx.launch starts them), each with its own Hugging Face
    cache: the same repo id names different weights on host 1. Refused in one line."""
    from apertus_mlx.launch import _free_ports

    caches = []
    for rank, name in enumerate(("f32", "int4")):
        snapshot = tmp_path / f"cache{rank}" / "models--swiss-ai--tiny" / "snapshots" / "abc"
        snapshot.parent.mkdir(parents=True)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("abc")
        snapshot.symlink_to(models[name], target_is_directory=True)
        caches.append(tmp_path / f"cache{rank}")
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "apertus_mlx", "generate", "hi", "-m", "swiss-ai/tiny"],
            env={
                **env(),
                "MLX_RANK": str(rank),
                "MLX_HOSTFILE": str(ring),
                "HF_HUB_CACHE": str(cache),
                "APERTUS_MLX_HOST": f"mac{rank}",
            },  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, cache in enumerate(caches)
    ]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 2 and outs[0][0] == ""
    line = one_error_line(outs[0][1])
    assert "host mac1 (rank 1) holds another checkpoint than host mac0 (rank 0)" in line
    assert procs[1].returncode == 0 and outs[1] == ("", "")  # told to stop, silently


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs an ssh client")
def test_a_host_that_cannot_be_reached_is_named_at_start(models, tmp_path):
    """MLX's start-up would wait for ever for it (holding Python's lock): the ranks meet on
    the heartbeat connections first, so the failed ssh is one line within seconds."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(
        json.dumps([{"ssh": "127.0.0.1"}, {"ssh": "nohost.invalid", "ips": ["127.0.0.1"]}])
    )
    out = cli("generate", "hi", "-m", str(models["f32"]), "--hostfile", str(hosts), timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    line = one_error_line(out.stderr)
    assert "host nohost.invalid (rank 1): ssh could not connect" in line


# --- pieces, in one process -------------------------------------------------------------------


def test_parts_chained_by_hand_give_the_whole_models_logits(models):
    """The partial models themselves: layers 0..k on one, k..n on another, bit for bit."""
    ids = mx.array([PROMPT[:10]])
    for name in ("f32", "tied-int4"):
        whole = load_model(models[name])
        n = whole.args.num_hidden_layers
        want = np.array(whole(ids))
        for cut in range(1, n):
            first = load_model(models[name], part=Part(0, cut, n))
            last = load_model(models[name], part=Part(cut, n, n))
            assert "lm_head" not in first and "norm" not in first.model
            assert ("embed_tokens" in last.model) == whole.args.tie_word_embeddings
            got = np.array(last.logits(last.model(first.model(ids))))
            np.testing.assert_array_equal(got, want)


def test_default_split_follows_memory():
    fp = Footprint("x", "float32", tuple([100] * 12), embedding=150, head=150)
    parts = plan_parts(fp, [64, 64])
    assert [(p.start, p.stop) for p in parts] == [(0, 6), (6, 12)]
    parts = plan_parts(fp, [128, 64, 64])  # twice the memory: about twice the bytes
    loads = [sum(fp.layers[p.start : p.stop]) + 150 * (p.first + p.last) for p in parts]
    assert [(p.start, p.stop) for p in parts] == [(0, 6), (6, 10), (10, 12)]
    assert loads == [750, 400, 350]  # per byte of memory: 5.9, 6.3, 5.5 (6, 9: 7.0 on the last)
    assert [(p.start, p.stop) for p in plan_parts(fp, [1, 1], [3, 9])] == [(0, 3), (3, 12)]


@pytest.mark.parametrize(
    "memory, split, message",
    [
        ([1, 1], [3, 3], "must add up to 12"),
        ([1, 1, 1], [6, 6], "3 ranks"),
        ([1] * 13, None, "too few for 13 ranks"),
    ],  # fmt: skip
)
def test_impossible_splits_are_refused(memory, split, message):
    from apertus_mlx.errors import UsageError

    fp = Footprint("x", "float32", tuple([1] * 12), 1, 1)
    with pytest.raises(UsageError, match=message):
        plan_parts(fp, memory, split)


def test_footprint_names_the_checkpoint_not_its_files(models, tmp_path):
    a = footprint(models["tied-bf16"])
    assert sum(a.layers) + a.embedding + a.head > 0 and a.stored == "bfloat16"
    assert a.head == a.embedding + 128 * 2  # tied: the embedding, and the final norm (bf16)
    assert footprint(models["tied-bf16"]) == a
    assert footprint(models["tied-int4"]).digest != a.digest
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in models["tied-bf16"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config, indent=1))  # same content, new bytes
    assert footprint(copy).digest == a.digest
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert footprint(copy).digest != a.digest


@pytest.mark.parametrize(
    "content, message",
    [("{", "not JSON"), ("[]", "expected a list of hosts"), ('[{"ips": []}]', '"ssh" name'),
     ('[{"ssh": "mac2"}]', "has no ips"), ('{"backend": "mpi", "hosts": [{"ssh": "a"}]}', "mpi")],
)  # fmt: skip
def test_bad_hostfiles_are_one_usage_error(tmp_path, content, message):
    from apertus_mlx.errors import UsageError

    path = tmp_path / "hosts.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_hostfile(path)


def test_rank_environments_are_what_mlx_launch_gives(tmp_path):
    hosts = Hostfile([Host("mac1", ["10.0.0.1"]), Host("mac2", ["10.0.0.2"])], envs=["A=1"])
    first, second = rank_environments(hosts, tmp_path)
    assert (first["MLX_RANK"], second["MLX_RANK"]) == ("0", "1")
    assert json.loads(Path(first["MLX_HOSTFILE"]).read_text()) == [
        ["10.0.0.1:32323"],
        ["10.0.0.2:32324"],
    ]
    assert json.loads(json.loads(second["_FILES"])["MLX_HOSTFILE"])[1] == ["10.0.0.2:32324"]
    assert first["APERTUS_MLX_WATCH"] == "10.0.0.1:32325" and first["A"] == second["A"] == "1"
    assert (first["APERTUS_MLX_HOST"], second["APERTUS_MLX_HOST"]) == ("mac1", "mac2")


def test_hostfile_and_split_flags_are_checked_before_anything_starts(models, tmp_path):
    out = cli("generate", "hi", "-m", str(models["f32"]), "--split", "2,2")
    assert out.returncode == 2 and "--split needs --hostfile" in one_error_line(out.stderr)
    hosts = local_hostfile(tmp_path, 2)
    out = cli("generate", "hi", "-m", str(models["f32"]), "--hostfile", str(hosts), "--split", "2")
    assert out.returncode == 2 and "--split has 1 entries for 2 hosts" in out.stderr
    out = cli("generate", "hi", "-m", str(models["f32"]), "--hostfile", str(tmp_path / "none"))
    assert out.returncode == 2 and "hostfile" in one_error_line(out.stderr)
    args = ("generate", "hi", "-m", str(models["f32"]), "--temp", "0", "-n", "4")
    alone = cli(*args, "--hostfile", str(local_hostfile(tmp_path, 1)))  # one process
    assert alone.returncode == 0 and alone.stdout == cli(*args).stdout


def test_serve_across_hosts_answers_as_one_process(models, tmp_path):
    """`serve --hostfile`: rank 0 serves HTTP, the answer is the one-process answer."""
    import openai

    from tests.servers import Served

    message = "Grüezi mitenand!"
    one = cli("generate", message, "-m", str(models["f32"]), "-n", "12", "--temp", "0", "--json")
    assert one.returncode == 0, one.stderr
    served = Served(models["f32"], "--hostfile", str(local_hostfile(tmp_path, 2)), env=env())
    try:
        client = openai.OpenAI(base_url=served.base, api_key="none")
        answer = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": message}], max_tokens=12,
            temperature=0,
        )  # fmt: skip
        assert answer.choices[0].message.content == json.loads(one.stdout)["text"]
    finally:
        assert served.stop() == 143, served.log
