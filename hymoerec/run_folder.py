"""A training run's folder: which files it holds (the names below are the constants every
reader uses), the checks made before anything is written to it, reading / writing its files,
and the commit and learning curves a run records.

    config.json   the settings that ran (rewritten on resume with the settings that changed)
    log.jsonl     one JSON record per finished epoch
    last.pt       the checkpoint to resume from (written after every epoch)
    best.pt       the model of the best validation epoch
    summary.json  final metrics (valid JSON: NaN is written as null)
    curves.png    learning curves (when matplotlib is installed)
    run.lock      the OS lock (flock) that the training process holds for the life of the run
    run.pid       the process id of that process, while it holds the lock

Every file here is written whole or not at all (:mod:`hymoerec.atomic_write`), so a crash
never leaves half a file.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from .atomic_write import write_text_atomically
from .checkpoint import save_checkpoint
from .data import check_writable

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
RUN_FILES = (CONFIG_FILE, LOG_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, SUMMARY_FILE, CURVES_FILE)
LOCK_FILE, HOLDER_FILE = "run.lock", "run.pid"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message names it."""


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool,
                     init_from: str | os.PathLike | None = None, locked: bool = False) -> None:
    """Raise RunFolderError unless a run may start in ``run_dir`` as asked, or
    NotWritableError if the folder cannot be written (it is made for that check; nothing
    else is written or removed here).

    Unless this process holds the folder's lock (``locked``), a folder that another
    process has locked is refused first, naming that process. A resumed run needs its
    LAST_CHECKPOINT, and cannot also be an ``overwrite``. A new run takes a missing or empty
    folder (the lock files of an earlier run do not count); a folder with files is refused
    (an earlier run, or a folder of the user's) unless ``overwrite``, which may not replace
    the run that ``init_from`` (a run folder or a checkpoint in one) starts from."""
    if resume and overwrite:
        raise RunFolderError(f"--resume continues the run in {run_dir} and --overwrite "
                             f"replaces it: pass one of them")
    if not locked and (run_dir / LOCK_FILE).is_file():
        RunFolderLock(run_dir).check_free()
    last = run_dir / LAST_CHECKPOINT
    if resume and not last.is_file():
        raise RunFolderError(f"--resume: {run_dir} holds no run to continue (no "
                             f"{LAST_CHECKPOINT})")
    if not resume and run_dir.exists():
        if not run_dir.is_dir():
            raise RunFolderError(f"run folder {run_dir} is a file, not a folder")
        if overwrite and init_from is not None:
            source = Path(init_from).resolve()
            if run_dir.resolve() == (source if source.is_dir() else source.parent):
                raise RunFolderError(f"--overwrite would remove the run in {run_dir} that "
                                     f"--init-from {init_from} starts from; choose another "
                                     f"--run-dir")
        held_files = [p for p in run_dir.iterdir() if p.name not in (LOCK_FILE, HOLDER_FILE)]
        if held_files and not overwrite:
            held = ("a run; pass --resume to continue it," if last.is_file()
                    else f"files but no run of ours (no {LAST_CHECKPOINT});")
            raise RunFolderError(f"run folder {run_dir} already holds {held} choose another "
                                 f"--run-dir, or pass --overwrite to replace its run files")
    check_writable(run_dir, "run folder")


class RunFolderLock:
    """An exclusive OS lock (flock, through ``filelock``) on a run folder, held by the one
    process that trains in it: the folder's LOCK_FILE, with the holder's pid in its
    HOLDER_FILE. The operating system releases it when the process ends, however it ends
    (a SIGKILL too)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock = FileLock(run_dir / LOCK_FILE)

    def acquire(self) -> "RunFolderLock":
        """Make the folder and take its lock at once, or raise RunFolderError naming the
        folder and the pid of the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.take()
        write_text_atomically(self.run_dir / HOLDER_FILE, f"{os.getpid()}\n")
        return self

    def check_free(self) -> None:
        """Raise RunFolderError (as :meth:`acquire`) if another process holds the lock;
        else take it and give it back at once."""
        self.take()
        self.lock.release()

    def take(self) -> None:
        """Take the lock without waiting, or raise RunFolderError naming the holder."""
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderError(f"run folder {self.run_dir} is in use by "
                                 f"{self.holder()}: wait for that run to end, or choose "
                                 f"another --run-dir") from None

    def holder(self) -> str:
        """'process <pid>' of the holder, as it wrote itself in HOLDER_FILE."""
        try:
            pid = (self.run_dir / HOLDER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process (its pid is not yet written)"

    def release(self) -> None:
        """Give the lock back (removing HOLDER_FILE first); a no-op when not held."""
        if self.lock.is_locked:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
            self.lock.release()


def prepare_run_folder(run_dir: Path, resume: bool, overwrite: bool,
                       init_from: str | os.PathLike | None = None) -> RunFolderLock:
    """Check ``run_dir`` (:func:`check_run_folder`), make it and take its lock, check it
    again under the lock (another process may have started a run there meanwhile), and with
    ``overwrite`` remove the earlier run's files (RUN_FILES; any others stay). Returns the
    held :class:`RunFolderLock`, to release when the run ends. Raises RunFolderError, or
    NotWritableError if the folder cannot be written. A refused run writes nothing, except
    the lock file when another process started a run in the folder meanwhile."""
    check_run_folder(run_dir, resume, overwrite, init_from)
    lock = RunFolderLock(run_dir).acquire()
    try:
        check_run_folder(run_dir, resume, overwrite, init_from, locked=True)
    except BaseException:
        lock.release()
        raise
    for name in RUN_FILES if overwrite else ():
        (run_dir / name).unlink(missing_ok=True)
    return lock


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the BEST_CHECKPOINT of a run folder."""
    path = Path(path)
    return path / BEST_CHECKPOINT if path.is_dir() else path


def check_output_path(path: str | os.PathLike, flag: str,
                      inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``path`` as an output file of a command, or RunFolderError naming ``flag`` when
    writing it would replace a run's own file (a file of RUN_FILES or the lock files in a
    folder holding a run) or one of the command's ``inputs`` (e.g. the checkpoint it
    reads)."""
    path = Path(path)
    target = path.resolve()
    folder = target.parent
    holds_run = any((folder / name).is_file()
                    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT, CONFIG_FILE))
    if holds_run and target.name in (*RUN_FILES, LOCK_FILE, HOLDER_FILE):
        raise RunFolderError(f"{flag} {path} would replace a file of the run in {folder}; "
                             f"write it elsewhere")
    for source in inputs:
        if Path(source).resolve() == target:
            raise RunFolderError(f"{flag} {path} would replace {source}, which this command "
                                 f"reads; write it elsewhere")
    return path


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


def write_json(path: str | os.PathLike, value) -> None:
    """Write :func:`json_text` of ``value`` to ``path`` atomically."""
    write_text_atomically(path, json_text(value))


class RunFolder:
    """A training run's folder ``path`` and its files. Only the process that writes the run
    (``writes``: the single process, or rank 0 of a multi-process run) changes them; on the
    other processes every write is skipped. The writing process holds the folder's
    :class:`RunFolderLock` from :meth:`prepare` until :meth:`close`."""

    def __init__(self, path: Path, writes: bool = True):
        self.path, self.writes = Path(path), writes
        self.config_path, self.log_path = self.path / CONFIG_FILE, self.path / LOG_FILE
        self.last_path, self.best_path = self.path / LAST_CHECKPOINT, self.path / BEST_CHECKPOINT
        self.summary_path, self.curves_path = self.path / SUMMARY_FILE, self.path / CURVES_FILE
        self.lock: RunFolderLock | None = None

    def check(self, resume: bool, overwrite: bool,
              init_from: str | os.PathLike | None = None) -> None:
        """:func:`check_run_folder` of this folder, before the run reads anything."""
        if self.writes:
            check_run_folder(self.path, resume, overwrite, init_from)

    def prepare(self, resume: bool, overwrite: bool,
                init_from: str | os.PathLike | None = None) -> None:
        """:func:`prepare_run_folder` of this folder, keeping its lock until :meth:`close`;
        call it once everything the run reads (the ``init_from`` run too) has been read."""
        if self.writes:
            self.lock = prepare_run_folder(self.path, resume, overwrite, init_from)

    def close(self) -> None:
        """Release the folder's lock (a no-op when not held)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
            write_text_atomically(self.log_path, "".join(json.dumps(r) + "\n" for r in records))

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
