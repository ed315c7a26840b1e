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

from experiments import reproduce
from hymoerec import evaluate, train
from hymoerec.checkpoint import load_checkpoint
from hymoerec.atomic_write import replaced_atomically
from hymoerec.run_folder import (HOLDER_FILE, LOCK_FILE, RunFolderError, RunFolderLock,
                                 check_run_folder, write_json)
from test_cli_errors import user_error
from train_cases import TINY, keep_thread_count, run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def train_process(run_dir: Path, *extra, **popen) -> subprocess.Popen:
    """``python hymoerec/train.py`` on the tiny synthetic data into ``run_dir``, started."""
    return subprocess.Popen([sys.executable, "hymoerec/train.py", *TINY, "--run-dir",
                             str(run_dir), *extra], cwd=REPO, text=True, **popen)


def wait_for_first_epoch(run_dir: Path, process: subprocess.Popen) -> None:
    """Wait until ``process`` has locked ``run_dir`` (its pid in the holder file) and saved
    its first epoch's last.pt."""
    holder = run_dir / HOLDER_FILE
    while not ((run_dir / "last.pt").is_file() and holder.is_file()
               and holder.read_text().strip() == str(process.pid)):
        assert process.poll() is None, f"the first run ended ({process.returncode}) first"
        time.sleep(0.05)


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


def test_overwrite_of_the_folder_above_the_init_from_run_is_not_refused(tmp_path):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "best.pt").write_bytes(b"")
    check_run_folder(tmp_path / "runs", False, True, tmp_path / "runs" / "a")
    with pytest.raises(RunFolderError, match="--overwrite would remove the run"):
        check_run_folder(tmp_path / "runs" / "a", False, True, tmp_path / "runs" / "a" / "best.pt")


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


# ---------------------------------------------------------------- one process per folder

def test_a_second_writer_and_a_resume_of_a_running_run_are_refused_naming_the_holder(
        tmp_path, capsys):
    folder = tmp_path / "s"
    first = train_process(folder, "--epochs", "100000", "--patience", "100000",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_first_epoch(folder, first)
        for extra in (["--overwrite"], ["--resume"]):
            err = user_error(train.main, TINY + ["--run-dir", str(folder), "--epochs", "1",
                                                 *extra], capsys)
            assert f"run folder {folder} is in use by process {first.pid}" in err
        assert first.poll() is None       # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the operating system released a killed holder's lock: the folder can be used again
    summary = train.main(TINY + ["--run-dir", str(folder), "--epochs", "1", "--overwrite"])
    assert summary["epochs_run"] == 1 and not (folder / HOLDER_FILE).exists()


def test_two_runs_started_together_in_one_folder_give_one_run(tmp_path):
    folder = tmp_path / "s"
    runs = [train_process(folder, "--epochs", "3", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in runs].index(2)][1]
    assert len(refused.strip().splitlines()) == 1 and str(folder) in refused, refused
    assert "in use by process" in refused or "already holds a run" in refused
    log = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").open()]
    assert log == [1, 2, 3]


def test_ctrl_c_is_one_line_saying_how_to_resume_and_resume_goes_on(tmp_path, capsys):
    folder = tmp_path / "s"
    first = train_process(folder, "--epochs", "100000", "--patience", "100000",
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_first_epoch(folder, first)
    first.send_signal(signal.SIGINT)
    err = first.communicate(timeout=600)[1]
    assert first.returncode == 130 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--resume --run-dir {folder} goes on from the last one saved in" in err
    saved = load_checkpoint(folder / "last.pt", ("epoch",))["epoch"]
    summary = train.main(["--resume", "--run-dir", str(folder), "--epochs", str(saved + 1)])
    assert summary["epochs_run"] == saved + 1


def test_the_lock_is_given_back_when_a_run_ends_or_fails(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    lock = RunFolderLock(tmp_path / "a").acquire()      # nobody holds it after the run
    assert (tmp_path / "a" / HOLDER_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
        RunFolderLock(tmp_path / "a").acquire()
    lock.release()
    last = tmp_path / "a" / "last.pt"
    good = last.read_bytes()
    last.write_bytes(b"not a checkpoint")              # found after the folder is locked
    resume = ["--resume", "--run-dir", str(tmp_path / "a"), "--epochs", "2"]
    assert "is corrupt" in user_error(train.main, resume, capsys)
    last.write_bytes(good)
    assert train.main(resume)["epochs_run"] == 2
    RunFolderLock(tmp_path / "a").acquire().release()


def test_lock_files_alone_do_not_make_a_folder_hold_a_run(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("")
    (folder / HOLDER_FILE).write_text("12345\n")    # left by a killed run
    assert run(tmp_path, "a", "--epochs", "1")["epochs_run"] == 1


# -------------------------------------------------------------------------- output paths

@pytest.mark.parametrize("name", ["best.pt", "summary.json", "log.jsonl", "config.json"])
def test_evaluate_never_writes_over_a_file_of_the_run(tmp_path, name, capsys):
    run(tmp_path, "a", "--epochs", "1")
    before = folder_bytes(tmp_path / "a")
    err = user_error(evaluate.main, [str(tmp_path / "a"), "--json",
                                     str(tmp_path / "a" / name)], capsys)
    assert f"--json {tmp_path / 'a' / name} would replace a file of the run" in err
    assert folder_bytes(tmp_path / "a") == before


def test_evaluate_never_writes_over_the_checkpoint_it_reads(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    model = tmp_path / "model.pt"
    model.write_bytes((tmp_path / "a" / "best.pt").read_bytes())
    err = user_error(evaluate.main, [str(model), "--json", str(model)], capsys)
    assert "which this command reads" in err
    assert model.read_bytes() == (tmp_path / "a" / "best.pt").read_bytes()
    metrics = evaluate.main([str(model), "--json", str(tmp_path / "a" / "metrics.json")])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["test"] == metrics["test"]


def test_reproduce_never_writes_over_its_input_or_a_run_file(tmp_path, capsys):
    report = tmp_path / "table.json"
    report.write_text('{"results": {}}')
    err = user_error(reproduce.main, ["--render", str(report), "--out", str(report)], capsys)
    assert "which this command reads" in err and report.read_text() == '{"results": {}}'
    run(tmp_path, "a", "--epochs", "1")
    before = folder_bytes(tmp_path / "a")
    err = user_error(reproduce.main, ["--no-train", "--run-root", str(tmp_path), "--out",
                                      str(tmp_path / "a" / "summary.md")], capsys)
    assert "would replace a file of the run" in err and folder_bytes(tmp_path / "a") == before


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with replaced_atomically(path) as tmp:
            tmp.write_text('{"new": ')
            raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---------------------------------------------------------------------------- smaller

def test_init_from_a_missing_run_names_it(tmp_path, capsys):
    err = user_error(train.main, TINY + ["--init-from", "nope", "--run-dir",
                                         str(tmp_path / "a")], capsys)
    assert "--init-from nope" in err and not (tmp_path / "a").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    before = folder_bytes(tmp_path / "a")
    err = user_error(train.main, ["--resume", "--overwrite", "--run-dir",
                                  str(tmp_path / "a"), "--epochs", "2"], capsys)
    assert "--resume" in err and "--overwrite" in err and "pass one of them" in err
    assert folder_bytes(tmp_path / "a") == before


def test_a_catalog_of_one_item_is_refused_naming_the_data(tmp_path, capsys):
    data = tmp_path / "one.txt"
    data.write_text("".join(f"u{u} only only only only\n" for u in range(20)))
    err = user_error(train.main, ["--data-file", str(data), "--d-model", "16", "--no-progress",
                                  "--threads", "1", "--run-dir", str(tmp_path / "a")], capsys)
    assert "one.txt: 20 users, 1 items" in err and "at least 2 items" in err


def test_recommend_and_metrics_write_json_to_a_file_or_stdout(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    capsys.readouterr()
    items = evaluate.main([str(tmp_path / "a"), "--recommend", "3", "7", "-k", "4", "--json",
                           "-"])
    assert json.loads(capsys.readouterr().out) == items and len(items) == 4
    out = tmp_path / "rec.json"
    again = evaluate.main([str(tmp_path / "a"), "--recommend", "3", "7", "-k", "4", "--json",
                           str(out)])
    assert json.loads(out.read_text()) == again == items
    assert capsys.readouterr().out.split() == items     # the text goes on as before
    metrics = evaluate.main([str(tmp_path / "a"), "--json", "-"])
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]


def test_a_run_with_output_to_a_file_writes_no_progress_bar(tmp_path):
    log = tmp_path / "run.log"
    flags = [flag for flag in TINY if flag != "--no-progress"]
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "hymoerec/train.py", *flags, "--epochs", "2",
                               "--run-dir", str(tmp_path / "a")], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600).returncode
    text = log.read_bytes().decode()    # as written: read_text would turn each \r into \n
    assert code == 0 and "\r" not in text, text
    assert "epoch 1: loss" in text and "epoch 2: loss" in text
