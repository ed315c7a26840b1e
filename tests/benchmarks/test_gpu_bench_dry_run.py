"""The GPU benchmark script runs end to end at a tiny size (on the CPU via the interpreter)."""
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_layer_dry_run_writes_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu.bench_layer", "--dry-run",
                             "--dtypes", "fp32", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_layer.json").read_text())
    assert {row["mode"] for row in report["rows"]} == {"fwd", "fwd+bwd"}
    forward = next(row for row in report["rows"] if row["mode"] == "fwd")
    assert {"dense", "eager", "fused_tile"} <= set(forward["ms"])
    # the fused path agrees with the reference on the dry-run input
    assert float(forward["notes"]["fused_tile"].split(":")[1]) < 1e-5
    assert "| fused_tile |" in (tmp_path / "bench_layer.md").read_text()
    assert report["machine"]["git_commit"]
