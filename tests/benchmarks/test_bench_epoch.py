"""The GPU suite's epoch timings run on the CPU on tiny data and write their table (Triton
rows skipped without CUDA), and bad flags are one line with exit code 2."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu import bench_epoch


@pytest.fixture(autouse=True)
def keep_threads():
    """The runs take one thread (--threads 1); later tests get torch's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_epoch_timings_on_tiny_cpu_data(tmp_path):
    assert bench_epoch.main(["--tiny", "--device", "cpu", "--warmup-steps", "1", "--threads", "1",
                             "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "epoch.json").read_text())
    rows = report["rows"]
    assert len(rows) == len(bench_epoch.VARIANTS) * len(bench_epoch.PRECISIONS)
    for precision in bench_epoch.PRECISIONS:
        dense = rows[f"dense FFN (SASRec) | {precision}"]
        hymoe = rows[f"HyMoE, torch backend | {precision}"]
        assert dense["ratio_to_dense"] == dense["cpu_ratio_to_dense"] == 1.0 and dense["steps"] > 1
        assert hymoe["steps"] == dense["steps"] and hymoe["targets"] == dense["targets"]
        assert hymoe["seconds"] > 0 and hymoe["ratio_to_dense"] == pytest.approx(
            hymoe["seconds"] / dense["seconds"], rel=1e-3)
        assert rows[f"HyMoE, Triton grouped | {precision}"] == {
            "skipped": "needs CUDA"}
    text = (tmp_path / "epoch.md").read_text()
    assert "| dense FFN (SASRec) | " in text and "| HyMoE, Triton fused tile | needs CUDA" in text
    assert "synthetic, 150 users, 200 items" in text


def test_budget_skips_the_variants_after_it(tmp_path):
    assert bench_epoch.main(["--tiny", "--device", "cpu", "--warmup-steps", "0", "--threads", "1",
                             "--budget-s", "0.01", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "epoch.json").read_text())["rows"]
    measured = [key for key, row in rows.items() if "seconds" in row]
    assert measured == ["dense FFN (SASRec) | bf16"]       # the first starts at once, no other after it
    assert rows["HyMoE, torch backend | fp32"]["skipped"].startswith("budget of")


@pytest.mark.parametrize("argv, message", [
    (["--data-file", "no/such/beauty.txt"], "--data-file no/such/beauty.txt: no such file"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_flags(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        bench_epoch.main(argv + ["--out", str(tmp_path)])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_triton_path_reaches_the_layers_triton_backend(monkeypatch):
    """triton_path binds path= of the function the HyMoE layer calls for backend "triton"
    (here a stand-in that records it and computes with the torch backend)."""
    from hymoe_kernels import HyMoEFFN, hymoe_torch
    from hymoe_kernels.backend import INTERPRETING
    from hymoe_kernels.hymoe_op import triton_backend
    if not (torch.cuda.is_available() or INTERPRETING):
        pytest.skip("backend 'triton' needs CUDA or TRITON_INTERPRET=1")
    seen = []

    def stand_in(*args, path="auto"):
        seen.append(path)
        return hymoe_torch(*args)
    monkeypatch.setattr(triton_backend, "hymoe_triton", stand_in)
    layer = HyMoEFFN(16, 32, num_experts=4, top_k=2, backend="triton")
    x = torch.randn(3, 5, 16)
    for path in ("fused", "grouped"):
        with bench_epoch.triton_path(path):
            layer(x)
    layer(x)
    assert seen == ["fused", "grouped", "auto"]
