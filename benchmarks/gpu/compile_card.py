"""Compile every Triton kernel of ``hymoe_kernels`` for sm_90 (H200) without a GPU.

The interpreter (TRITON_INTERPRET=1, used by the CPU test suite) accepts code that the real
compiler rejects, so this module compiles each kernel with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` at every block configuration its launcher can pick and every
dtype, and reads the cubin's resources with the cuobjdump that ships in Triton's wheel:
registers, stack, local memory (spills), shared memory, and whether the SASS contains HGMMA
(Hopper warpgroup tensor-core) instructions.

Declaring a kernel: one :class:`KernelDecl` per @triton.jit kernel in :data:`DECLARATIONS` --
the signature is derived from the kernel's parameter list (``*_ptr`` parameters are pointers
to the compute dtype unless listed in ``pointer_dtypes``; other non-constexpr parameters are
i32), and ``variants(dtype)`` yields the constexprs/num_warps of each configuration from the
kernel module's config tuples. :func:`undeclared_kernels` lists kernels nobody declared.

Run (TRITON_INTERPRET is removed from the environment first; @triton.jit reads it when the
kernel module is imported)::

    python -m benchmarks.gpu.compile_card [--subset ci|full] [--json PATH] [--markdown PATH]

``full`` compiles every kernel x config x dtype (fp32, bf16, fp16); ``ci`` (the test suite's
set) compiles every kernel x config in bf16 plus each kernel's first config in fp32.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
DTYPES = ("fp32", "bf16", "fp16")
KERNEL_PACKAGE = "hymoe_kernels.kernels"


@dataclass(frozen=True)
class Variant:
    """One block configuration of a kernel: its constexpr values and launch options."""

    label: str
    constexprs: dict
    num_warps: int
    num_stages: int = 3


@dataclass(frozen=True)
class KernelDecl:
    """How to compile one @triton.jit kernel of ``module`` (a module of KERNEL_PACKAGE).

    pointer_dtypes: element types of pointers that are not of the compute dtype;
    int64_args: integer parameters passed as i64; divisible_args: integer parameters that
    real launches pass as multiples of 16 (Triton specializes those); gemm: whether the
    kernel's tensor-core dots must lower to HGMMA in 16-bit dtypes;
    variants(dtype): every configuration the launcher can pick."""

    module: str
    kernel: str
    variants: Callable[[str], Iterator[Variant]]
    pointer_dtypes: dict = field(default_factory=dict)
    int64_args: frozenset = frozenset()
    divisible_args: frozenset = frozenset()
    gemm: bool = False


def kernel_fn(decl: KernelDecl) -> JITFunction:
    fn = getattr(importlib.import_module(f"{KERNEL_PACKAGE}.{decl.module}"), decl.kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{decl.module}.{decl.kernel} is {type(fn).__name__}, not a compiled "
                           "JITFunction: run without TRITON_INTERPRET=1")
    return fn


def signature_of(fn: JITFunction, decl: KernelDecl, dtype: str) -> tuple[dict, dict]:
    """(signature, attrs) for ASTSource, derived from the kernel's parameter list."""
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + decl.pointer_dtypes.get(name, dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]      # torch allocations are aligned
        else:
            signature[name] = "i64" if name in decl.int64_args else "i32"
            if name in decl.divisible_args:
                attrs[(index,)] = [["tt.divisibility", 16]]
    unknown = (set(decl.pointer_dtypes) | decl.int64_args | decl.divisible_args) - set(signature)
    if unknown:
        raise ValueError(f"{decl.kernel}: declared arguments {sorted(unknown)} are not parameters")
    return signature, attrs


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL from ``cuobjdump -res-usage`` and the HGMMA count of the SASS."""
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", handle.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", handle.name], check=True,
                              capture_output=True, text=True).stdout
    match = _RESOURCE_LINE.search(usage)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{usage}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack": stack, "static_shared": shared, "local": local,
            "hgmma": sum(1 for line in sass.splitlines() if "HGMMA" in line)}


def compile_variant(decl: KernelDecl, dtype: str, variant: Variant) -> dict:
    """Compile one kernel/dtype/config for sm_90; a row of the resource card."""
    fn = kernel_fn(decl)
    signature, attrs = signature_of(fn, decl, dtype)
    row = {"kernel": f"{decl.module}.{decl.kernel}", "dtype": dtype, "config": variant.label,
           "num_warps": variant.num_warps, "num_stages": variant.num_stages, "gemm": decl.gemm}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, variant.constexprs, attrs), target=SM90,
                                  options={"num_warps": variant.num_warps,
                                           "num_stages": variant.num_stages})
    except Exception as error:    # the card reports every failure, the test asserts none
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")
        return row
    row.update(ok=True, compile_s=round(time.perf_counter() - start, 2),
               dynamic_shared=compiled.metadata.shared, **cubin_resources(compiled.asm["cubin"]))
    return row


# --------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------

def _fused_tile_variants(configs_name: str, with_top_k: bool):
    """Each TileConfig of fused_tile.<configs_name> for ``dtype`` at its widest BLOCK_D,
    E = 4, k = 2."""
    def variants(dtype: str) -> Iterator[Variant]:
        fused_tile = importlib.import_module(f"{KERNEL_PACKAGE}.fused_tile")
        for config in getattr(fused_tile, configs_name):
            if config.fp32 != (dtype == "fp32"):
                continue
            constexprs = {"BLOCK_M": config.block_m, "BLOCK_D": config.max_block_d,
                          "BLOCK_F": config.block_f}
            if configs_name == "WEIGHT_GRAD_CONFIGS":
                constexprs["BLOCK_O"] = max(config.max_block_d, fused_tile.block_e_for(4))
            else:
                constexprs.update(BLOCK_E=fused_tile.block_e_for(4), HAS_MASK=True)
            if with_top_k:
                constexprs["TOP_K"] = 2
            yield Variant(f"D<={config.max_block_d} BM={config.block_m} BF={config.block_f}",
                          constexprs, config.num_warps, config.num_stages)
    return variants


_FUSED_SCALARS = {"alpha_param_ptr": "fp32", "ramp_ptr": "fp32", "mask_ptr": "u8"}
_FUSED_DIMS = frozenset({"D", "F", "H", "stride_xm"})

DECLARATIONS: tuple[KernelDecl, ...] = (
    KernelDecl("fused_tile", "fused_tile_forward_kernel",
               _fused_tile_variants("FORWARD_CONFIGS", with_top_k=True),
               pointer_dtypes={**_FUSED_SCALARS, "selected_bits_ptr": "i32",
                               "prob_partial_ptr": "fp32", "load_partial_ptr": "i32"},
               divisible_args=_FUSED_DIMS | {"stride_ym"}, gemm=True),
    KernelDecl("fused_tile", "fused_tile_backward_token_kernel",
               _fused_tile_variants("BACKWARD_TOKEN_CONFIGS", with_top_k=False),
               pointer_dtypes={**_FUSED_SCALARS, "dprob_sum_ptr": "fp32",
                               "selected_bits_ptr": "i32", "gate_scale_ptr": "fp32",
                               "dalpha_partial_ptr": "fp32"},
               divisible_args=_FUSED_DIMS | {"stride_dym", "stride_dxm"}, gemm=True),
    KernelDecl("fused_tile", "fused_tile_weight_grad_kernel",
               _fused_tile_variants("WEIGHT_GRAD_CONFIGS", with_top_k=False),
               pointer_dtypes={"gate_scale_ptr": "fp32", "partial_ptr": "fp32"},
               int64_args=frozenset({"split_stride"}) | frozenset(
                   f"off_{w}" for w in ("rw1", "rb1", "rw2", "rb2", "ew1", "eb1", "ew2", "eb2",
                                        "dw1", "db1", "dw2", "db2")),
               divisible_args=_FUSED_DIMS | {"stride_dym", "tokens_per_split"}, gemm=True),
)


def present_declarations() -> list[KernelDecl]:
    """Declarations whose kernel module exists in this checkout."""
    names = {info.name for info in pkgutil.iter_modules(
        importlib.import_module(KERNEL_PACKAGE).__path__)}
    return [decl for decl in DECLARATIONS if decl.module in names]


def undeclared_kernels() -> list[str]:
    """Every @triton.jit kernel (a function with a program grid, i.e. not a helper called
    from kernels) of KERNEL_PACKAGE that has no declaration."""
    declared = {(decl.module, decl.kernel) for decl in DECLARATIONS}
    missing = []
    package = importlib.import_module(KERNEL_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, value in vars(module).items():
            if (isinstance(value, JITFunction) and value.__module__ == module.__name__
                    and "tl.program_id" in value.src and (info.name, name) not in declared):
                missing.append(f"{info.name}.{name}")
    return missing


def card_rows(subset: str) -> list[dict]:
    """Compile the ``subset`` ("ci" or "full") of kernel x config x dtype; one row each."""
    rows = []
    for decl in present_declarations():
        if subset == "full":
            plan = [(dtype, variant) for dtype in DTYPES for variant in decl.variants(dtype)]
        else:
            plan = [("bf16", variant) for variant in decl.variants("bf16")]
            plan.append(("fp32", next(iter(decl.variants("fp32")))))
        rows.extend(compile_variant(decl, dtype, variant) for dtype, variant in plan)
    return rows


def markdown(rows: list[dict], undeclared: list[str]) -> str:
    """The resource card as a Markdown table."""
    lines = [f"# sm_90 (H200) resource card, Triton {triton.__version__}", "",
             "Compiled with `python -m benchmarks.gpu.compile_card --subset full` for "
             "`GPUTarget('cuda', 90, 32)` without a GPU; resources from `cuobjdump -res-usage` "
             "(REG per thread, STACK/LOCAL bytes per thread -- non-zero means spills) and "
             "`cuobjdump -sass` (HGMMA = Hopper warpgroup MMA instructions). Shared = Triton's "
             "dynamic shared memory per program.", "",
             "| kernel | dtype | config | warps | REG | STACK | LOCAL | shared B | HGMMA | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["ok"]:
            lines.append(f"| {row['kernel']} | {row['dtype']} | {row['config']} | "
                         f"{row['num_warps']} | {row['registers']} | {row['stack']} | "
                         f"{row['local']} | {row['dynamic_shared']} | {row['hgmma']} | "
                         f"{row['compile_s']} |")
        else:
            lines.append(f"| {row['kernel']} | {row['dtype']} | {row['config']} | "
                         f"{row['num_warps']} | FAILED: {row['error'][:200]} | | | | | |")
    if undeclared:
        lines += ["", "Kernels without a declaration (not compiled): " + ", ".join(undeclared)]
    return "\n".join(lines) + "\n"


def run_card_subprocess(subset: str, timeout_s: float = 600) -> dict:
    """Run this module in a fresh interpreter without TRITON_INTERPRET; its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo_root] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu.compile_card",
                             "--subset", subset, "--json", "-"], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"compile card failed (rc {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--json", help="write the rows as JSON here ('-' = stdout)")
    parser.add_argument("--markdown", help="write the Markdown card here")
    args = parser.parse_args(argv)
    rows = card_rows(args.subset)
    undeclared = undeclared_kernels()
    report = {"triton": triton.__version__, "target": "cuda sm_90", "subset": args.subset,
              "rows": rows, "undeclared": undeclared}
    card = markdown(rows, undeclared)
    if args.json == "-":
        print(json.dumps(report))
    else:
        print(card)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(card)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
