"""Grouped / gathered GEMMs and weight gradients (hymoe_op/stage3_expert_gemms.py) against
PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from hymoe_kernels.hymoe_op.stage2_permutation import sort_slots_by_expert
from hymoe_kernels.hymoe_op.stage3_expert_gemms import (ROW_GEMM_CONFIGS, WEIGHT_GRAD_CONFIGS,
                                                       row_gemm, weight_grad)
from kernel_cases import DEVICE, TOL, poisoned_outputs, random_ids, rel_err


def gelu_grad(x):
    x = x.detach().requires_grad_()
    return torch.autograd.grad(F.gelu(x).sum(), x)[0]


def rand(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("config", ROW_GEMM_CONFIGS)
@settings(max_examples=4, deadline=None)
@given(M=st.integers(0, 70), K=st.integers(1, 40), N=st.integers(1, 70),
       seed=st.integers(0, 2 ** 31))
def test_plain_row_gemm_epilogues(config, M, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    a = rand(M, 2 * K, gen=gen)[:, ::2]            # non-contiguous rows
    w = rand(N, K, gen=gen).t()                    # transposed weight
    bias, pre, res = rand(N, gen=gen), rand(M, N, gen=gen), rand(M, N, gen=gen)
    with poisoned_outputs():
        out = row_gemm(a, w, bias, a_gelu=True, gelu_grad_of=pre, residual=res, config=config)
        plain = row_gemm(a, w, config=config)
    assert rel_err(out, (F.gelu(a) @ w + bias) * gelu_grad(pre) + res) < TOL[torch.float32]
    assert rel_err(plain, a @ w) < TOL[torch.float32]


def expert_rows(routing):
    """Per expert e: the slots of its rows, in row order (on the CPU)."""
    start, count = routing.group_start.long().cpu(), routing.group_count.long().cpu()
    slots = routing.row_slot.long().cpu()
    return [slots[start[e]:start[e] + count[e]] for e in range(len(count))]


@pytest.mark.parametrize("config", ROW_GEMM_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=3, deadline=None)
@given(N=st.integers(0, 40), K=st.integers(1, 24), F_=st.integers(1, 40), E=st.integers(1, 6),
       k_frac=st.floats(0, 1), seed=st.integers(0, 2 ** 31))
def test_grouped_gather_gemm(config, dtype, N, K, F_, E, k_frac, seed):
    top_k = 1 + int(k_frac * (E - 1))
    gen = torch.Generator().manual_seed(seed)
    routing = sort_slots_by_expert(random_ids(N, E, top_k, gen), E)
    x = rand(N, K, gen=gen, dtype=dtype)
    w, bias = rand(E, K, F_, gen=gen, dtype=dtype), rand(E, F_, gen=gen, dtype=dtype)
    gates = torch.rand(N * top_k, generator=gen).to(DEVICE)
    alpha = torch.tensor([0.7], device=DEVICE)
    with poisoned_outputs():
        up = row_gemm(x, w, bias, routing=routing, gather=True, config=config)
        scaled = row_gemm(x, w, routing=routing, gather=True, gates=gates, alpha=alpha,
                          a_gelu=True, config=config)
    xf, wf, bf = x.float(), w.float(), bias.float()
    expected_up = torch.zeros(up.shape, device=DEVICE)
    expected_scaled = torch.zeros(up.shape, device=DEVICE)
    start = routing.group_start.long().cpu()
    for e, slots in enumerate(expert_rows(routing)):
        rows = slice(start[e], start[e] + len(slots))
        tokens = (slots // top_k).to(DEVICE)
        expected_up[rows] = xf[tokens] @ wf[e] + bf[e]
        scale = 0.7 * gates[slots.to(DEVICE)][:, None]
        expected_scaled[rows] = (F.gelu(xf[tokens]) * scale) @ wf[e]
    # expected_* are zero on padding rows: the kernel must write zeros there
    assert rel_err(up, expected_up) < TOL[dtype] and rel_err(scaled, expected_scaled) < TOL[dtype]
    padding = torch.ones(up.shape[0], dtype=torch.bool)
    for e, slots in enumerate(expert_rows(routing)):
        padding[start[e]:start[e] + len(slots)] = False
    assert (up[padding.to(DEVICE)] == 0).all() and (scaled[padding.to(DEVICE)] == 0).all()


@pytest.mark.parametrize("config", WEIGHT_GRAD_CONFIGS)
@settings(max_examples=4, deadline=None)
@given(M=st.integers(0, 300), K=st.integers(1, 40), N=st.integers(1, 70),
       seed=st.integers(0, 2 ** 31))
def test_plain_weight_grad(config, M, K, N, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = rand(M, K, gen=gen), rand(2 * M, N, gen=gen)[::2]
    with poisoned_outputs():
        dw, db = weight_grad(a, b, a_gelu=True, config=config)
    assert rel_err(dw, F.gelu(a).t() @ b) < TOL[torch.float32]
    assert rel_err(db, b.sum(0)) < TOL[torch.float32]


@pytest.mark.parametrize("config", WEIGHT_GRAD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=3, deadline=None)
@given(N=st.integers(0, 60), K=st.integers(1, 24), F_=st.integers(1, 40), E=st.integers(1, 6),
       k_frac=st.floats(0, 1), seed=st.integers(0, 2 ** 31))
def test_grouped_weight_grad(config, dtype, N, K, F_, E, k_frac, seed):
    check_grouped_weight_grad(config, dtype, N, K, F_, E, 1 + int(k_frac * (E - 1)), seed)


def test_grouped_weight_grad_split_rows():
    # enough rows per expert that each group's rows are split over several programs
    check_grouped_weight_grad(WEIGHT_GRAD_CONFIGS[0], torch.float32, 400, 9, 11, 3, 2, 0)


def check_grouped_weight_grad(config, dtype, N, K, F_, E, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    routing = sort_slots_by_expert(random_ids(N, E, top_k, gen), E)
    rows = routing.row_slot.shape[0]
    x, dy = rand(N, K, gen=gen, dtype=dtype), rand(N, F_, gen=gen, dtype=dtype)
    hidden, d_hidden = rand(rows, K, gen=gen, dtype=dtype), rand(rows, F_, gen=gen, dtype=dtype)
    gates = torch.rand(N * top_k, generator=gen).to(DEVICE)
    alpha = torch.tensor([0.3], device=DEVICE)
    with poisoned_outputs():
        dw1, db1 = weight_grad(x, d_hidden, routing=routing, a_gather=True, config=config)
        dw2, db2 = weight_grad(hidden, dy, routing=routing, a_gelu=True, b_gather=True,
                               gates=gates, alpha=alpha, config=config)
    start = routing.group_start.long().cpu()
    for e, slots in enumerate(expert_rows(routing)):
        r = slice(start[e], start[e] + len(slots))
        tokens, slots = (slots // top_k).to(DEVICE), slots.to(DEVICE)
        scaled_dy = dy.float()[tokens] * 0.3 * gates[slots][:, None]
        a1, b1 = x.float()[tokens], d_hidden.float()[r]
        a2, b2 = F.gelu(hidden.float()[r]), scaled_dy
        # each gradient is a sum over the expert's rows: its rounding is relative to the sum
        # of the terms' magnitudes, not to the sum itself (which may nearly cancel)
        for out, ref, magnitude in ((dw1[e], a1.t() @ b1, a1.abs().t() @ b1.abs()),
                                    (db1[e], b1.sum(0), b1.abs().sum(0)),
                                    (dw2[e], a2.t() @ b2, a2.abs().t() @ b2.abs()),
                                    (db2[e], b2.sum(0), b2.abs().sum(0))):
            assert out.dtype == torch.float32
            assert rel_err(out, ref, magnitude) < TOL[dtype]
