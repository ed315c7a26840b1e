"""Every Triton kernel of the package compiles for sm_90 (H200) without spilling.

The CPU suite runs kernels in the interpreter, which accepts code the real compiler rejects;
this test compiles them for real with ``benchmarks/gpu/compile_card.py`` (in a subprocess
without TRITON_INTERPRET): every specialization the package's host code launches at the
card's CI_SHAPES (tokens x D x F = 2048x64x256 and 8192x512x2048) in bf16, plus the first in
fp32 (the "ci" subset; ``--subset full`` adds small shapes, D=128 and 256, fp16 and fp32
everywhere -- its output is benchmarks/results/h200_resource_card.{json,md}).
Asserts: every kernel is reached by a driver and compiles; no register spills (no STL/LDL
local-memory accesses in the SASS, LOCAL 0); every 16-bit dot with a tile of >= 64 rows (the
GEMM kernels at D >= 64) runs on Hopper warpgroup MMA, i.e. HGMMA in the SASS.

The committed ``full`` card (benchmarks/results/h200_resource_card.json) must match the code:
the same kernel sources and the same launches as the host code records now (no compilation
needed to check), every config the host code can launch compiled, none failing or spilling.
"""
import json

import pytest

from benchmarks.gpu.compile_card import (CARD_JSON, CONFIG_TABLES, config_tables, missing_configs,
                                         record_subprocess, run_card_subprocess)

REGENERATE = ("regenerate it: python -m benchmarks.gpu.compile_card --subset full --json "
              "benchmarks/results/h200_resource_card.json --markdown "
              "benchmarks/results/h200_resource_card.md")


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
    spilling = [f"{_where(r)}: {r['registers']} regs, {r['spill_accesses']} STL/LDL, "
                f"stack {r['stack']} B, local {r['local']} B"
                for r in card["rows"] if r["ok"] and (r["spill_accesses"] or r["local"])]
    assert not spilling, "\n".join(spilling)


def test_16bit_gemm_tiles_use_hgmma(card):
    """Every 16-bit dot with a tile of >= 64 rows lowers to warpgroup MMA, and warpgroup MMA
    shows up as HGMMA in the SASS."""
    missed = [f"{_where(r)}: {r['dots_missing_wgmma']} dots" for r in card["rows"]
              if r["ok"] and r["dots_missing_wgmma"]]
    assert not missed, "16-bit dots of >= 64 rows without warpgroup MMA: " + ", ".join(missed)
    without = [_where(r) for r in card["rows"] if r["ok"] and r["wgmma_dots"] and not r["hgmma"]]
    assert not without, "warpgroup MMA planned but no HGMMA in: " + ", ".join(without)
    assert any(r["hgmma"] for r in card["rows"] if r["ok"] and "bf16" in r["dtype"])


@pytest.fixture(scope="module")
def committed_card():
    with open(CARD_JSON, encoding="utf-8") as handle:
        return json.load(handle)


def test_committed_card_matches_the_code(committed_card):
    recorded = record_subprocess("full")
    assert committed_card["subset"] == "full"
    assert committed_card["source_digest"] == recorded["source_digest"], \
        "the kernels changed since the card was made; " + REGENERATE
    card_launches = {row["key"] for row in committed_card["rows"]}
    new = sorted(set(recorded["launches"]) - card_launches)
    gone = sorted(card_launches - set(recorded["launches"]))
    assert not new and not gone, (f"{len(new)} launches not in the card (first: {new[:1]}), "
                                  f"{len(gone)} in the card no longer launched (first: "
                                  f"{gone[:1]}); " + REGENERATE)


def test_committed_card_covers_every_config_and_is_clean(committed_card):
    assert sorted(config_tables()) == sorted(CONFIG_TABLES), "list new *_CONFIGS tables"
    assert missing_configs(committed_card["rows"]) == []
    assert committed_card["unlaunched"] == []
    bad = [f"{_where(r)}: {r.get('error', '')[:200]} {r.get('registers')} regs, "
           f"{r.get('spill_accesses')} STL/LDL" for r in committed_card["rows"]
           if not r["ok"] or r["spill_accesses"] or r["local"] or r["dots_missing_wgmma"]]
    assert not bad, "\n".join(bad)
