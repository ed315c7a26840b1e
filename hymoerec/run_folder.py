"""A training run's folder: which files it holds (the names below are the constants every
reader uses), the checks made before anything is written to it, reading / writing its files,
and the commit and learning curves a run records.

    config.json   the settings that ran (rewritten on resume with the settings that changed)
    log.jsonl     one JSON record per finished epoch
    last.pt       the checkpoint to resume from (written after every epoch)
    best.pt       the model of the best validation epoch
    summary.json  final metrics (valid JSON: NaN is written as null)
    curves.png    learning curves (when matplotlib is installed)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np

from .checkpoint import save_checkpoint
from .data import check_writable

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
RUN_FILES = (CONFIG_FILE, LOG_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, SUMMARY_FILE, CURVES_FILE)


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message names it."""


def prepare_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check ``run_dir`` before a run writes to it, and make it.

    A resumed run needs its LAST_CHECKPOINT. A new run takes a missing or empty folder; a folder
    with files is refused (an earlier run, or a folder of the user's) unless ``overwrite``,
    which removes the earlier run's files (RUN_FILES) and leaves any others. Raises
    RunFolderError, or NotWritableError if the folder cannot be written."""
    last = run_dir / LAST_CHECKPOINT
    if resume:
        if not last.is_file():
            raise RunFolderError(f"--resume: {run_dir} holds no run to continue (no "
                                 f"{LAST_CHECKPOINT})")
    elif run_dir.exists():
        if not run_dir.is_dir():
            raise RunFolderError(f"run folder {run_dir} is a file, not a folder")
        if any(run_dir.iterdir()) and not overwrite:
            held = ("a run; pass --resume to continue it," if last.is_file()
                    else f"files but no run of ours (no {LAST_CHECKPOINT});")
            raise RunFolderError(f"run folder {run_dir} already holds {held} choose another "
                                 f"--run-dir, or pass --overwrite to replace its run files")
        for name in RUN_FILES if overwrite else ():
            (run_dir / name).unlink(missing_ok=True)
    check_writable(run_dir, "run folder")


def read_log(path: Path) -> list[dict]:
    """The epoch records of a run's LOG_FILE (none if it is missing). A last line cut short
    (a run killed while writing it) is dropped; any other line that is not a JSON record
    with an ``epoch`` raises RunFolderError naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines) and not path.read_bytes().endswith(b"\n"):
                break  # killed while writing its last record
            raise RunFolderError(f"{path}, line {line_no}: not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFolderError(f"{path}, line {line_no}: not an epoch record of a HyMoERec "
                                 f"run (no 'epoch')")
        records.append(record)
    return records


def json_text(value) -> str:
    """Indented JSON of ``value`` with NaN and infinities written as null, so the text is
    valid JSON for every reader."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(item) for k, item in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(item) for item in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, value) -> None:
    """Write :func:`json_text` of ``value`` to ``path`` through a temp file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_text(value), encoding="utf-8")
    os.replace(tmp, path)


class RunFolder:
    """A training run's folder ``path`` and its files. Only the process that writes the run
    (``writes``: the single process, or rank 0 of a multi-process run) changes them; on the
    other processes every write is skipped."""

    def __init__(self, path: Path, writes: bool = True):
        self.path, self.writes = Path(path), writes
        self.config_path, self.log_path = self.path / CONFIG_FILE, self.path / LOG_FILE
        self.last_path, self.best_path = self.path / LAST_CHECKPOINT, self.path / BEST_CHECKPOINT
        self.summary_path, self.curves_path = self.path / SUMMARY_FILE, self.path / CURVES_FILE

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """:func:`prepare_run_folder` of this folder."""
        if self.writes:
            prepare_run_folder(self.path, resume, overwrite)

    def write_config(self, config: dict) -> None:
        if self.writes:
            write_json(self.config_path, config)

    def log(self) -> list[dict]:
        """The epoch records written so far (:func:`read_log`)."""
        return read_log(self.log_path)

    def append_log(self, record: dict) -> None:
        """Add one finished epoch's record to the log."""
        if self.writes:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def keep_log_through(self, epoch: int) -> None:
        """Drop the records of epochs after ``epoch`` (those a resumed checkpoint lacks)."""
        if self.writes:
            records = [r for r in self.log() if r["epoch"] <= epoch]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in records),
                                     encoding="utf-8")

    def save_best(self, state: dict) -> None:
        if self.writes:
            save_checkpoint(state, self.best_path)

    def save_last(self, state: dict) -> None:
        if self.writes:
            save_checkpoint(state, self.last_path)

    def write_summary(self, summary: dict) -> None:
        """The summary and, when matplotlib is installed, the learning curves."""
        if self.writes:
            write_json(self.summary_path, summary)
            plot_run(self.log_path, self.curves_path)


def git_commit() -> str | None:
    """HEAD of the repository holding this file, with '-dirty' if it has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hymoerec", "hymoe_kernels"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty.strip() else "")


def plot_run(log_path: Path, png_path: Path) -> bool:
    """Learning curves and expert load per epoch as a PNG, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_log(log_path)
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["loss"] for r in records], label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for key in ("HR@10", "NDCG@10"):
        axes[1].plot(epochs, [r["valid"][key] for r in records], label=f"valid {key}")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    if records and records[0]["expert_load"]:
        loads = np.array([r["expert_load"] for r in records])        # (epochs, layers, E)
        for layer in range(loads.shape[1]):
            for expert in range(loads.shape[2]):
                axes[2].plot(epochs, loads[:, layer, expert], label=f"layer {layer} expert {expert}")
        axes[2].set_ylabel("fraction of routed slots")
        axes[2].legend(fontsize="small")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
