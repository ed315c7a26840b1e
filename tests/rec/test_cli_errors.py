"""User mistakes end in one clear line and exit code 2 (a diverged run: exit 1), never in a
traceback or a misleading result; resume and run folders never lose or misrecord data."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hymoe_kernels import backend
from hymoerec import evaluate, train
from hymoerec.checkpoint import load_checkpoint, save_checkpoint
from hymoerec.models.base import SequentialRecommender
from hymoerec.run_folder import json_text
from train_cases import TINY, keep_thread_count, run  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def user_error(main, argv, capsys, code=2) -> str:
    """Run ``main(argv)``, expect SystemExit(code) (any other exception fails the test, as a
    traceback would) and return stderr, which must be one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "5", "--num-experts", "4"], "--top-k"),
    (["--num-experts", "0"], "--num-experts"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--backend", "bogus"], "--backend"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lb-weight", "nan"], "--lb-weight"),
    (["--threads", "-1"], "--threads"),
    (["--patience", "0"], "--patience"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--lr-decay-patience", "-1"], "--lr-decay-patience"),
    (["--lr-decay-factor", "1"], "--lr-decay-factor"),
    (["--lr-decay-factor", "nan"], "--lr-decay-factor"),
    (["--synthetic-users", "1"], "--synthetic-users"),
    (["--resume"], "--resume needs --run-dir"),
    (["--config", "/no/such/config.json"], "/no/such/config.json"),
])
def test_bad_flags_are_one_line_usage_errors(flags, named, capsys):
    assert named in user_error(train.main, flags, capsys)


def test_triton_backend_without_a_gpu_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --backend triton is valid here")
    monkeypatch.setattr(backend, "INTERPRETING", False)     # as without TRITON_INTERPRET=1
    err = user_error(train.main, TINY + ["--backend", "triton", "--run-dir",
                                         str(tmp_path / "a")], capsys)
    assert "--backend triton needs a CUDA device" in err and not (tmp_path / "a").exists()


def test_script_usage_error_prints_one_line_and_no_traceback():
    out = subprocess.run([sys.executable, "hymoerec/train.py", "--top-k", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "train.py: error: --top-k: top_k=0 must be in 1..num_experts=4 (--help lists the options)"]


def test_foreign_folder_is_refused_and_kept_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "log.jsonl").write_text('{"not": "ours"}\n')
    (folder / "notes.txt").write_text("keep me")
    err = user_error(lambda argv: run(tmp_path, "mine", *argv), ["--epochs", "1"], capsys)
    assert "holds files but no run of ours" in err and "--overwrite" in err
    assert (folder / "log.jsonl").read_text() == '{"not": "ours"}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["log.jsonl", "notes.txt"]
    run(tmp_path, "mine", "--epochs", "2", "--overwrite")
    epochs = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").open()]
    assert epochs == [1, 2] and (folder / "notes.txt").read_text() == "keep me"


def test_unwritable_run_folder_is_found_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = user_error(train.main, TINY + ["--run-dir", str(blocker / "run")], capsys)
    assert f"run folder {blocker / 'run'} is not writable" in err


def test_resume_refuses_changed_settings_and_records_allowed_ones(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    resume = ["--resume", "--run-dir", str(tmp_path / "a")]
    err = user_error(train.main, resume + ["--lr", "0.5", "--top-k", "1"], capsys)
    assert "lr 0.001 -> 0.5" in err and "top_k 2 -> 1" in err
    summary = train.main(resume + ["--epochs", "2", "--patience", "7"])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["epochs"], saved["patience"]) == (2, 7) and summary["epochs_run"] == 2
    assert (summary["config"]["epochs"], summary["config"]["lr"]) == (2, 0.001)


def test_checkpoint_of_other_settings_in_the_folder_is_refused(tmp_path, capsys):
    run(tmp_path, "k1", "--epochs", "1", "--top-k", "1")
    run(tmp_path, "k2", "--epochs", "1")
    shutil.copy(tmp_path / "k1" / "last.pt", tmp_path / "k2" / "last.pt")
    err = user_error(train.main, ["--resume", "--run-dir", str(tmp_path / "k2"), "--epochs", "2"],
                     capsys)
    assert "trained with other settings" in err and "top_k 1 -> 2" in err


def test_resume_tolerates_a_cut_last_log_line_and_names_a_bad_one(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    log = tmp_path / "a" / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"epoch": 2, "lo')  # killed while writing epoch 2's record
    resume = ["--resume", "--run-dir", str(tmp_path / "a"), "--epochs", "2"]
    train.main(resume)
    assert [json.loads(line)["epoch"] for line in log.open()] == [1, 2]
    log.write_text("garbage\n" + log.read_text())
    err = user_error(train.main, resume[:-1] + ["3"], capsys)
    assert f"{log}, line 1: not a JSON record" in err


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run(tmp_path, "a", "--epochs", "1")
    best_before = (tmp_path / "a" / "best.pt").read_bytes()
    summary_before = (tmp_path / "a" / "summary.json").read_text()
    honest_loss = SequentialRecommender.loss

    def nan_loss(self, inputs, targets):
        task, aux = honest_loss(self, inputs, targets)
        return task * float("nan"), aux

    monkeypatch.setattr(SequentialRecommender, "loss", nan_loss)
    err = user_error(train.main, ["--resume", "--run-dir", str(tmp_path / "a"), "--epochs", "3"],
                     capsys, code=1)
    assert "epoch 2, step" in err and "training diverged" in err and "--lr 0.001" in err
    assert load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 1
    assert (tmp_path / "a" / "best.pt").read_bytes() == best_before
    assert (tmp_path / "a" / "summary.json").read_text() == summary_before


def test_a_huge_learning_rate_never_reports_metrics(tmp_path, capsys):
    err = user_error(lambda argv: run(tmp_path, "a", *argv), ["--epochs", "2", "--lr", "1e30"],
                     capsys, code=1)
    assert "training diverged" in err and "--lr 1e+30" in err
    assert not (tmp_path / "a" / "best.pt").exists()


def broken_copy(tmp_path, name, change) -> Path:
    """A run folder whose best.pt holds the trained model's weights as ``change`` left them
    (saved with a valid digest: a broken model, not a damaged file)."""
    run(tmp_path, name, "--epochs", "1", "--ffn", "dense")
    best = tmp_path / name / "best.pt"
    state = load_checkpoint(best)
    change(state["model"])
    save_checkpoint(state, best)
    return tmp_path / name


def test_a_model_with_equal_scores_evaluates_like_chance(tmp_path):
    def all_items_tied(state):   # item embeddings and the seen-item offset zero
        state["item_emb.weight"].zero_()
        state["seen_offset"].zero_()
    run_dir = broken_copy(tmp_path, "zero", all_items_tied)
    metrics = evaluate.evaluate_checkpoint(run_dir)
    for stage in ("valid", "test"):  # 40 items, all tied: the target's rank is uniform
        assert metrics[stage]["HR@10"] == pytest.approx(10 / 40)
        assert metrics[stage]["HR@20"] == pytest.approx(20 / 40)


def test_a_nan_model_is_an_evaluation_error_naming_the_stage(tmp_path, capsys):
    run_dir = broken_copy(tmp_path, "nan", lambda m: m["item_emb.weight"].fill_(float("nan")))
    err = user_error(evaluate.main, [str(run_dir)], capsys)
    assert "valid evaluation of" in err and "NaN or infinite" in err
    err = user_error(evaluate.main, [str(run_dir), "--recommend", "3", "4"], capsys)
    assert "NaN or infinite" in err


@pytest.mark.parametrize("flags, named", [
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--eval-batch-size", "-1"], "--eval-batch-size"),
    (["-k", "0", "--recommend", "3"], "-k"),
    (["--json", "/no/such/dir/m.json"], "--json: folder /no/such/dir does not exist"),
])
def test_evaluate_flags_are_checked_before_any_work(tmp_path, flags, named, capsys):
    assert named in user_error(evaluate.main, [str(tmp_path / "no-run"), *flags], capsys)


def test_evaluate_of_a_missing_run_is_one_line(tmp_path, capsys):
    err = user_error(evaluate.main, [str(tmp_path / "no-run")], capsys)
    assert "does not exist" in err


def test_a_data_file_run_evaluates_from_any_folder(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"u{u} " + " ".join(f"i{(u * j) % 11}" for j in range(1, 7)) + "\n"
                            for u in range(40)))
    monkeypatch.chdir(tmp_path)
    train.main(["--data-file", "data.txt", "--d-model", "16", "--batch-size", "32", "--epochs",
                "1", "--no-progress", "--threads", "1", "--run-dir", "a"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate.evaluate_checkpoint(tmp_path / "a")["test"]["n_head"] >= 0
    data.rename(tmp_path / "moved.txt")
    assert str(data) in user_error(evaluate.main, [str(tmp_path / "a")], capsys)


def test_summary_json_writes_nan_as_null():
    text = json_text({"tail/HR@10": float("nan"), "x": [1.0, float("inf")], "n": 3})
    assert json.loads(text) == {"tail/HR@10": None, "x": [1.0, None], "n": 3}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("content, fmt, named", [
    (None, "sequences", "does not exist"),
    ("folder", "sequences", "is a directory"),
    (b"", "sequences", "empty"),
    (b"\n  \n", "sequences", "empty"),
    (b"u1 a b c\nu2 \xff\xfe d\n", "sequences", "line 2"),
    (b"u1 a b c\nu1 d e\n", "sequences", "line 2"),
    (b"u1 a\nu1 b extra\n", "pairs", "line 2"),
    (b"1::2::5\n", "ml-1m", "line 1"),
    (b"1::2::5::soon\n", "ml-1m", "line 1"),
    (b"user,item\nu1,a\n", "csv", "timestamp"),
    (b"user,item,timestamp\n", "csv", "line"),
])
def test_bad_data_files_are_one_line_errors_naming_the_file(tmp_path, content, fmt, named,
                                                             capsys):
    path = tmp_path / "data.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    err = user_error(train.main, TINY + ["--data-file", str(path), "--format", fmt,
                                         "--run-dir", str(tmp_path / "run")], capsys)
    assert str(path) in err and named in err, err


def test_unwritable_dataset_cache_is_named_with_its_variable(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HYMOEREC_DATA", str(blocker / "cache"))
    err = user_error(train.main, TINY + ["--dataset", "ml-1m", "--run-dir", str(tmp_path / "r")],
                     capsys)
    assert "HYMOEREC_DATA" in err and "not writable" in err
