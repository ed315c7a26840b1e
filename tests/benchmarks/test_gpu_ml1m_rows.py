"""benchmarks/gpu/ml1m_rows.sh on a tiny pairs file (on the CPU): every row trains at once,
and the four files it leaves under OUT hold the table beside the paper's ML-1M numbers and
every run's summary."""
import json
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_rows_train_and_leave_four_files(tmp_path):
    data = tmp_path / "ml-1m.txt"
    data.write_text("".join(f"{u} {(u * 3 + j) % 17 + 1}\n" for u in range(1, 61) for j in range(7)))
    out, run_root = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "ROWS": "sasrec:dense:1 gru4rec:dense:1", "RUN_ROOT": str(run_root)}
    subprocess.run(["bash", "benchmarks/gpu/ml1m_rows.sh", str(data), str(out), "30", "--",
                    "--d-model", "16", "--epochs", "1"], cwd=REPO, env=env, check=True,
                   timeout=600)
    assert sorted(p.name for p in out.iterdir()) == ["ml1m_runs.tgz", "ml1m_table1.json",
                                                     "ml1m_table1.md", "ml1m_table1_ranks.npz"]
    table = (out / "ml1m_table1.md").read_text()
    assert "| 0.1998 | 0.2815 | 0.1364 | 0.1628 |" in table     # the paper's GRU4Rec row
    assert set(json.loads((out / "ml1m_table1.json").read_text())["results"]) == {
        "GRU4Rec", "SASRec (dense FFN)"}
    with tarfile.open(out / "ml1m_runs.tgz") as runs:
        names = runs.getnames()
    assert "./sasrec-dense-s1/summary.json" in names and "./gru4rec-dense-s1.log" in names
    assert not any(n.endswith(".pt") for n in names)
