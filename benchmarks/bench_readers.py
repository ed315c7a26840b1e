"""Readers at scale: the columnar readers of :mod:`hymoerec.readers` against the line-by-line
reference readers, side by side in one run, on synthetic interaction files.

Each measurement is one fresh process that reads a file, splits it leave-one-out and cuts
its training windows (``--max-len``, default 50), as a training run starts, with one
thread (``OMP_NUM_THREADS=1``, arrow's CPU and I/O pools at 1). It reports wall and CPU
seconds of each stage, the peak resident memory above the process's baseline (the
resident set after importing numpy, torch, pyarrow and the readers, with the kernel's peak
counter reset there: ``/proc/self/clear_refs``), bytes per interaction, and a SHA-256
digest of the result (items, lengths, item and user ids), so that the engines are shown to
give the same data. Engines:

* ``columnar``: :func:`hymoerec.data.read_file`;
* ``reference``: :func:`hymoerec.data.reference_reader` of the format (none for parquet and
  jsonl), with the same split and windows;
* ``before``: the reader, split and windows of ``hymoerec/data.py`` at commit
  ``BEFORE_COMMIT`` (per-user lists of Python objects), loaded from git, when git has it.

The files: ``n`` interactions of ``n // 25`` users over ``n // 20`` items (the issue's 10M
file: 400k users, 500k items), Zipf-like item popularity, user lengths 2 + multinomial,
integer ids (as in Beauty's and ML-1M's files) or Amazon-like string ids (``--string-ids``
rows), each user's interactions at increasing times, users interleaved in time for the
formats that carry one row per interaction.

    python -m benchmarks.bench_readers --out benchmarks/results        # 1M and 10M, ~10 min
    python -m benchmarks.bench_readers --tiny --out /tmp/x             # seconds (the test)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.process_memory import reset_peak, status_bytes

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "cb067a8"       # hymoerec/data.py as it was before the columnar readers
TARGET_TIME_RATIO = 0.2          # the targets for 10M interactions
TARGET_BYTES_PER_INTERACTION = 30.0
# (format, id kind, engines) measured at each size; the reference of the heavy formats
# only at the smaller sizes (it holds every row as Python objects)
PLAN_SMALL = [(fmt, "int", ("columnar", "reference", "before")) for fmt in
              ("sequences", "pairs", "csv", "ml-1m", "amazon")] + [
    ("sequences", "str", ("columnar", "reference")), ("sequences.gz", "int", ("columnar", "reference")),
    ("jsonl", "str", ("columnar",)), ("parquet", "str", ("columnar",))]
PLAN_TINY = [("sequences", "int", ("columnar", "reference", "before"))] + [
    (fmt, kind, ("columnar",)) for fmt, kind in
    (("pairs", "int"), ("csv", "int"), ("ml-1m", "int"), ("amazon", "int"), ("sequences.gz", "int"),
     ("sequences", "str"), ("jsonl", "str"), ("parquet", "str"))]
PLAN_LARGE = [("sequences", "int", ("columnar", "reference", "before")),
              ("sequences", "str", ("columnar", "reference")),
              ("sequences.gz", "int", ("columnar",))] + [
    (fmt, kind, ("columnar",)) for fmt, kind in
    (("pairs", "int"), ("csv", "int"), ("ml-1m", "int"), ("amazon", "int"), ("jsonl", "str"),
     ("parquet", "str"))]


# ------------------------------------------------------------------------------ files

def interactions(n: int, seed: int = 0, string_ids: bool = False):
    """(user id per row, item id per row, time per row) of n interactions in time order,
    as lists of str / str / int, and the per-user lengths (users in order of first
    appearance)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 25, 2), max(n // 20, 2)
    lengths = rng.multinomial(n - 2 * n_users, np.ones(n_users) / n_users) + 2
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n, p=weights / weights.sum())
    owner = np.repeat(np.arange(n_users), lengths)
    # user u starts at time u and steps by 1..n_users, so users interleave in time
    steps = rng.integers(1, n_users + 1, size=n)
    starts = np.cumsum(lengths) - lengths
    steps[starts] = np.arange(n_users)
    running = np.cumsum(steps)
    times = running - np.repeat(running[starts] - steps[starts], lengths)
    if string_ids:
        user_ids = np.array([f"A{u * 7919 % 10**13:013d}" for u in range(n_users)])
        item_ids = np.array([f"B{i * 104729 % 10**9:09X}" for i in range(n_items)])
    else:
        user_ids = np.arange(1, n_users + 1).astype(str)
        item_ids = np.arange(1, n_items + 1).astype(str)
    return user_ids[owner], item_ids[items], times, lengths


def write_files(folder: Path, n: int, kind: str, formats: set[str]) -> dict[str, Path]:
    """The formats' files of one synthetic data set (see :func:`interactions`)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    users, items, times, lengths = interactions(n, string_ids=kind == "str")
    by_time = np.argsort(times, kind="stable")
    paths = {}
    stem = folder / f"{n}-{kind}"
    if formats & {"sequences", "sequences.gz"}:
        bounds = np.cumsum(lengths)
        paths["sequences"] = Path(f"{stem}.sequences.txt")
        with open(paths["sequences"], "w") as f:
            start = 0
            for end in bounds.tolist():
                f.write(users[start] + " " + " ".join(items[start:end].tolist()) + "\n")
                start = end
        if "sequences.gz" in formats:
            paths["sequences.gz"] = Path(f"{stem}.sequences.txt.gz")
            with open(paths["sequences"], "rb") as src, gzip.open(paths["sequences.gz"], "wb", 6) as dst:
                shutil.copyfileobj(src, dst)
    u, i, t = users[by_time], items[by_time], times[by_time]
    if "pairs" in formats:
        paths["pairs"] = Path(f"{stem}.pairs.txt")
        with open(paths["pairs"], "w") as f:
            f.writelines(f"{a} {b}\n" for a, b in zip(u.tolist(), i.tolist()))
    table = pa.table({"user": u, "item": i, "timestamp": t})
    if "csv" in formats:
        paths["csv"] = Path(f"{stem}.csv")
        pacsv.write_csv(table, paths["csv"], pacsv.WriteOptions(quoting_style="none"))
    if "amazon" in formats:
        paths["amazon"] = Path(f"{stem}.amazon.csv")
        ratings = pa.table({"user": u, "item": i, "rating": np.full(len(u), 5.0), "timestamp": t})
        pacsv.write_csv(ratings, paths["amazon"], pacsv.WriteOptions(include_header=False,
                                                                     quoting_style="none"))
    if "ml-1m" in formats:
        paths["ml-1m"] = Path(f"{stem}.ratings.dat")
        with open(paths["ml-1m"], "w") as f:
            f.writelines(f"{a}::{b}::5::{c}\n" for a, b, c in zip(u.tolist(), i.tolist(), t.tolist()))
    if "jsonl" in formats:
        paths["jsonl"] = Path(f"{stem}.jsonl")
        with open(paths["jsonl"], "w") as f:
            f.writelines(json.dumps({"rating": 5.0, "user": a, "item": b, "timestamp": c,
                                     "text": "fine"}) + "\n"
                         for a, b, c in zip(u.tolist(), i.tolist(), t.tolist()))
    if "parquet" in formats:
        paths["parquet"] = Path(f"{stem}.parquet")
        pq.write_table(table, paths["parquet"], row_group_size=1 << 20)
    return paths


# ------------------------------------------------------------------------ measurement

def _load_before():
    """hymoerec/data.py at BEFORE_COMMIT as a module, or None without git."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:hymoerec/data.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "data_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_before"] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(engine: str, fmt: str, path: str, max_len: int) -> dict:
    """One measurement in this process (see the module docstring); call in a fresh one."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (imported before the baseline, as read_file does)
    import pyarrow.csv  # noqa: F401
    import pyarrow.json  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from hymoerec import data as D
    from hymoerec import readers  # noqa: F401

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    real_fmt = fmt.removesuffix(".gz")
    if engine == "before":
        module = _load_before()
        if module is None:
            return {"skipped": "git does not have the commit"}
        read = lambda: module.read_file(path, real_fmt)  # noqa: E731
        split, windows = module.leave_one_out, module.training_windows
    else:
        read = ((lambda: D.read_file(path, real_fmt)) if engine == "columnar"
                else (lambda: D.reference_reader(real_fmt)(path)))
        split, windows = D.leave_one_out, D.training_windows
    reset_peak()                                        # peak counter from here on
    baseline = status_bytes("VmRSS")
    stages = {}
    wall, cpu = time.perf_counter(), time.process_time()
    data = read()
    stages["read"] = (time.perf_counter() - wall, time.process_time() - cpu)
    mark = (time.perf_counter(), time.process_time())
    result = split(data)
    cut = windows(result.train, max_len)
    stages["split+windows"] = (time.perf_counter() - mark[0], time.process_time() - mark[1])
    total = (time.perf_counter() - wall, time.process_time() - cpu)
    peak = status_bytes("VmHWM") - baseline
    n = sum(len(s) for s in data.sequences)
    digest = hashlib.sha256()
    for seq in data.sequences:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    digest.update("\n".join(data.item_ids).encode() + b"#" + "\n".join(data.user_ids).encode())
    return {"engine": engine, "format": fmt, "interactions": n, "users": len(data.user_ids),
            "items": len(data.item_ids) - 1, "windows": len(cut),
            "seconds": {k: round(v[0], 3) for k, v in stages.items()} | {"total": round(total[0], 3)},
            "cpu_seconds": {k: round(v[1], 3) for k, v in stages.items()} | {"total": round(total[1], 3)},
            "peak_above_baseline_bytes": peak, "bytes_per_interaction": round(peak / n, 2),
            "digest": digest.hexdigest()[:16]}


def run_one(engine: str, fmt: str, path: Path, max_len: int, timeout: float) -> dict:
    """:func:`measure` in a fresh process with one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    code = ("import json, sys; from benchmarks.bench_readers import measure; "
            "print(json.dumps(measure(*sys.argv[1:4], int(sys.argv[4]))))")
    try:
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, engine, fmt, str(path),
                               str(max_len)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "format": fmt, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"engine": engine, "format": fmt, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# Readers: columnar vs reference ({report['machine']['when']})", "",
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores (shared), python "
             f"{report['machine']['python']}, pyarrow {report['machine']['pyarrow']}, numpy "
             f"{report['machine']['numpy']}; one thread; read + leave-one-out split + "
             f"training windows (max_len {report['max_len']}), one fresh process each, run once. "
             f"Peak: resident memory above the process's baseline after imports. 'before': "
             f"hymoerec/data.py at {BEFORE_COMMIT}. Ratios are to the reference (and to "
             f"'before') measured in the same run, as wall / CPU seconds (the machine is "
             f"shared: CPU seconds are the steadier measure).", "",
             "| interactions | format | ids | engine | read s | split+windows s | total s | "
             "CPU s | peak MiB | bytes / interaction | time / reference (wall, CPU) | "
             "time / before (wall, CPU) | same result |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['n']:,} | {row['format']} | {row['ids']} | {row['engine']} | "
                         f"{row.get('error') or row.get('skipped')} |||||||||")
            continue
        ratios = [_ratio_text(row, other) for other in ("reference", "before")]
        lines.append(
            f"| {row['interactions']:,} | {row['format']} | {row['ids']} | {row['engine']} | "
            f"{row['seconds']['read']:.2f} | {row['seconds']['split+windows']:.3f} | "
            f"{row['seconds']['total']:.2f} | {row['cpu_seconds']['total']:.2f} | "
            f"{row['peak_above_baseline_bytes'] / 2**20:.0f} | {row['bytes_per_interaction']:.1f} | "
            f"{ratios[0]} | {ratios[1]} | {row.get('same', '')} |")
    lines += ["", "Targets (10M interactions, `sequences`, read + split + windows): time at most "
              f"{TARGET_TIME_RATIO} of the reference's, at most {TARGET_BYTES_PER_INTERACTION:.0f} "
              "bytes per interaction above the baseline.", ""]
    for verdict in report["targets"]:
        lines.append(f"- {verdict}")
    return "\n".join(lines) + "\n"


def _ratio_text(row: dict, other: str) -> str:
    """"wall, CPU" ratios of a columnar row to the ``other`` engine, or "" if not measured."""
    wall, cpu = row.get(f"vs_{other}"), row.get(f"vs_{other}_cpu")
    return "" if wall is None else f"{wall:.3f}, {cpu:.3f}"


def targets(rows: list[dict]) -> list[str]:
    """The verdicts on the issue's targets, from the largest sequences rows of each id
    kind: the time ratio is met when both the wall and the CPU ratio are."""
    out = []
    for kind in ("int", "str"):
        mine = [r for r in rows if r.get("format") == "sequences" and r["ids"] == kind
                and r["engine"] == "columnar" and "seconds" in r]
        if not mine:
            continue
        row = max(mine, key=lambda r: r["interactions"])
        ratio, cpu, per = row.get("vs_reference"), row.get("vs_reference_cpu"), row["bytes_per_interaction"]
        time_ok = ("met" if ratio is not None and max(ratio, cpu) <= TARGET_TIME_RATIO
                   else "missed")
        mem_ok = "met" if per <= TARGET_BYTES_PER_INTERACTION else "missed"
        out.append(f"{row['interactions']:,} interactions, {kind} ids: time "
                   f"{'n/a' if ratio is None else f'{ratio:.3f} (wall), {cpu:.3f} (CPU)'} of "
                   f"the reference's ({time_ok}); "
                   f"{per:.1f} bytes per interaction ({mem_ok})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for cpu_readers.json / .md")
    parser.add_argument("--sizes", default="1000000,10000000",
                        help="interactions per file, comma separated (the largest uses the "
                             "large plan, the others the small one)")
    parser.add_argument("--tiny", action="store_true",
                        help="2,000 interactions: every format, the reference on one")
    parser.add_argument("--formats", help="only these formats of the plan, comma separated "
                                           "(e.g. sequences,parquet)")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--work", help="folder for the data files (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        sizes = [2000] if args.tiny else sorted(int(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected interaction counts separated by commas")
    if min(sizes) < 100:
        parser.error(f"--sizes {args.sizes!r}: every size must be at least 100 interactions")
    known = {fmt for plan in (PLAN_SMALL, PLAN_LARGE, PLAN_TINY) for fmt, _, _ in plan}
    unknown = set(args.formats.split(",")) - known if args.formats else set()
    if unknown:
        parser.error(f"--formats: unknown {sorted(unknown)}, expected some of {sorted(known)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_readers-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import pyarrow

    report = {"machine": {"when": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or
                          platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "pyarrow": pyarrow.__version__,
                          "numpy": np.__version__},
              "max_len": args.max_len, "rows": rows, "targets": []}
    try:
        with open("/proc/cpuinfo") as f:
            report["machine"]["cpu"] = next(l.split(":", 1)[1].strip() for l in f
                                            if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for n in sizes:
        plan = (PLAN_TINY if args.tiny else PLAN_LARGE if n == sizes[-1] and len(sizes) > 1
                else PLAN_SMALL)
        if args.formats:
            plan = [entry for entry in plan if entry[0] in args.formats.split(",")]
        for kind in ("int", "str"):
            wanted = {fmt for fmt, k, _ in plan if k == kind}
            if not wanted:
                continue
            print(f"writing {n:,} interactions ({kind} ids): {sorted(wanted)}", flush=True)
            paths = write_files(work, n, kind, wanted)
            first = None      # the data set's first columnar result: every format but
            for fmt, k, engines in plan:   # amazon (k-core filtered) reads the same data
                if k != kind:
                    continue
                results = {}
                for engine in engines:
                    row = run_one(engine, fmt, paths[fmt], args.max_len, args.timeout)
                    row.update(n=n, ids=kind, engine=engine, format=fmt)
                    results[engine] = row
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                base = results["columnar"]
                if fmt != "amazon" and "digest" in base:
                    first = first or (fmt, base["digest"])
                    if first[0] != fmt:
                        base["same"] = f"{'=' if base['digest'] == first[1] else '≠'} {first[0]} "
                for other, key in (("reference", "vs_reference"), ("before", "vs_before")):
                    if other in results and "seconds" in results[other] and "seconds" in base:
                        for unit, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
                            base[key + suffix] = round(base[unit]["total"]
                                                       / max(results[other][unit]["total"], 1e-9), 4)
                        same = results[other]["digest"] == base["digest"]
                        base["same"] = base.get("same", "") + f"{'=' if same else '≠'} {other} "
                base["same"] = base.get("same", "").strip()
            for path in paths.values():
                path.unlink()
            report["targets"] = targets(rows)
            (out / "cpu_readers.json").write_text(json.dumps(report, indent=1) + "\n")
            (out / "cpu_readers.md").write_text(markdown(report))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
