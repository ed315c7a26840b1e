"""Recommender throughput: SASRec with a HyMoE FFN vs the same model with a dense FFN.

* train_step: one Adam step on a batch of right-padded training windows (next-item full
  softmax loss + the HyMoE load-balance loss), as ``hymoerec.train`` runs it.
* full_ranking_eval: the rank of each target among all items for a batch of histories
  (the model's ``rank_next``, streamed over item chunks), as evaluation runs it.

Each benchmark records ``sequences`` (histories per call) in extra_info, so the report
shows sequences per second. Data are random item sequences of lengths drawn from
[max_len / 4, max_len] over an ML-1M-sized catalogue (3,416 items); the model is
``hymoerec``'s default config (D=64, 2 blocks, 2 heads, F=4D, E=4, k=2, dropout 0.2).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DEVICES, TINY, run_benchmark

hymoerec = pytest.importorskip("hymoerec", reason="the hymoerec package is not in this checkout")
try:
    from hymoerec.models import ModelConfig, build_model
except ImportError as err:       # the package exists but lacks the API this file uses
    pytest.skip(f"hymoerec lacks the model/metrics API these benchmarks use: {err}",
                allow_module_level=True)

if TINY:
    N_ITEMS, MAX_LEN, TRAIN_BATCH, EVAL_BATCH, D_MODEL = 50, 8, 4, 4, 16
else:
    N_ITEMS, MAX_LEN, TRAIN_BATCH, EVAL_BATCH, D_MODEL = 3416, 50, 256, 1024, 64
VARIANTS = {"dense": dict(ffn="dense"), "hymoe": dict(ffn="hymoe")}


def random_histories(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, MAX_LEN + 1) int64 item ids in 1..N_ITEMS, right-padded with 0."""
    lengths = torch.randint(max(2, MAX_LEN // 4), MAX_LEN + 2, (batch,), generator=generator)
    items = torch.randint(1, N_ITEMS + 1, (batch, MAX_LEN + 1), generator=generator)
    return items * (torch.arange(MAX_LEN + 1) < lengths.unsqueeze(1))


def make_model(variant: str, device: str):
    torch.manual_seed(0)
    config = ModelConfig(max_len=MAX_LEN, d_model=D_MODEL, seen_bias=False, **VARIANTS[variant])
    model = build_model("sasrec", N_ITEMS, config).to(device)
    for layer in model.hymoe_layers():
        layer.set_step(layer.warmup_steps)        # alpha past its warm-up ramp
    return model


def train_step(variant: str, device: str):
    """A no-argument callable: one Adam step of the ``variant`` model on a fixed batch."""
    model = make_model(variant, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    windows = random_histories(TRAIN_BATCH, torch.Generator().manual_seed(1)).to(device)
    inputs, targets = windows[:, :-1], windows[:, 1:]

    def step() -> None:
        task_loss, aux_loss = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        (task_loss + aux_loss).backward()
        optimizer.step()
    return step


def full_ranking_eval(variant: str, device: str):
    """A no-argument callable: rank every target among all items for a fixed batch."""
    model = make_model(variant, device).eval()
    histories = random_histories(EVAL_BATCH, torch.Generator().manual_seed(2)).to(device)
    lengths = (histories > 0).sum(dim=1)
    targets = histories.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    inputs = histories[:, :-1] * (torch.arange(MAX_LEN, device=device) < (lengths - 1).unsqueeze(1))

    def evaluate() -> None:
        with torch.no_grad():
            model.rank_next(inputs, targets)
    return evaluate


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device: str, variant: str) -> None:
    benchmark.group = f"recommender train_step | {device} | batch {TRAIN_BATCH} x {MAX_LEN}"
    benchmark.extra_info.update(variant=variant, sequences=TRAIN_BATCH)
    references = {} if variant == "dense" else {"dense": train_step("dense", device)}
    run_benchmark(benchmark, train_step(variant, device), device, references)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("device", DEVICES)
def test_full_ranking_eval(benchmark, device: str, variant: str) -> None:
    benchmark.group = f"recommender full_ranking_eval | {device} | batch {EVAL_BATCH} x {MAX_LEN}"
    benchmark.extra_info.update(variant=variant, sequences=EVAL_BATCH)
    references = {} if variant == "dense" else {"dense": full_ranking_eval("dense", device)}
    run_benchmark(benchmark, full_ranking_eval(variant, device), device, references)
