"""Every Triton kernel of the package compiles for sm_90 (H200) without spilling.

The CPU suite runs kernels in the interpreter, which accepts code the real compiler rejects;
this test compiles them for real with ``benchmarks/gpu/compile_card.py`` (in a subprocess
without TRITON_INTERPRET): every specialization the package's host code launches at the
card's driver shapes, in bf16, plus the first shape in fp32 (the "ci" subset; ``--subset
full`` adds fp16 and fp32 everywhere -- its output is benchmarks/results/h200_resource_card.md).
Asserts: every kernel is reached by a driver and compiles; no register spills (LOCAL and
STACK 0); GEMM kernels launched on 16-bit operands at >= 1024 tokens and D >= 64 use HGMMA.
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


def _where(row):
    return f"{row['kernel']} [{row['dtype']} {row['config']} warps={row['num_warps']}]"


def test_every_kernel_is_launched_and_compiles(card):
    assert card["rows"], "no kernel launch was recorded"
    assert card["unlaunched"] == [], "no driver in compile_card.DRIVERS reaches these kernels"
    failed = [f"{_where(r)}: {r['error']}" for r in card["rows"] if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_no_register_spills(card):
    spilling = [f"{_where(r)}: {r['registers']} regs, stack {r['stack']} B, local {r['local']} B"
                for r in card["rows"] if r["ok"] and (r["stack"] or r["local"])]
    assert not spilling, "\n".join(spilling)


def test_large_16bit_gemms_use_hgmma(card):
    without = [_where(r) for r in card["rows"] if r["ok"] and r["needs_hgmma"] and not r["hgmma"]]
    assert not without, "no HGMMA in: " + ", ".join(without)
