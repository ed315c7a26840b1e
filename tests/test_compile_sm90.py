"""Every Triton kernel of the package compiles for sm_90 (H200) without spilling.

The CPU suite runs kernels in the interpreter, which accepts code the real compiler rejects;
this test compiles them for real (``benchmarks/gpu/compile_card.py``, in a subprocess without
TRITON_INTERPRET) at every block configuration their launchers can pick, in bf16, plus each
kernel's first configuration in fp32 (the "ci" subset; ``--subset full`` adds fp16 and every
fp32 configuration). Asserts: each compiles; no register spills (LOCAL and STACK 0); kernels
declared as GEMMs issue HGMMA (Hopper warpgroup MMA) in bf16 (their configs have BLOCK_D >= 64).
"""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from benchmarks.gpu.compile_card import run_card_subprocess  # noqa: E402


@pytest.fixture(scope="module")
def card():
    return run_card_subprocess("ci")


def test_every_kernel_is_declared(card):
    assert card["undeclared"] == [], "declare these kernels in benchmarks/gpu/compile_card.py"
    assert card["rows"], "no kernel was compiled"


def test_every_kernel_compiles_for_sm90(card):
    failed = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in card["rows"]
              if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_no_register_spills(card):
    spilling = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['registers']} regs, "
                f"stack {r['stack']} B, local {r['local']} B"
                for r in card["rows"] if r["ok"] and (r["stack"] or r["local"])]
    assert not spilling, "\n".join(spilling)


def test_gemm_kernels_use_hgmma_in_bf16(card):
    without = [f"{r['kernel']} {r['config']}" for r in card["rows"]
               if r["ok"] and r["gemm"] and r["dtype"] == "bf16" and r["hgmma"] == 0]
    assert not without, "no HGMMA in: " + ", ".join(without)
