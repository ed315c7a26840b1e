"""The data-at-scale benchmarks run at their tiny size (so they cannot rot), in this process
(each measurement is called directly instead of in a fresh process, which only the peak
memory needs), and write their tables."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_large_catalog, bench_readers


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


@pytest.fixture
def keep_threads():
    """The large-catalog runs take one thread; later tests get torch's count back."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_large_catalog_benchmark_tiny(tmp_path, monkeypatch, keep_threads):
    """Few users, many items (10^5): setup, training steps with the fused and the plain
    loss, full-ranking evaluation, the table."""
    def in_process(variant, settings, batch_size, timeout):
        return bench_large_catalog.measure(variant, settings["users"], settings["items"],
                                           settings["length"], settings["steps"],
                                           settings["eval_users"], batch_size, 0.0)
    monkeypatch.setattr(bench_large_catalog, "run_one", in_process)
    assert bench_large_catalog.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu_large_catalog.json").read_text())
    fused, plain = report["rows"]
    assert fused["data"]["items"] == 100_000 and fused["data"]["users"] == 80
    assert fused["evaluate"]["users"] == 20 and "evaluate" not in plain
    for row in (fused, plain):
        assert row["steps"] == 2 and row["train"]["seconds_per_step"] > 0
        assert row["epoch_extrapolated"]["seconds"] >= 0
        assert row["item_embedding_bytes"] == 100_001 * 64 * 4
    assert fused["train"]["loss"] == pytest.approx(plain["train"]["loss"], rel=1e-4)
    # the fused loss allocates nothing larger than the embedding-sized gradients; the plain
    # one its (positions x items) scores
    assert fused["largest_tensor"][0] <= fused["item_embedding_bytes"]
    assert plain["largest_tensor"][0] > fused["item_embedding_bytes"]
    text = (tmp_path / "cpu_large_catalog.md").read_text()
    assert "| fused (default) | 150 |" in text and "| plain (`--plain-loss`) | 150 |" in text
    assert "extrapolated" in text
