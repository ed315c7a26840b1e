"""Compile every Triton kernel of ``hymoe_kernels`` for sm_90 (H200) without a GPU.

The interpreter (TRITON_INTERPRET=1, used by the CPU test suite) accepts code the real
compiler rejects, so this module compiles each kernel with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` and reads the cubin's resources with the cuobjdump that ships
in Triton's wheel: registers, stack and local memory (non-zero = spills), shared memory, and
the number of HGMMA (Hopper warpgroup tensor-core) instructions in the SASS.

No kernel or launch is declared by hand. Every @triton.jit kernel of the package (a jit
function no other jit function calls) is found by walking its op folders
(:data:`KERNEL_PACKAGES`) and the modules both ops' kernels share; during a
*recording* pass each kernel object is replaced by a recorder, and the package's own host
wrappers are driven on CPU tensors (zero-filled; nothing is launched) through forward and
backward, both layer paths (``hymoe_triton``) and the fused linear cross-entropy (its
kernels' host functions), at :data:`DRIVER_SHAPES` x dtypes. The recorder specializes each
launch's arguments exactly as Triton's launcher does (``native_specialize_impl``: pointer
dtypes, 16-byte alignment, integers equal to 1 or divisible by 16, constexprs,
num_warps/num_stages), so the compiled variants are the ones the GPU would build -- every block configuration the pickers choose at
those shapes. A new kernel needs nothing here unless no driver reaches it (it is then listed
under ``unlaunched`` and the test fails); a new host entry point gets a driver in
:data:`DRIVERS`; a new block-configuration table (``*_CONFIGS``) is listed in
:data:`CONFIG_TABLES`, and DRIVER_SHAPES must reach each of its entries in each dtype it can
be picked for (:func:`missing_configs`).

Run (TRITON_INTERPRET is removed first; @triton.jit reads it when a module is imported)::

    python -m benchmarks.gpu.compile_card [--subset ci|full] [--json PATH] [--markdown PATH]
        [--other-report PATH] [--record-only]

``full``: every shape of DRIVER_SHAPES in fp32, bf16 and fp16. ``ci`` (the test suite's set):
CI_SHAPES in bf16 plus the first shape in fp32. Compilations run in parallel processes.
``--record-only`` prints the launches (no compilation), which tests compare with the committed
card (:data:`CARD_JSON`, with the kernel sources' digest) to keep it current.
``--other-report`` adds the per-row registers of a report made under another Triton version.

Regenerate the committed card after any change to the kernels or their host code::

    python -m benchmarks.gpu.compile_card --subset full --json benchmarks/results/h200_resource_card.json \
        --markdown benchmarks/results/h200_resource_card.md
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
# The op folders, whose modules hold the kernels, and the modules the kernels of both ops
# share (device functions, launch helpers).
KERNEL_PACKAGES = ("hymoe_kernels.hymoe_op", "hymoe_kernels.cross_entropy")
SHARED_KERNEL_MODULES = ("hymoe_kernels.device_math", "hymoe_kernels.kernel_launch")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARD_JSON = os.path.join(REPO_ROOT, "benchmarks", "results", "h200_resource_card.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens, D, F, E, top_k): recommender widths (fused tile and grouped paths), a wide layer
# (grouped GEMMs' large tiles), D = 256 (the 16-bit loss tiles for 128 < D <= 256), and
# small batches / widths (the pickers' small configs; D = 32 for the middle weight-gradient
# tile).
DRIVER_SHAPES = ((2048, 64, 256, 4, 2), (8192, 512, 2048, 4, 2), (2048, 128, 512, 4, 2),
                 (2048, 256, 1024, 4, 2), (64, 64, 256, 4, 2), (64, 32, 64, 4, 2),
                 (64, 16, 32, 4, 1))
CI_SHAPES = DRIVER_SHAPES[:2]
# Every block-configuration table of the kernel modules ("module.NAME") and the kernels its
# entries configure; see missing_configs.
CONFIG_TABLES = {
    "stage1_router.ROUTER_CONFIGS": ("stage1_router._router_topk_kernel",),
    "stage1_router.ROUTER_BACKWARD_CONFIGS": ("stage1_router._router_backward_kernel",),
    "stage2_permutation.PERMUTE_CONFIGS": ("stage2_permutation._slot_histogram_kernel",
                                           "stage2_permutation._scatter_slots_kernel"),
    "stage2_permutation.OFFSETS_CONFIGS": ("stage2_permutation._group_offsets_kernel",),
    "stage3_expert_gemms.ROW_GEMM_CONFIGS": ("stage3_expert_gemms._row_gemm_kernel",),
    "stage3_expert_gemms.WEIGHT_GRAD_CONFIGS": ("stage3_expert_gemms._weight_grad_kernel",),
    "stage4_combine.GATE_GRAD_CONFIGS": ("stage4_combine._gate_grad_kernel",),
    "fused_tile.FORWARD_CONFIGS": ("fused_tile.fused_tile_forward_kernel",),
    "fused_tile.BACKWARD_TOKEN_CONFIGS": ("fused_tile.fused_tile_backward_token_kernel",),
    "fused_tile.WEIGHT_GRAD_CONFIGS": ("fused_tile.fused_tile_weight_grad_kernel",),
    "lce_triton_kernels.LCE_CONFIGS": ("lce_triton_kernels._lce_forward_kernel",
                                       "lce_triton_kernels._lce_grad_hidden_kernel",
                                       "lce_triton_kernels._lce_grad_weight_kernel"),
}
# a 16-bit tt.dot whose result has >= this many rows could run on HGMMA (one warpgroup = 64)
WGMMA_MIN_ROWS = 64
_DOT_RESULT = re.compile(r"tt\.dot .*: tensor<\d+x\d+x(bf16|f16)\b.*-> tensor<(\d+)x(\d+)x")


@dataclass(frozen=True)
class Launch:
    """One kernel specialization as Triton's launcher would compile it."""

    kernel: str                 # module.function
    signature: tuple            # ((name, type), ...)
    constexprs: tuple           # ((name, value), ...)
    attrs: tuple                # ((param index, attribute list), ...)
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """The upper-case constexprs (block sizes and flags), for the card."""
        return " ".join(f"{k}={v}" for k, v in self.constexprs if k.isupper())

    def uses_16bit_operands(self) -> bool:
        return any(t in ("*bf16", "*fp16") for _, t in self.signature)

    def key(self) -> str:
        """16 hex digits of sha256 of the launch (kernel, signature, constexprs,
        specialization attributes, num_warps, num_stages: what makes Triton compile a new
        variant)."""
        text = json.dumps([self.kernel, self.signature, self.constexprs, self.attrs,
                           self.num_warps, self.num_stages])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def kernel_modules() -> dict[str, object]:
    """{module file name: module} of every module of KERNEL_PACKAGES and of
    SHARED_KERNEL_MODULES (imported; file names are unique in the repository)."""
    names = [f"{package}.{info.name}" for package in KERNEL_PACKAGES
             for info in pkgutil.iter_modules(importlib.import_module(package).__path__)]
    modules = [importlib.import_module(name) for name in (*names, *SHARED_KERNEL_MODULES)]
    return {module.__name__.rpartition(".")[2]: module for module in modules}


def jit_functions_of(module) -> dict[str, JITFunction]:
    """{name: JITFunction} of the @triton.jit functions ``module`` defines."""
    found = {}
    for name, value in vars(module).items():
        if type(value).__name__ == "InterpretedFunction":
            raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; run this "
                               "module in a fresh process without it")
        if isinstance(value, JITFunction) and value.__module__ == module.__name__:
            found[name] = value
    return found


def discover_kernels() -> dict[str, tuple[object, str, JITFunction]]:
    """{"module.name": (module, attribute name, JITFunction)} for every kernel of
    :func:`kernel_modules`: a @triton.jit function that no other jit function calls."""
    jit_functions = {f"{short}.{name}": (module, name, fn)
                     for short, module in kernel_modules().items()
                     for name, fn in jit_functions_of(module).items()}
    sources = [fn.src for _, _, fn in jit_functions.values()]
    return {qualified: entry for qualified, entry in jit_functions.items()
            if not any(re.search(rf"\b{entry[1]}\s*\(", src) for src in sources
                       if src is not entry[2].src)}


def specialize(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, as Triton's launcher builds them."""
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    values = list(args)
    for param in fn.params[len(args):]:
        values.append(kwargs.pop(param.name) if param.name in kwargs else param.default)
    if kwargs:
        raise TypeError(f"{fn.__name__}: unexpected launch arguments {sorted(kwargs)}")
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(fn.params, values)):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        arg_type, key = native_specialize_impl(CUDABackend, value, False,
                                               not param.do_not_specialize,
                                               not param.do_not_specialize_on_alignment)
        signature[param.name] = arg_type
        if arg_type == "constexpr":
            constexprs[param.name] = key
        elif isinstance(key, str) and CUDABackend.parse_attr(key):
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs, options


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, qualified_name: str, fn: JITFunction, sink: list):
        self.qualified_name, self.fn, self.sink = qualified_name, fn, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            signature, constexprs, attrs, options = specialize(self.fn, args, kwargs)
            self.sink.append(Launch(self.qualified_name, tuple(signature.items()),
                                    tuple(constexprs.items()),
                                    tuple((k, json.dumps(v)) for k, v in attrs.items()),
                                    options["num_warps"], options["num_stages"]))
        return record


@contextlib.contextmanager
def recording(kernels: dict, sink: list) -> Iterator[None]:
    """Replace every kernel by a recorder, and torch.empty by torch.zeros (so host code that
    reads kernel outputs, e.g. indices, sees valid values), for the duration."""
    saved_empty, saved_empty_like = torch.empty, torch.empty_like
    try:
        for qualified_name, (module, name, fn) in kernels.items():
            setattr(module, name, _Recorder(qualified_name, fn, sink))
        torch.empty, torch.empty_like = torch.zeros, torch.zeros_like
        yield
    finally:
        torch.empty, torch.empty_like = saved_empty, saved_empty_like
        for module, name, fn in kernels.values():
            setattr(module, name, fn)


def _layer_inputs(shape: tuple, dtype: torch.dtype):
    """x (tokens, D), an all-real mask, HyMoEWeights (H = D), alpha_param and ramp, all
    requiring grad but the mask and ramp."""
    from hymoe_kernels.weights import HyMoEWeights
    tokens, D, Fh, E, _ = shape
    weights = HyMoEWeights(*((torch.randn(s, dtype=dtype) * 0.1).requires_grad_()
                             for s in HyMoEWeights.shapes(D, D, E, Fh)))
    x = torch.randn(tokens, D, dtype=dtype).requires_grad_()
    mask = torch.ones(tokens, dtype=torch.bool)
    return x, mask, weights, torch.zeros(()).requires_grad_(), torch.ones(())


def drive_hymoe_triton(shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the package's Triton layer function on each path it can take
    at the shape: the grouped path always, the fused token tile where it is supported
    (path "auto" picks one of the two)."""
    from hymoe_kernels.hymoe_op.fused_tile import fused_tile_supported
    from hymoe_kernels.hymoe_op.triton_backend import hymoe_triton
    tokens, D, Fh, E, top_k = shape
    paths = ["grouped"] + (["fused"] if fused_tile_supported(D, Fh, E, D, top_k, dtype) else [])
    for path in paths:
        x, mask, weights, alpha_param, ramp = _layer_inputs(shape, dtype)
        leaves = [x, *weights, alpha_param]
        y, prob_sum, _ = hymoe_triton(x, mask, weights, alpha_param, ramp, top_k, path=path)
        torch.autograd.grad([y, prob_sum], leaves,
                            [torch.randn_like(y), torch.randn_like(prob_sum)], allow_unused=True)


def drive_linear_cross_entropy(shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the fused linear cross-entropy kernels on (tokens, D) hidden
    states against 4F + 3 items, without and with a seen-item offset, where the kernels
    take D in this dtype."""
    from hymoe_kernels.cross_entropy import lce_triton_kernels as lce
    tokens, D, Fh, _, _ = shape
    if not lce.triton_supports(D, dtype):
        return
    n_items = 4 * Fh + 3
    hidden, weight = torch.randn(tokens, D, dtype=dtype), torch.randn(n_items, D, dtype=dtype)
    target = torch.randint(0, n_items, (tokens,))
    lse, _, _ = lce.triton_lce_forward(hidden, weight, target)
    lce.triton_lce_backward(hidden, weight, target, lse, torch.ones(()))
    bits, offset = lce.listed_bitset(target[:, None], n_items), torch.zeros(())  # seen offset
    lse, _, _ = lce.triton_lce_forward(hidden, weight, target, bits, offset)
    lce.triton_lce_backward(hidden, weight, target, lse, torch.ones(()), bits, offset)


DRIVERS: dict[str, Callable[[tuple, torch.dtype], None]] = {
    "hymoe_triton": drive_hymoe_triton,
    "linear_cross_entropy": drive_linear_cross_entropy,
}


def record_launches(subset: str) -> tuple[dict[Launch, set], list[str]]:
    """{launch: {"dtype tokens x D x F" contexts}} for the subset, and the kernels that no
    driver launched."""
    kernels = discover_kernels()
    if subset == "full":
        plan = [(dtype, shape) for dtype in ("fp32", "bf16", "fp16") for shape in DRIVER_SHAPES]
    else:
        plan = [("bf16", shape) for shape in CI_SHAPES] + [("fp32", CI_SHAPES[0])]
    launches: dict[Launch, set] = {}
    for dtype, shape in plan:
        for driver in DRIVERS.values():
            sink: list[Launch] = []
            with recording(kernels, sink):
                driver(shape, DTYPES[dtype])
            for launch in sink:
                launches.setdefault(launch, set()).add(f"{dtype} {shape[0]}x{shape[1]}x{shape[2]}")
    launched = {launch.kernel for launch in launches}
    return launches, sorted(set(kernels) - launched)


def config_tables() -> dict[str, tuple]:
    """{"module.NAME": entries} of every block-configuration table of :func:`kernel_modules`:
    a module-level ``*_CONFIGS`` tuple of NamedTuples (importable with or without the
    interpreter: nothing is compiled)."""
    return {f"{short}.{name}": value for short, module in kernel_modules().items()
            for name, value in vars(module).items()
            if name.endswith("_CONFIGS") and isinstance(value, tuple)}


def config_dtypes(entry) -> tuple[str, ...]:
    """The input dtypes a config can be picked for: by its ``fp32`` field, else all."""
    fp32 = getattr(entry, "fp32", None)
    return tuple(DTYPES) if fp32 is None else ("fp32",) if fp32 else ("bf16", "fp16")


def missing_configs(rows: list[dict]) -> list[str]:
    """Every (kernel, table entry, dtype) the host code can launch -- each entry of each
    CONFIG_TABLES table, for each kernel it configures, in each dtype of config_dtypes --
    that no compiled row of a report matches (same launch parameters; a parameter the
    config does not set, e.g. num_stages, may have any value)."""
    from hymoe_kernels.kernel_launch import launch_params
    tables = config_tables()
    missing = [f"{name}: a config table not in CONFIG_TABLES"
               for name in sorted(set(tables) - set(CONFIG_TABLES))]
    for table, kernels in CONFIG_TABLES.items():
        for entry in tables.get(table, ()):
            wanted = launch_params(entry)
            for kernel in kernels:
                for dtype in config_dtypes(entry):
                    if not any(row["ok"] and row["kernel"] == kernel
                               and dtype in row["dtype"].split("/")
                               and all(row["launch_params"].get(k) == v
                                       for k, v in wanted.items())
                               for row in rows):
                        missing.append(f"{kernel} {dtype} {wanted} ({table})")
    return missing


def kernel_source_digest() -> str:
    """sha256 (16 hex digits) of the kernel sources, which the card's numbers belong to: the
    files of the modules of :func:`kernel_modules` that define @triton.jit functions, and of
    SHARED_KERNEL_MODULES, in file-name order."""
    shared = {name.rpartition(".")[2] for name in SHARED_KERNEL_MODULES}
    digest = hashlib.sha256()
    for short, module in sorted(kernel_modules().items()):
        if short in shared or jit_functions_of(module):
            with open(module.__file__, "rb") as handle:
                digest.update(short.encode() + b"\0" + handle.read())
    return digest.hexdigest()[:16]


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL from ``cuobjdump -res-usage``; from the SASS, the local-memory
    loads/stores (STL/LDL: the kernels declare no local arrays, so these are register spills;
    a STACK frame without them is reserved, not used) and the HGMMA instructions."""
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
    instructions = [line.split("*/", 1)[-1] for line in sass.splitlines() if "/*" in line]
    return {"registers": registers, "stack": stack, "static_shared": shared, "local": local,
            "spill_accesses": sum(1 for ins in instructions if re.search(r"\b(STL|LDL)\b", ins)),
            "hgmma": sum(1 for ins in instructions if "HGMMA" in ins)}


def dots_missing_wgmma(ttgir: str) -> int:
    """16-bit tt.dot ops with >= WGMMA_MIN_ROWS result rows that were not lowered to Hopper
    warpgroup MMA (ttng.warp_group_dot) -- tensor-core GEMMs left on the older mma path."""
    return sum(1 for line in ttgir.splitlines()
               if (m := _DOT_RESULT.search(line)) and int(m.group(2)) >= WGMMA_MIN_ROWS)


def compile_launch(launch: Launch, contexts: set, kernels: dict) -> dict:
    """Compile one launch for sm_90; a row of the resource card."""
    _, _, fn = kernels[launch.kernel]
    row = {"kernel": launch.kernel, "config": launch.label(), "num_warps": launch.num_warps,
           "num_stages": launch.num_stages, "seen_at": sorted(contexts),
           "dtype": "/".join(sorted({context.split()[0] for context in contexts})),
           "launch_params": {**dict(launch.constexprs), "num_warps": launch.num_warps,
                             "num_stages": launch.num_stages},
           "key": launch.key()}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, dict(launch.signature), dict(launch.constexprs),
                      {k: json.loads(v) for k, v in launch.attrs}),
            target=SM90, options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as error:    # the card reports every failure; the test asserts none
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")
        return row
    ttgir = compiled.asm["ttgir"]
    row.update(ok=True, compile_s=round(time.perf_counter() - start, 2),
               dynamic_shared=compiled.metadata.shared,
               wgmma_dots=ttgir.count("ttng.warp_group_dot "),
               dots_missing_wgmma=dots_missing_wgmma(ttgir),
               **cubin_resources(compiled.asm["cubin"]))
    return row


_WORK: list = []     # (launch, contexts, kernels) handed to forked compile workers


def _compile_work_item(index: int) -> dict:
    return compile_launch(*_WORK[index])


def card(subset: str) -> dict:
    """Record, compile and measure; the report (rows, unlaunched kernels, versions)."""
    kernels = discover_kernels()
    digest = kernel_source_digest()        # of the sources discover_kernels just read
    launches, unlaunched = record_launches(subset)
    _WORK[:] = [(launch, contexts, kernels) for launch, contexts
                in sorted(launches.items(), key=lambda item: (item[0].kernel, item[0].label()))]
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_work_item, range(len(_WORK))))
    return {"triton": triton.__version__, "target": "cuda sm_90", "subset": subset,
            "source_digest": digest, "kernels": sorted(kernels),
            "unlaunched": unlaunched, "missing_configs": missing_configs(rows), "rows": rows}


def _summary(report: dict) -> str:
    ok = [r for r in report["rows"] if r["ok"]]
    return (f"{len(report['rows'])} specializations of {len(report['kernels'])} kernels; "
            f"{len(report['rows']) - len(ok)} failed to compile; "
            f"{sum(1 for r in ok if r['spill_accesses'] or r['local'])} spill (STL/LDL "
            f"in the SASS); {sum(1 for r in ok if r['stack'])} reserve a stack frame; "
            f"{sum(1 for r in ok if r['dots_missing_wgmma'])} have 16-bit dots of >= "
            f"{WGMMA_MIN_ROWS} rows not on warpgroup MMA; "
            f"{sum(1 for r in ok if r['wgmma_dots'] and not r['hgmma'])} plan warpgroup MMA "
            "but have no HGMMA in the SASS.")


def markdown(report: dict, other: dict | None = None) -> str:
    """The resource card as Markdown; with ``other`` (a report of the same launches under
    another Triton version) its registers, spills and HGMMA beside each row's."""
    other_rows = {row["key"]: row for row in (other or {}).get("rows", [])}
    lines = [f"# sm_90 (H200) resource card -- Triton {report['triton']}, subset "
             f"`{report['subset']}`", "",
             f"Kernel sources {report['source_digest']} (sha256 of the kernel modules of "
             "`hymoe_kernels/hymoe_op/` and `hymoe_kernels/cross_entropy/` and of "
             "`hymoe_kernels/device_math.py` and `kernel_launch.py`, checked by "
             "tests/kernels/test_compile_sm90.py). Regenerate with `python -m "
             "benchmarks.gpu.compile_card --subset full --json "
             "benchmarks/results/h200_resource_card.json --markdown "
             "benchmarks/results/h200_resource_card.md` after any change to the kernels or "
             "their host code.", "",
             "This compiles, for `GPUTarget('cuda', 90, 32)` without a GPU, every kernel "
             "specialization the package's host code launches at the driver shapes "
             f"(tokens x D x F, E=4: {', '.join(f'{s[0]}x{s[1]}x{s[2]}' for s in DRIVER_SHAPES)}"
             "), which reach every entry of every block-configuration table in every dtype "
             "it can be picked for. REG = registers per thread; STACK / LOCAL = stack frame / "
             "local memory bytes per thread; STL+LDL = local-memory stores+loads in the SASS "
             "(register spills); shared = Triton's dynamic shared memory per program (bytes); "
             "HGMMA = Hopper warpgroup MMA instructions in the SASS (0 is expected for kernels "
             "without dots, fp32 FMA dots and tiles of < 64 rows).", ""]
    other_head, other_rule = "", ""
    if other is not None:
        lines += [f"Triton {other['triton']} (subset `{other['subset']}`, sources "
                  f"{other['source_digest']}): {_summary(other)} Its REG / STL+LDL / HGMMA "
                  "are in the last column (- where it did not build the row).", ""]
        other_head, other_rule = f" Triton {other['triton']} |", "---|"
    lines += ["| kernel | dtype | constexprs | warps | stages | REG | STACK | LOCAL | STL+LDL | "
              "shared | HGMMA | seen at |" + other_head,
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + other_rule]
    for row in report["rows"]:
        seen = ", ".join(row["seen_at"][:3]) + (" ..." if len(row["seen_at"]) > 3 else "")
        head = (f"| {row['kernel']} | {row['dtype']} | {row['config']} | {row['num_warps']} | "
                f"{row['num_stages']} | ")
        if row["ok"]:
            line = head + (f"{row['registers']} | {row['stack']} | {row['local']} | "
                           f"{row['spill_accesses']} | {row['dynamic_shared']} | "
                           f"{row['hgmma']} | {seen} |")
        else:
            line = head + f"FAILED: {row['error'][:300]!r} | | | | | | {seen} |"
        if other is not None:
            twin = other_rows.get(row["key"])
            line += (" - |" if twin is None else " FAILED |" if not twin["ok"] else
                     f" {twin['registers']} / {twin['spill_accesses']} / {twin['hgmma']} |")
        lines.append(line)
    lines += ["", _summary(report)]
    if report["unlaunched"]:
        lines.append("Kernels no driver launched (not compiled): " + ", ".join(report["unlaunched"]))
    if report["missing_configs"]:
        lines.append("Configs the host can launch that no row compiled: "
                     + "; ".join(report["missing_configs"]))
    return "\n".join(lines) + "\n"


def _run_subprocess(args: list[str], timeout_s: float) -> dict:
    """Run this module with ``args`` in a fresh interpreter without TRITON_INTERPRET; the
    JSON it prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu.compile_card", *args],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"compile card crashed (rc {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def run_card_subprocess(subset: str, timeout_s: float = 900) -> dict:
    """The report of ``subset``, compiled in a fresh interpreter."""
    return _run_subprocess(["--subset", subset, "--json", "-"], timeout_s)


def record_subprocess(subset: str, timeout_s: float = 300) -> dict:
    """{"source_digest", "launches": [Launch.key()], "unlaunched"} of ``subset``, recorded
    (not compiled) in a fresh interpreter."""
    return _run_subprocess(["--subset", subset, "--record-only"], timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--json", help="write the report as JSON here ('-' = stdout only)")
    parser.add_argument("--markdown", help="write the Markdown card here")
    parser.add_argument("--other-report", help="a JSON report of another Triton version, "
                        "shown beside this one in the Markdown")
    parser.add_argument("--record-only", action="store_true",
                        help="print the launches as JSON, compile nothing")
    args = parser.parse_args(argv)
    if args.record_only:
        launches, unlaunched = record_launches(args.subset)
        print(json.dumps({"source_digest": kernel_source_digest(), "unlaunched": unlaunched,
                          "launches": sorted(launch.key() for launch in launches)}))
        return 0
    report = card(args.subset)
    other = None
    if args.other_report:
        with open(args.other_report, encoding="utf-8") as handle:
            other = json.load(handle)
    text = markdown(report, other)
    if args.json == "-":
        print(json.dumps(report))
    else:
        print(text)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    complete = args.subset != "full" or not report["missing_configs"]
    return 0 if all(row["ok"] for row in report["rows"]) and not report["unlaunched"] \
        and complete else 1


if __name__ == "__main__":
    sys.exit(main())
