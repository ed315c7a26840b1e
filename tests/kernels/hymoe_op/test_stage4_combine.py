"""Combine epilogue and gate/alpha gradients (hymoe_op/stage4_combine.py) against PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from hymoe_kernels.hymoe_op.stage2_permutation import sort_slots_by_expert
from hymoe_kernels.hymoe_op.stage3_expert_gemms import ROW_GEMM_CONFIGS, row_gemm
from hymoe_kernels.hymoe_op.stage4_combine import GATE_GRAD_CONFIGS, gate_grads
from kernel_cases import DEVICE, TOL, poisoned_outputs, random_ids, rel_err


def routed_case(N, D, E, top_k, seed, dtype=torch.float32):
    """Routing of N tokens, expert outputs (P, D) (garbage-free) and gates (N, top_k)."""
    gen = torch.Generator().manual_seed(seed)
    routing = sort_slots_by_expert(random_ids(N, E, top_k, gen), E)
    expert_out = torch.randn(routing.row_slot.shape[0], D, generator=gen).to(DEVICE, dtype)
    gates = torch.rand(N, top_k, generator=gen).to(DEVICE)
    return gen, routing, expert_out, gates


def gathered(expert_out, routing, N):
    """(N, top_k, D) float32: the expert rows of each token's slots."""
    rows = expert_out.float()[routing.slot_row.long()]
    return rows.reshape(N, routing.top_k, expert_out.shape[1])


@pytest.mark.parametrize("config", ROW_GEMM_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@settings(max_examples=3, deadline=None)
@given(N=st.integers(0, 40), D=st.integers(1, 40), Fh=st.integers(1, 40), E=st.integers(1, 6),
       k_frac=st.floats(0, 1), seed=st.integers(0, 2 ** 31))
def test_dense_down_projection_combine(config, dtype, N, D, Fh, E, k_frac, seed):
    top_k = 1 + int(k_frac * (E - 1))
    gen, routing, expert_out, gates = routed_case(N, D, E, top_k, seed, dtype)
    hidden = torch.randn(N, Fh, generator=gen).to(DEVICE, dtype)
    w, b = torch.randn(Fh, D, generator=gen).to(DEVICE, dtype), torch.randn(D).to(DEVICE, dtype)
    residual = torch.randn(N, D, generator=gen).to(DEVICE)
    alpha = torch.tensor([0.6], device=DEVICE)
    with poisoned_outputs():
        y = row_gemm(hidden, w, b, a_gelu=True, routing=routing, gates=gates.reshape(-1),
                     alpha=alpha, combine_src=expert_out, combine_gated=True, config=config)
        summed = row_gemm(hidden, w, routing=routing, residual=residual, combine_src=expert_out,
                          out_dtype=torch.float32, config=config)
    f = gathered(expert_out, routing, N)
    dense = F.gelu(hidden.float()) @ w.float()
    y_ref = dense + b.float() + 0.6 * (gates[:, :, None] * f).sum(1)
    assert y.dtype == dtype and rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(summed, hidden.float() @ w.float() + residual + f.sum(1)) < TOL[dtype]


@pytest.mark.parametrize("config", GATE_GRAD_CONFIGS)
@settings(max_examples=4, deadline=None)
@given(N=st.integers(0, 70), D=st.integers(1, 70), E=st.integers(1, 6), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2 ** 31))
def test_gate_grads(config, N, D, E, k_frac, seed):
    top_k = 1 + int(k_frac * (E - 1))
    gen, routing, expert_out, gates = routed_case(N, D, E, top_k, seed)
    dy = torch.randn(N, 2 * D, generator=gen).to(DEVICE)[:, ::2]
    alpha = torch.tensor([0.45], device=DEVICE)
    with poisoned_outputs():
        dgates, dalpha = gate_grads(dy, expert_out, routing.slot_row, gates, alpha, config=config)
    inner = (dy[:, None, :] * gathered(expert_out, routing, N)).sum(-1)
    assert rel_err(dgates, 0.45 * inner) < 1e-5
    terms = gates * inner
    assert dalpha.shape == (1,)
    assert (dalpha - terms.sum()).abs() <= 1e-5 * terms.abs().sum() + 1e-30
