"""experiments/upcycle_runs.sh and aggregate_upcycle.py on a tiny file: every run of the study
trains, a second call trains nothing, and the table compares them."""
import json
import os
import subprocess

from experiments import aggregate_upcycle
from study_cases import REPO, write_sequences


def test_upcycle_study_end_to_end(tmp_path):
    data = write_sequences(tmp_path / "data.txt", users=80, items=23, length=8, stride=5)
    out = tmp_path / "runs"
    call = ["bash", "experiments/upcycle_runs.sh", str(data), str(out), "30", "--d-model", "16",
            "--epochs", "2", "--warmup-steps", "3"]
    subprocess.run(call, cwd=REPO, check=True, timeout=600, env={**os.environ, "SEEDS": "1"})
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["continued-s1", "dense-s1", "scratch-s1", "upcycled-copy-s1",
                     "upcycled-drop-s1"]
    config = json.loads((out / "upcycled-drop-s1" / "config.json").read_text())
    assert config["ffn"] == "hymoe" and config["expert_init"] == "drop"
    assert config["init_from"] == str(out / "dense-s1") and config["epochs"] == 2
    report = aggregate_upcycle.main([str(out), "--out", str(tmp_path / "u.md")])
    text = (tmp_path / "u.md").read_text()
    assert "| upcycled to HyMoE, experts copied | 1 of 1 |" in text
    assert set(report["paired_tests"]) == {"upcycled-copy", "upcycled-drop"}
    assert report["paired_tests"]["upcycled-copy"]["n_users"] == 80

