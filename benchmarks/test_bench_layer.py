"""Layer benchmarks: dense PFFN vs naive expert loop vs HyMoEFFN backends.

Run ``pytest benchmarks/test_bench_layer.py --benchmark-json=out.json`` and turn the JSON
into a table with ``python -m benchmarks.report out.json``. One pytest-benchmark group per
(mode, device, shape), so every table compares the variants on the same work:

* dense: :class:`benchmarks.baselines.DensePFFN`, the floor.
* naive_moe: :class:`benchmarks.baselines.NaiveMoEFFN`, a Python loop over experts.
* hymoe_torch: ``HyMoEFFN(backend="torch")``.
* hymoe_torch_compiled: the same module under ``torch.compile(fullgraph=True)``.
* hymoe_triton: ``HyMoEFFN(backend="triton")``, CUDA only.

Every non-dense variant's rounds are interleaved with calls of the dense FFN (and, for the
HyMoE variants, of the naive loop), so the report's "same rounds" ratios compare variants
under the same machine load.

Modes: ``forward`` (eval mode, no grad) and ``forward_backward`` (training mode: forward,
then backward of sum(y * seed) + aux_loss into x and every parameter). fp32, no padding.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

from benchmarks.baselines import DensePFFN, NaiveMoEFFN
from benchmarks.harness import DEVICES, TINY, run_benchmark
from hymoe_kernels import HyMoEFFN
from hymoe_kernels.backend import BACKENDS


@dataclass(frozen=True)
class LayerShape:
    batch: int
    length: int
    d_model: int
    d_ff: int
    num_experts: int = 4
    top_k: int = 2

    def __str__(self) -> str:
        return f"B{self.batch}-L{self.length}-D{self.d_model}-F{self.d_ff}"


# The paper's shapes (batch 256, length 50 and 200, D=64, F=256) and a 4x wider layer.
SHAPES = ([LayerShape(4, 8, 16, 32)] if TINY else
          [LayerShape(256, 50, 64, 256), LayerShape(256, 200, 64, 256),
           LayerShape(256, 50, 256, 1024)])
VARIANTS = ["dense", "naive_moe", "hymoe_torch", "hymoe_torch_compiled", "hymoe_triton"]
MODES = ["forward", "forward_backward"]
# Variants timed before every round of each variant, for ratios under the same load: the
# dense floor for all, and the naive loop for the HyMoE variants (the speed-up to beat).
REFERENCES = {"dense": [], "naive_moe": ["dense"],
              **{v: ["dense", "naive_moe"] for v in VARIANTS if v.startswith("hymoe")}}


def triton_skip_reason(device: str) -> str | None:
    """Why the Triton variant cannot run here, or None."""
    if device != "cuda":
        return "the Triton backend needs CUDA"
    if importlib.util.find_spec("hymoe_kernels.hymoe_op.triton_backend") is None \
            or "triton" not in BACKENDS:
        return ("hymoe_kernels.hymoe_op.triton_backend (the Triton backend) is not available in "
                "this checkout")
    return None


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with fullgraph; in the tiny smoke run only Dynamo's tracing is
    exercised (backend="eager"), which keeps the test suite fast."""
    return torch.compile(module, fullgraph=True, backend="eager" if TINY else "inductor")


def make_layer(variant: str, shape: LayerShape) -> torch.nn.Module:
    """The layer of ``variant`` with the default init (seeded)."""
    torch.manual_seed(0)
    if variant == "dense":
        return DensePFFN(shape.d_model, shape.d_ff)
    if variant == "naive_moe":
        return NaiveMoEFFN(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k)
    backend = "triton" if variant == "hymoe_triton" else "torch"
    layer = HyMoEFFN(shape.d_model, shape.d_ff, shape.num_experts, shape.top_k, backend=backend)
    layer.set_step(layer.warmup_steps)            # alpha past its warm-up ramp
    return compile_module(layer) if variant == "hymoe_torch_compiled" else layer


def layer_step(layer: torch.nn.Module, x: torch.Tensor, mode: str):
    """A no-argument callable running one ``mode`` step of ``layer`` on ``x``."""
    if mode == "forward":
        layer.eval()

        def forward() -> None:
            with torch.no_grad():
                layer(x)
        return forward

    layer.train()
    x = x.detach().requires_grad_(True)
    seed = torch.randn_like(x)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        loss = (layer(x) * seed).sum()
        aux_loss = getattr(layer, "aux_loss", None)
        (loss if aux_loss is None else loss + aux_loss).backward()
    return forward_backward


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_layer(benchmark, device: str, mode: str, shape: LayerShape, variant: str) -> None:
    if variant == "hymoe_triton" and (reason := triton_skip_reason(device)):
        pytest.skip(reason)
    benchmark.group = f"layer {mode} | {device} | {shape}"
    benchmark.extra_info.update(variant=variant, mode=mode, shape=str(shape),
                                tokens=shape.batch * shape.length)
    layer = make_layer(variant, shape).to(device)
    x = torch.randn(shape.batch, shape.length, shape.d_model, device=device)
    run_benchmark(benchmark, layer_step(layer, x, mode), device, {
        name: layer_step(make_layer(name, shape).to(device), x, mode)
        for name in REFERENCES[variant]})
