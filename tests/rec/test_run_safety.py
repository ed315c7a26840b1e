"""Nothing a user does loses a trained run: one process at a time in a run folder, no
--overwrite of the run --init-from reads, no output over a run's own files, whole-or-nothing
writes; and the smaller refusals of contradictory or meaningless requests."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hymoerec import evaluate, train
from hymoerec.run_folder import replaced_atomically, write_json
from test_cli_errors import user_error
from train_cases import TINY, keep_thread_count, run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------- --init-from and --overwrite

@pytest.mark.parametrize("source", ["folder", "checkpoint", "symlink"])
def test_overwrite_of_the_run_init_from_starts_from_is_refused(tmp_path, source, capsys):
    run(tmp_path, "a", "--epochs", "1", "--ffn", "dense")
    before = folder_bytes(tmp_path / "a")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    init_from = {"folder": tmp_path / "a", "checkpoint": tmp_path / "a" / "best.pt",
                 "symlink": tmp_path / "link"}[source]
    err = user_error(train.main, TINY + ["--init-from", str(init_from), "--run-dir",
                                         str(tmp_path / "a"), "--overwrite", "--epochs", "1"],
                     capsys)
    assert "--overwrite would remove the run" in err and "--init-from" in err
    assert folder_bytes(tmp_path / "a") == before


def test_init_from_is_read_before_an_overwrite_clears_the_run_folder(tmp_path, capsys):
    run(tmp_path, "dense", "--epochs", "1", "--ffn", "dense")
    run(tmp_path, "b", "--epochs", "1")
    before = folder_bytes(tmp_path / "b")
    err = user_error(train.main, TINY + ["--init-from", str(tmp_path / "dense"), "--model",
                                         "gru4rec", "--run-dir", str(tmp_path / "b"),
                                         "--overwrite", "--epochs", "1"], capsys)
    assert "is a sasrec model" in err and folder_bytes(tmp_path / "b") == before
    summary = train.main(TINY + ["--init-from", str(tmp_path / "dense"), "--run-dir",
                                 str(tmp_path / "b"), "--overwrite", "--epochs", "1"])
    assert summary["started_from"]["run"] == str(tmp_path / "dense" / "best.pt")
    assert [json.loads(line)["epoch"] for line in (tmp_path / "b" / "log.jsonl").open()] == [1]


# -------------------------------------------------------------------------- output paths

def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with replaced_atomically(path) as tmp:
            tmp.write_text('{"new": ')
            raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]

