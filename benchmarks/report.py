"""Markdown tables from a pytest-benchmark JSON file.

    pytest benchmarks/ --benchmark-json=run.json
    python -m benchmarks.report run.json [-o table.md]

One table per benchmark group: for each variant its median time, the ratio to the
group's ``dense`` variant (the dense-FFN floor), the ratios to the reference variants
interleaved with its own rounds when recorded (robust to load drifting between tests), its
throughput when the benchmark recorded how many sequences one call processes, and its
peak memory (and ratio) when recorded. A header names the machine, torch and thread count the run used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = "dense"


def _variant(bench: dict) -> str:
    return bench.get("extra_info", {}).get("variant") or bench["name"]


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def machine_line(data: dict) -> str:
    """One line describing where the run happened."""
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    cpu_name = cpu.get("brand_raw") or info.get("processor") or info.get("machine", "?")
    cores = cpu.get("count")
    extra = next((b.get("extra_info", {}) for b in data.get("benchmarks", [])), {})
    parts = [f"CPU: {cpu_name}" + (f" ({cores} logical cores)" if cores else ""),
             f"Python {info.get('python_version', '?')}"]
    if "torch" in extra:
        parts.append(f"torch {extra['torch']}")
    if "threads" in extra:
        parts.append(f"{extra['threads']} torch thread{'s' if extra['threads'] != 1 else ''}")
    timer = next((b.get("options", {}).get("timer") for b in data.get("benchmarks", [])), None)
    if timer:
        parts.append(f"timer {timer}" + (" (CPU time)" if "process_time" in timer else ""))
    if data.get("datetime"):
        parts.append(f"run {data['datetime'][:16].replace('T', ' ')} UTC")
    commit = data.get("commit_info", {}).get("id")
    if commit:
        parts.append(f"commit {commit[:8]}")
    if "gpu" in extra:
        parts.append(f"GPU: {extra['gpu']}")
    return ", ".join(parts)


def group_table(name: str, benches: list[dict]) -> str:
    """A Markdown table of one group's benchmarks, fastest first."""
    benches = sorted(benches, key=lambda b: b["stats"]["median"])
    base = next((b for b in benches if _variant(b) == BASELINE), None)
    has_mem = any("peak_mem_bytes" in b.get("extra_info", {}) for b in benches)
    has_rate = any("sequences" in b.get("extra_info", {}) for b in benches)
    references = list(dict.fromkeys(            # reference variants, in order of first use
        ref for b in benches for ref in b.get("extra_info", {}).get("reference_median_s", {})))
    header = ["variant", "median (ms)", f"x {BASELINE}"]
    header += [f"x {ref}, same rounds" for ref in references]
    if has_rate:
        header.append("sequences/s")
    if has_mem:
        header += ["peak mem (MiB)", f"mem x {BASELINE}"]
    lines = [f"#### {name}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for bench in benches:
        median, extra = bench["stats"]["median"], bench.get("extra_info", {})
        row = [_variant(bench), f"{median * 1e3:.2f}",
               f"{median / base['stats']['median']:.2f}" if base else "-"]
        for ref in references:
            paired = extra.get("reference_median_s", {}).get(ref)
            row.append("1.00" if _variant(bench) == ref else
                       f"{median / paired:.2f}" if paired else "-")
        if has_rate:
            row.append(f"{extra['sequences'] / median:,.0f}" if "sequences" in extra else "-")
        if has_mem:
            mem = extra.get("peak_mem_bytes")
            base_mem = base.get("extra_info", {}).get("peak_mem_bytes") if base else None
            row.append(_mib(mem) if mem is not None else "-")
            row.append(f"{mem / base_mem:.2f}" if mem is not None and base_mem else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(data: dict) -> str:
    """The whole report: machine line, then one table per group in file order."""
    groups: dict[str, list[dict]] = {}
    for bench in data.get("benchmarks", []):
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    if not groups:
        raise ValueError("the JSON file holds no benchmarks (was it written with "
                         "--benchmark-disable?)")
    parts = [f"Machine: {machine_line(data)}. Medians of {min_rounds(data)}+ rounds; "
             f"'x {BASELINE}' is the ratio to the dense FFN in the same table; "
             f"'x V, same rounds' divides by the median of calls of variant V run before "
             f"each round of that benchmark (the same machine load)."]
    parts += [group_table(name, benches) for name, benches in groups.items()]
    return "\n\n".join(parts) + "\n"


def min_rounds(data: dict) -> int:
    return min(b["stats"]["rounds"] for b in data["benchmarks"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json_file", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--output", type=Path, help="write the Markdown here (default stdout)")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"cannot read json_file {args.json_file}: {err}")
    if not isinstance(data, dict) or "benchmarks" not in data:
        parser.error(f"json_file {args.json_file} is not a pytest-benchmark JSON file")
    text = render(data)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
