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

