"""experiments/aggregate_beauty.py turns run folders into the Beauty result table (here on two
tiny synthetic runs, one per FFN kind) and refuses arguments that are not run folders."""
import json
import subprocess
import sys

import torch

from hymoerec import train
from study_cases import REPO

TINY = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "8",
        "--d-model", "16", "--batch-size", "32", "--warmup-steps", "5", "--no-progress",
        "--device", "cpu", "--threads", "1", "--epochs", "2"]


def aggregate(*args):
    return subprocess.run([sys.executable, "experiments/aggregate_beauty.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_table_of_two_runs_and_a_refused_log_file(tmp_path):
    threads = torch.get_num_threads()
    try:
        for ffn in ("hymoe", "dense"):
            train.main(TINY + ["--ffn", ffn, "--seed", "1", "--output-head", "--head-skip",
                               "0.25", "--run-dir", str(tmp_path / f"beauty_{ffn}_s1")])
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "beauty_dense_s1.log").write_text("a driver log, not a run folder\n")

    refused = aggregate(*sorted(tmp_path.glob("beauty_*_s*")), "--out", tmp_path / "table")
    assert refused.returncode == 2
    assert f"{tmp_path / 'beauty_dense_s1.log'} is not a run folder" in refused.stderr

    done = aggregate(*sorted(tmp_path.glob("beauty_*_s*/")), "--out", tmp_path / "table")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "table.json").read_text())
    summaries = {ffn: json.loads((tmp_path / f"beauty_{ffn}_s1" / "summary.json").read_text())
                 for ffn in ("hymoe", "dense")}
    for ffn, summary in summaries.items():
        row = result["tables"]["test"][ffn]
        assert row["seeds"] == [1] and row["all_finished"] and row["NDCG@10_std"] == 0
        assert row["NDCG@10"] == summary["test"]["NDCG@10"]
        assert 0 <= row["last_item_first_share"] <= 1
    test = result["tables"]["test"]
    assert result["checks"]["test: hymoe HR@10 > dense"] == (test["hymoe"]["HR@10"]
                                                             > test["dense"]["HR@10"])
    text = (tmp_path / "table.md").read_text()
    assert "output_head=True, head_skip=0.25" in text
    assert "| hymoe | 1 | " in text and "| dense | 1 | " in text
