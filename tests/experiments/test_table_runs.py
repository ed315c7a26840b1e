"""experiments/table_runs.sh: parallel slots of runs named as reproduce names them, a finished
run skipped on the next call, and --no-train tabling what it left."""
import json
import subprocess

import pytest

from experiments import reproduce
from study_cases import REPO, write_sequences


def test_slots_train_resume_and_feed_the_table(tmp_path):
    data = write_sequences(tmp_path / "data.txt", users=60, items=17, length=7, stride=3)
    out = tmp_path / "runs"
    call = ["bash", "experiments/table_runs.sh", str(data), "sequences", str(out), "30",
            "sasrec:dense:1", "gru4rec:dense:1 narm:dense:1", "--", "--d-model", "16",
            "--epochs", "1"]
    subprocess.run(call, cwd=REPO, check=True, timeout=600)
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["gru4rec-dense-s1", "narm-dense-s1", "sasrec-dense-s1"]
    summaries = {r: json.loads((out / r / "summary.json").read_text()) for r in runs}
    assert all(s["finished"] and s["config"]["threads"] == 1 for s in summaries.values())
    before = (out / "sasrec-dense-s1" / "last.pt").stat().st_mtime_ns
    subprocess.run(call, cwd=REPO, check=True, timeout=600)  # all finished: nothing trains
    assert (out / "sasrec-dense-s1" / "last.pt").stat().st_mtime_ns == before
    result = reproduce.main(["--no-train", "--seeds", "1", "--data-file", str(data),
                             "--run-root", str(out), "--out", str(tmp_path / "t.md"),
                             "--d-model", "16", "--epochs", "1"])
    assert set(result["results"]) == {"GRU4Rec", "NARM", "SASRec (dense FFN)"}


@pytest.mark.parametrize("root", ["empty", "missing"])
def test_no_train_without_finished_runs_is_one_line(tmp_path, root, capsys):
    if root == "empty":
        (tmp_path / root).mkdir()
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--no-train", "--seeds", "1", "--run-root", str(tmp_path / root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"no run in {tmp_path / root} has a summary.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["empty"] if root == "empty" else [])
