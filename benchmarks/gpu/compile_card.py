"""Compile every Triton kernel of ``hymoe_kernels`` for sm_90 (H200) without a GPU.

The interpreter (TRITON_INTERPRET=1, used by the CPU test suite) accepts code the real
compiler rejects, so this module compiles each kernel with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` and reads the cubin's resources with the cuobjdump that ships
in Triton's wheel: registers, stack and local memory (non-zero = spills), shared memory, and
the number of HGMMA (Hopper warpgroup tensor-core) instructions in the SASS.

Nothing is declared by hand. Every @triton.jit kernel of ``hymoe_kernels.kernels`` (a jit
function no other jit function calls) is found by walking the package; during a *recording*
pass each kernel object is replaced by a recorder, and the package's own host wrappers are
driven on CPU tensors (zero-filled; nothing is launched) through forward and backward at
:data:`DRIVER_SHAPES` x dtypes. The recorder specializes each launch's arguments exactly as
Triton's launcher does (``native_specialize_impl``: pointer dtypes, 16-byte alignment,
integers equal to 1 or divisible by 16, constexprs, num_warps/num_stages), so the compiled
variants are the ones the GPU would build -- every block configuration the pickers choose at
those shapes. A new kernel needs nothing here unless no driver reaches it (it is then listed
under ``unlaunched`` and the test fails); a new host entry point gets a driver in
:data:`DRIVERS`.

Run (TRITON_INTERPRET is removed first; @triton.jit reads it when a module is imported)::

    python -m benchmarks.gpu.compile_card [--subset ci|full] [--json PATH] [--markdown PATH]

``full``: every shape of DRIVER_SHAPES in fp32, bf16 and fp16. ``ci`` (the test suite's set):
CI_SHAPES in bf16 plus the first shape in fp32. Compilations run in parallel processes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
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
KERNEL_PACKAGE = "hymoe_kernels.kernels"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens, D, F, E, top_k): recommender widths (fused tile and grouped paths), a wide layer
# (grouped GEMMs' large tiles), and small batches / widths (the pickers' small configs).
DRIVER_SHAPES = ((2048, 64, 256, 4, 2), (8192, 512, 2048, 4, 2), (2048, 128, 512, 4, 2),
                 (64, 64, 256, 4, 2), (64, 16, 32, 4, 1))
CI_SHAPES = DRIVER_SHAPES[:2]
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


def discover_kernels() -> dict[str, tuple[object, str, JITFunction]]:
    """{"module.name": (module, attribute name, JITFunction)} for every kernel defined in
    KERNEL_PACKAGE: a @triton.jit function that no other jit function of the package calls."""
    jit_functions = {}
    package = importlib.import_module(KERNEL_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, value in vars(module).items():
            if type(value).__name__ == "InterpretedFunction":
                raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1; run this "
                                   "module in a fresh process without it")
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                jit_functions[f"{info.name}.{name}"] = (module, name, value)
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
    tokens, D, Fh, E, _ = shape
    H = D
    shapes = [(D, H), (H,), (H, E), (E,), (E, D, Fh), (E, Fh), (E, Fh, D), (E, D),
              (D, Fh), (Fh,), (Fh, D), (D,)]
    weights = [torch.randn(s, dtype=dtype) * 0.1 for s in shapes]
    x = torch.randn(tokens, D, dtype=dtype)
    mask = torch.ones(tokens, dtype=torch.bool)
    return x, mask, weights, torch.zeros(()), torch.ones(())


def drive_fused_tile(shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the fused token-tile path where it supports the shape."""
    from hymoe_kernels.kernels import fused_tile
    tokens, D, Fh, E, top_k = shape
    if not fused_tile.fused_tile_supported(D, Fh, E, D, top_k, dtype):
        return
    x, mask, weights, alpha_param, ramp = _layer_inputs(shape, dtype)
    _, _, _, saved = fused_tile.fused_tile_forward(x, mask, *weights, alpha_param, ramp, top_k)
    fused_tile.fused_tile_backward(saved, x, mask, weights, alpha_param, ramp, top_k,
                                   torch.randn_like(x), torch.randn(E))


def drive_hymoe_triton(shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the package's Triton layer function, if this checkout has it."""
    try:
        from hymoe_kernels.function import hymoe_triton
    except ImportError:
        return
    x, mask, weights, alpha_param, ramp = _layer_inputs(shape, dtype)
    leaves = [x.requires_grad_(), *[w.requires_grad_() for w in weights],
              alpha_param.requires_grad_()]
    y, prob_sum, _ = hymoe_triton(x, mask, *weights, alpha_param, ramp, shape[4])
    torch.autograd.grad([y, prob_sum], leaves, [torch.randn_like(y), torch.randn_like(prob_sum)],
                        allow_unused=True)


def drive_linear_cross_entropy(shape: tuple, dtype: torch.dtype) -> None:
    """Forward + backward of the fused linear cross-entropy kernels on (tokens, D) hidden
    states against 4F + 3 items, where the kernels take D in this dtype."""
    from hymoe_kernels.kernels import linear_cross_entropy as lce
    tokens, D, Fh, _, _ = shape
    if not lce.triton_supports(D, dtype):
        return
    n_items = 4 * Fh + 3
    hidden, weight = torch.randn(tokens, D, dtype=dtype), torch.randn(n_items, D, dtype=dtype)
    target = torch.randint(0, n_items, (tokens,))
    lse, _ = lce.triton_lce_forward(hidden, weight, target)
    lce.triton_lce_backward(hidden, weight, target, lse, torch.ones(()))


DRIVERS: dict[str, Callable[[tuple, torch.dtype], None]] = {
    "fused_tile": drive_fused_tile,
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
           "dtype": "/".join(sorted({context.split()[0] for context in contexts}))}
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
    launches, unlaunched = record_launches(subset)
    _WORK[:] = [(launch, contexts, kernels) for launch, contexts
                in sorted(launches.items(), key=lambda item: (item[0].kernel, item[0].label()))]
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_work_item, range(len(_WORK))))
    return {"triton": triton.__version__, "target": "cuda sm_90", "subset": subset,
            "kernels": sorted(kernels), "unlaunched": unlaunched, "rows": rows}


def markdown(report: dict) -> str:
    """The resource card as Markdown."""
    lines = [f"# sm_90 (H200) resource card -- Triton {report['triton']}, subset "
             f"`{report['subset']}`", "",
             "`python -m benchmarks.gpu.compile_card --subset full --markdown ...` compiles, "
             "for `GPUTarget('cuda', 90, 32)` without a GPU, every kernel specialization the "
             "package's host code launches at the driver shapes "
             f"(tokens x D x F, E=4: {', '.join(f'{s[0]}x{s[1]}x{s[2]}' for s in DRIVER_SHAPES)}). "
             "REG = registers per thread; STACK / LOCAL = stack frame / local memory bytes per "
             "thread; STL+LDL = local-memory stores+loads in the SASS (register spills); shared = Triton's dynamic shared memory per program (bytes); HGMMA = "
             "Hopper warpgroup MMA instructions in the SASS (0 is expected for kernels "
             "without dots, fp32 FMA dots and tiles of < 64 rows).", "",
             "| kernel | dtype | constexprs | warps | stages | REG | STACK | LOCAL | STL+LDL | "
             "shared | HGMMA | seen at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        seen = ", ".join(row["seen_at"][:3]) + (" ..." if len(row["seen_at"]) > 3 else "")
        head = (f"| {row['kernel']} | {row['dtype']} | {row['config']} | {row['num_warps']} | "
                f"{row['num_stages']} | ")
        if row["ok"]:
            lines.append(head + f"{row['registers']} | {row['stack']} | {row['local']} | "
                         f"{row['spill_accesses']} | {row['dynamic_shared']} | {row['hgmma']} | "
                         f"{seen} |")
        else:
            lines.append(head + f"FAILED: {row['error'][:300]!r} | | | | | | {seen} |")
    ok = [r for r in report["rows"] if r["ok"]]
    lines += ["", f"{len(report['rows'])} specializations of {len(report['kernels'])} kernels; "
              f"{len(report['rows']) - len(ok)} failed to compile; "
              f"{sum(1 for r in ok if r['spill_accesses'] or r['local'])} spill (STL/LDL "
              f"in the SASS); {sum(1 for r in ok if r['stack'])} reserve a stack frame; "
              f"{sum(1 for r in ok if r['dots_missing_wgmma'])} have 16-bit dots of >= "
              f"{WGMMA_MIN_ROWS} rows not on warpgroup MMA; "
              f"{sum(1 for r in ok if r['wgmma_dots'] and not r['hgmma'])} plan warpgroup MMA "
              "but have no HGMMA in the SASS."]
    if report["unlaunched"]:
        lines.append("Kernels no driver launched (not compiled): " + ", ".join(report["unlaunched"]))
    return "\n".join(lines) + "\n"


def run_card_subprocess(subset: str, timeout_s: float = 900) -> dict:
    """Run this module in a fresh interpreter without TRITON_INTERPRET; its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([repo_root] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu.compile_card",
                             "--subset", subset, "--json", "-"], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=timeout_s)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"compile card crashed (rc {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--json", help="write the report as JSON here ('-' = stdout only)")
    parser.add_argument("--markdown", help="write the Markdown card here")
    args = parser.parse_args(argv)
    report = card(args.subset)
    text = markdown(report)
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
    return 0 if all(row["ok"] for row in report["rows"]) and not report["unlaunched"] else 1


if __name__ == "__main__":
    sys.exit(main())
