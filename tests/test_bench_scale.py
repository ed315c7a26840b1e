"""The data-at-scale benchmarks run at their tiny size (so they cannot rot), in this process
(each measurement is called directly instead of in a fresh process, which only the peak
memory needs), and write their tables."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_readers


def test_reader_benchmark_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_readers, "run_one", lambda engine, fmt, path, max_len, timeout:
                        bench_readers.measure(engine, fmt, str(path), max_len))
    assert bench_readers.main(["--tiny", "--formats", "sequences,parquet",
                               "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu_readers.json").read_text())
    rows = {(r["format"], r["ids"], r["engine"]): r for r in report["rows"]}
    columnar = rows["sequences", "int", "columnar"]
    assert columnar["interactions"] == 2000 and columnar["windows"] == columnar["users"]
    assert columnar["digest"] == rows["sequences", "int", "reference"]["digest"]
    assert columnar["vs_reference"] > 0 and columnar["vs_reference_cpu"] > 0
    if "skipped" not in rows["sequences", "int", "before"]:     # git has the old commit
        assert columnar["same"] == "= reference = before"
    assert rows["parquet", "str", "columnar"]["same"] == "= sequences"
    text = (tmp_path / "cpu_readers.md").read_text()
    assert "| 2,000 | sequences | int | columnar |" in text
    assert "- 2,000 interactions, int ids: time " in text


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1e6"], "--sizes '1e6': expected interaction counts"),
    (["--formats", "xlsx"], "--formats: unknown ['xlsx']"),
])
def test_reader_benchmark_bad_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        bench_readers.main(argv + ["--out", str(tmp_path)])
    assert done.value.code == 2
    assert message in capsys.readouterr().err

