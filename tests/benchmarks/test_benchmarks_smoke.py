"""The benchmarks run (at their tiny size, so they cannot rot) and report.py turns their
JSON into the Markdown tables the README shows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_FILES = ["benchmarks/test_bench_layer.py", "benchmarks/test_bench_recommender.py"]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYMOE_BENCH_SIZE="tiny")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_benchmarks_run_and_report(tmp_path):
    json_path, md_path = tmp_path / "run.json", tmp_path / "run.md"
    bench = run(["-m", "pytest", *BENCHMARK_FILES, "-q", "-p", "no:cacheprovider",
                 f"--benchmark-json={json_path}"], tmp_path)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]

    data = json.loads(json_path.read_text())
    layer = [b for b in data["benchmarks"] if b["group"].startswith("layer ")]
    variants = {b["extra_info"]["variant"] for b in layer}
    assert {"dense", "naive_moe", "hymoe_torch", "hymoe_torch_compiled"} <= variants
    assert all(b["extra_info"]["peak_mem_bytes"] > 0 for b in data["benchmarks"])
    for b in data["benchmarks"]:
        references = b["extra_info"].get("reference_median_s", {})
        expected = {"dense"} if b["extra_info"]["variant"] != "dense" else set()
        if b["extra_info"]["variant"].startswith("hymoe") and b["group"].startswith("layer "):
            expected.add("naive_moe")
        assert set(references) == expected, (b["name"], references)
        assert all(seconds > 0 for seconds in references.values())

    report = run(["-m", "benchmarks.report", str(json_path), "-o", str(md_path)], tmp_path)
    assert report.returncode == 0, report.stderr
    text = md_path.read_text()
    groups = {b["group"] for b in data["benchmarks"]}
    for group in groups:
        table = text.split(f"#### {group}\n")[1].split("####")[0]
        assert "| dense | " in table and " | 1.00 | " in table.split("| dense |")[1].split("\n")[0]
        assert "| hymoe" in table and "x dense, same rounds" in table
        if group.startswith("layer "):
            assert "x naive_moe, same rounds" in table


def test_report_rejects_a_non_benchmark_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a benchmark run"}))
    result = run(["-m", "benchmarks.report", str(bad)], tmp_path)
    assert result.returncode != 0
    assert "json_file" in result.stderr and "pytest-benchmark" in result.stderr
