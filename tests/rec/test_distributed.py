"""Multi-process training: 2 CPU processes (gloo, loopback only) against one process."""
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hymoerec import distributed, evaluate, options, train
from hymoerec.data import bucketed_batches, leave_one_out, synthetic, training_windows

REPO = Path(__file__).resolve().parents[2]
BATCH = 40   # next-item targets per step: 17 steps an epoch here
TINY = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "8",
        "--d-model", "16", "--batch-size", str(BATCH), "--warmup-steps", "30", "--no-progress",
        "--device", "cpu", "--threads", "1", "--seed", "7"]
EXACT = ["--dropout", "0", "--lb-weight", "0"]  # no per-rank randomness, no per-shard aux


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    # faulthandler: a rank killed by a signal (e.g. SIGABRT at shutdown) prints its Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def torchrun(run_dir: Path, *flags: str, entry=("hymoerec/train.py",)) -> dict:
    """Train with 2 processes under torchrun; returns the run's summary.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry,
           *flags, "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, cwd=REPO, env=loopback_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("summary:") == 1          # only rank 0 prints
    return json.loads((run_dir / "summary.json").read_text())


def model_state(run_dir: Path, which: str = "last") -> dict:
    return torch.load(run_dir / f"{which}.pt", weights_only=True)


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("size", range(1, 10))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_share_splits_every_batch_evenly(size, world):
    batch = list(range(100, 100 + size))
    shares = [distributed.rank_share(batch, rank, world) for rank in range(world)]
    real = [share for share, stand_in in shares if not stand_in]
    assert sorted(i for share in real for i in share) == batch
    assert [len(share) for share in real] == [size // world + (r < size % world)
                                             for r in range(min(size, world))]
    assert all(share == [batch[0]] for share, stand_in in shares if stand_in)
    assert sum(stand_in for _, stand_in in shares) == max(0, world - size)


def test_rank_share_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        distributed.rank_share([1, 2], 2, 2)
    with pytest.raises(ValueError, match="batch"):
        distributed.rank_share([], 0, 2)


def test_single_process_context_is_a_no_op():
    ctx = distributed.DistContext()
    assert ctx.is_main and not ctx.enabled and ctx.share([4, 5]) == ([4, 5], False)
    assert ctx.sum_over_ranks(1.5, 2) == [1.5, 2] and ctx.rng_state() == {}


def test_two_processes_train_and_evaluate_like_one(tmp_path):
    windows = training_windows(leave_one_out(synthetic(120, 40, 8, seed=7)).train, 50)
    # the run covers uneven shares (odd batches) and a 1-window batch (a rank stands in)
    batch_sizes = {len(b) for b in bucketed_batches(windows, BATCH, torch.Generator().manual_seed(7))}
    assert 1 in batch_sizes and any(size % 2 for size in batch_sizes - {1})
    single = train.main(TINY + EXACT + ["--epochs", "1", "--run-dir", str(tmp_path / "one")])
    multi = torchrun(tmp_path / "two", *TINY, *EXACT, "--epochs", "1")

    one, two = model_state(tmp_path / "one"), model_state(tmp_path / "two")
    assert one["model"].keys() == two["model"].keys()
    for name, value in one["model"].items():
        if name.endswith(".step"):   # HyMoE warm-up counters: one forward per global batch
            assert int(value) == int(two["model"][name]) == one["step"]
        else:
            torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-6)
    record_one, record_two = log_records(tmp_path / "one")[0], log_records(tmp_path / "two")[0]
    assert record_two["loss"] == pytest.approx(record_one["loss"], rel=1e-6)
    assert record_two["alpha"] == pytest.approx(record_one["alpha"], rel=1e-5)
    assert record_two["expert_load"][0] == pytest.approx(record_one["expert_load"][0], abs=1e-6)
    assert multi["steps"] == single["steps"]
    # the same weights score the same in 2 processes as in 1
    alone = evaluate.evaluate_checkpoint(tmp_path / "two")
    assert multi["test"] == alone["test"] and multi["valid"] == alone["valid"]
    assert 0 < multi["test"]["NDCG@10"] <= multi["test"]["HR@10"] <= 1


def test_resume_under_two_processes_continues_to_the_same_result(tmp_path):
    # dropout and the load-balance loss on: per-rank random streams must be checkpointed
    straight = torchrun(tmp_path / "straight", *TINY, "--epochs", "2")
    torchrun(tmp_path / "resumed", *TINY, "--epochs", "1")
    resumed = torchrun(tmp_path / "resumed", "--resume", "--epochs", "2",
                       entry=("-m", "hymoerec.train"))
    assert resumed["test"] == straight["test"] and resumed["epochs_run"] == 2
    untimed = [[{k: v for k, v in record.items() if "seconds" not in k}
                for record in log_records(tmp_path / name)] for name in ("straight", "resumed")]
    assert untimed[0] == untimed[1]
    a, b = model_state(tmp_path / "straight"), model_state(tmp_path / "resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ranks_rng = a["rng_ranks"]
    assert len(ranks_rng) == 2 and not torch.equal(ranks_rng[0]["cpu"], ranks_rng[1]["cpu"])


# ------------------------------------------------------- collectives in a spawned group

def _join_group(rank: int, port: int) -> None:
    """A 2-process gloo group with a 2 s collective timeout (its store waits longer, for
    processes that start late on a loaded machine)."""
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))


def _collectives_worker(rank: int, ports: list[int], out_dir: str) -> None:
    world, results = 2, {}
    _join_group(rank, ports[0])
    ctx = distributed.DistContext(rank, world, torch.device("cpu"), timeout_s=2, enabled=True)

    def grad_of_mean_square(positions: list[float], n_real: int) -> float:
        """DDP's averaged gradient of this rank's mean of (w - x)^2, weighted by backward()."""
        w = torch.tensor(0.5, requires_grad=True)
        x = torch.tensor(positions)
        ctx.backward(((w - x) ** 2).mean(), n_real)
        return float(ctx.all_reduce(w.grad.reshape(1), "test")[0]) / world

    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    share, stand_in = ctx.share(list(range(5)))
    results["uneven"] = grad_of_mean_square([values[i] for i in share], len(share))
    share, stand_in = ctx.share([3])
    results["stand_in"] = grad_of_mean_square([values[i] for i in share],
                                              0 if stand_in else len(share))
    try:
        ctx.check_same([float(rank)], "test values")
    except distributed.DistributedError as err:
        results["check_same"] = str(err)
    if rank == 1:
        time.sleep(4)                        # hangs past rank 0's 2 s timeout
    else:
        try:
            ctx.sum_over_ranks(1.0)
        except distributed.DistributedError as err:
            results["hung_peer"] = str(err)
    dist.destroy_process_group()

    _join_group(rank, ports[1])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    if rank == 1:
        os._exit(0)                          # dies without a word
    try:
        ctx.sum_over_ranks(1.0)
    except distributed.DistributedError as err:
        results["dead_peer"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_loss_weights_timeouts_and_dead_ranks_in_a_gloo_group(tmp_path, monkeypatch):
    for name, value in loopback_env().items():
        monkeypatch.setenv(name, value)
    mp.spawn(_collectives_worker, args=([free_port(), free_port()], str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # the single-process gradient of mean((w - x)^2) over the global batch is 2 mean(w - x)
    assert results[0]["uneven"] == pytest.approx(2 * (0.5 - 3.0))
    assert results[0]["stand_in"] == pytest.approx(2 * (0.5 - 4.0))
    assert results[1]["uneven"] == results[0]["uneven"]
    assert all("test values differ across ranks" in r["check_same"] for r in results)
    assert "rank 0 of 2" in results[0]["hung_peer"] and "--dist-timeout 2s" in results[0]["hung_peer"]
    assert "rank 0 of 2" in results[0]["dead_peer"] and "died" in results[0]["dead_peer"]


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_dist_timeout_must_be_positive_seconds(value, capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--dist-timeout", value])
    assert "--dist-timeout" in capsys.readouterr().err


def test_only_process_group_failures_count_as_communication_errors():
    assert distributed.is_communication_error(dist.DistBackendError("NCCL watchdog timeout"))
    assert distributed.is_communication_error(RuntimeError(
        "[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"))
    assert not distributed.is_communication_error(RuntimeError("mat1 and mat2 shapes differ"))
