"""experiments/aggregate_candidates.py on two tiny synthetic runs."""
import json

import pytest
import torch

from experiments import aggregate_candidates
from hymoerec import train

TINY = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "8",
        "--d-model", "16", "--batch-size", "32", "--no-progress", "--device", "cpu",
        "--seed", "7", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_candidates_table_holds_both_protocols_and_the_differing_flags(tmp_path):
    train.main(TINY + ["--run-dir", str(tmp_path / "base"), "--epochs", "2", "--ffn", "dense"])
    train.main(TINY + ["--run-dir", str(tmp_path / "last"), "--epochs", "2", "--ffn", "dense",
                       "--positions", "last"])
    out = tmp_path / "study.md"
    result = aggregate_candidates.main([str(tmp_path / "base"), str(tmp_path / "last"),
                                        "--baseline", "base", "--out", str(out)])
    base, last = result["runs"]
    assert base["differs_from_baseline"] == {} and last["differs_from_baseline"] == {"positions": "last"}
    summary = json.loads((tmp_path / "last" / "summary.json").read_text())
    assert last["test"]["excluded"]["NDCG@10"] == summary["test_history_excluded"]["NDCG@10"]
    assert len(last["valid_ndcg10"]["excluded"]) == 2 and last["finished"]
    assert "`positions=last`" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["baseline"] == "base"


def test_unknown_baseline_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        aggregate_candidates.main([str(tmp_path / "a"), "--baseline", "b", "--out", str(tmp_path / "x.md")])
    assert exit_.value.code == 2 and "--baseline b" in capsys.readouterr().err
