"""End-to-end: a tiny synthetic run, determinism, resume, checkpoints, evaluate / recommend."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hymoerec import evaluate, options, settings, train
from hymoerec.data import SequenceData, leave_one_out
from shared_data import REPO, SHARED_DATA
from train_cases import TINY, keep_thread_count, run  # noqa: F401 (fixture)


def test_one_epoch_run_writes_log_checkpoints_and_summary(tmp_path, capsys):
    summary = run(tmp_path, "a", "--epochs", "1")
    run_dir = tmp_path / "a"
    assert {"config.json", "log.jsonl", "last.pt", "best.pt", "summary.json"} <= \
        {p.name for p in run_dir.iterdir()}
    record = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["loss"] > 0 and record["aux_loss"] < 0
    assert len(record["alpha"]) == 2 and len(record["expert_load"][0]) == 4
    assert sum(record["expert_load"][0]) == pytest.approx(1.0)
    assert 0 <= summary["test"]["NDCG@10"] <= summary["test"]["HR@10"] <= 1
    assert summary["n_users"] == 120 and summary["epochs_run"] == 1
    assert "NDCG@10" in capsys.readouterr().out


def test_log_and_summary_hold_the_other_protocol_too(tmp_path):
    """Early stopping reads one protocol; each epoch and the test also hold the other."""
    kept = run(tmp_path, "kept", "--epochs", "1")
    excluded = run(tmp_path, "excluded", "--epochs", "1", "--exclude-history")
    assert kept["test_history_excluded"] == excluded["test"]
    assert excluded["test_history_kept"] == kept["test"]
    records = [json.loads((tmp_path / name / "log.jsonl").read_text()) for name in ("kept", "excluded")]
    assert records[0]["valid_history_excluded"] == records[1]["valid"]
    assert records[1]["valid_history_kept"] == records[0]["valid"]
    assert records[0]["valid"] != records[1]["valid"]  # the synthetic data repeats items


def test_fixed_seed_gives_identical_metrics(tmp_path):
    first = run(tmp_path, "a", "--epochs", "2")
    second = run(tmp_path, "b", "--epochs", "2")
    assert first["test"] == second["test"] and first["valid"] == second["valid"]


def test_resume_continues_to_the_same_result(tmp_path):
    straight = run(tmp_path, "straight", "--epochs", "3", "--ffn", "hymoe")
    run(tmp_path, "resumed", "--epochs", "1")                      # "killed" after epoch 1
    resumed = train.main(["--resume", "--run-dir", str(tmp_path / "resumed"), "--epochs", "3"])
    assert resumed["test"] == straight["test"] and resumed["epochs_run"] == 3
    logs = [[json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").open()]
            for name in ("straight", "resumed")]
    assert logs[0] == logs[1]


def test_lr_decays_after_each_plateau_and_resume_keeps_the_rate(tmp_path):
    # a learning rate so high that validation soon stops improving, decayed after each epoch
    flags = ("--epochs", "6", "--patience", "6", "--lr", "0.05", "--lr-decay-patience", "1",
             "--lr-decay-factor", "0.5")
    run(tmp_path, "straight", *flags)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").open()]
    best, lr = -1.0, 0.05
    for record in log:  # the rate logged is the one the next epoch trains with
        if record["valid"]["NDCG@10"] > best:
            best = record["valid"]["NDCG@10"]
        else:
            lr *= 0.5
        assert record["lr"] == pytest.approx(lr)
    assert log[-1]["lr"] < 0.05
    run(tmp_path, "resumed", *flags[:1], "2", *flags[2:])            # "killed" after epoch 2
    train.main(["--resume", "--run-dir", str(tmp_path / "resumed"), "--epochs", "6"])
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").open()]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in log]


def test_existing_run_dir_needs_resume(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "a", "--epochs", "1")
    assert exit_info.value.code == 2 and "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_damaged_checkpoint_fails_naming_the_file(tmp_path, damage, capsys):
    run(tmp_path, "a", "--epochs", "1")
    last = tmp_path / "a" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "garbage":
        data = b"not a checkpoint at all"
    elif damage == "truncate":
        data = data[:1000]
    else:  # 4 KiB of 0xff inside the tensor data: the file still unpickles
        start = len(data) // 2
        data[start:start + 4096] = b"\xff" * 4096
    last.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", "--run-dir", str(tmp_path / "a"), "--epochs", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"checkpoint {last} is corrupt" in err
    assert "weights_only" not in err


def test_checkpoint_of_other_data_is_refused(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"u{u} " + " ".join(f"i{(u + j) % 9}" for j in range(6)) + "\n"
                            for u in range(30)))
    flags = ["--data-file", str(data), "--d-model", "16", "--batch-size", "32", "--no-progress",
             "--threads", "1", "--run-dir", str(tmp_path / "a")]
    train.main(flags + ["--epochs", "1"])
    data.write_text(data.read_text().replace("i3", "i10"))
    with pytest.raises(SystemExit):
        train.main(["--resume", "--run-dir", str(tmp_path / "a"), "--epochs", "2"])
    assert "trained on different data" in capsys.readouterr().err


def test_evaluate_and_recommend_from_checkpoint(tmp_path):
    summary = run(tmp_path, "a", "--epochs", "1", "--ffn", "dense")
    metrics = evaluate.evaluate_checkpoint(tmp_path / "a")
    assert metrics["test"] == pytest.approx(summary["test"])
    rec = evaluate.Recommender.from_checkpoint(tmp_path / "a")
    top = rec.recommend([3, "7", 12], k=5)
    assert len(top) == 5 and all(item in rec.item_ids[1:] for item in top)
    assert not {"3", "7", "12"} & set(rec.recommend([3, 7, 12], k=10, exclude_history=True))
    with pytest.raises(ValueError, match="unknown to the model"):
        rec.recommend(["no-such-item"])


def test_seen_items_in_top_counts_what_full_scores_show(tmp_path, capsys):
    run(tmp_path, "a", "--epochs", "1", "--ffn", "dense", "--max-len", "5")
    rec = evaluate.Recommender.from_checkpoint(tmp_path / "a")
    data = settings.load_data(argparse.Namespace(**rec.config))
    histories = leave_one_out(data).history("test")
    seen = evaluate.seen_items_in_top(rec, histories, k=4, batch_size=7)
    in_input = in_history = first = 0
    for history in histories:  # one user at a time, from the full score row
        scores = rec.model.score_next(torch.from_numpy(history[-5:])[None])[0]
        top = scores.topk(4).indices.tolist()
        in_input += len(set(top) & set(history[-5:].tolist()))
        in_history += len(set(top) & set(history.tolist()))
        first += top[0] == history[-1]
    n = len(histories)
    assert seen == pytest.approx({"k": 4, "users": n, "seen_in_input": in_input / n,
                                  "seen_in_history": in_history / n, "last_item_first": first / n})
    assert seen["seen_in_history"] > seen["seen_in_input"] > 0   # histories are longer than 5
    evaluate.main([str(tmp_path / "a"), "--seen-items", "-k", "4"])
    assert f"{seen['seen_in_input']:.2f} items on average are in the model's input" in \
        capsys.readouterr().out


def test_seen_bias_learns_to_rank_seen_items_lower_where_no_user_repeats(tmp_path):
    data = tmp_path / "data.txt"   # every user's items distinct: a seen item is never next
    data.write_text("".join(f"u{u} " + " ".join(f"i{(3 * u + 2 * j) % 31}" for j in range(9))
                            + "\n" for u in range(60)))
    summary = train.main(["--data-file", str(data), "--d-model", "16", "--batch-size", "64",
                          "--no-progress", "--threads", "1", "--epochs", "3", "--lr", "0.01",
                          "--seen-bias", "--run-dir", str(tmp_path / "a")])
    assert summary["config"]["seen_bias"] is True
    rec = evaluate.Recommender.from_checkpoint(tmp_path / "a")
    assert rec.model.seen_offset.item() < -0.05
    inputs = torch.tensor([[rec.item_index[i] for i in ("i3", "i5", "i7")]] * 3)
    with torch.no_grad():   # each seen item, as a target: how many items score above it
        learned = rec.model.rank_next(inputs, inputs[0])[:, 0]
        rec.model.seen_offset.zero_()
        without = rec.model.rank_next(inputs, inputs[0])[:, 0]
    assert (learned >= without).all() and learned.sum() > without.sum()
    assert len(rec.recommend(["i3", "i5", "i7"], k=5)) == 5


def sequences(lengths, n_items):
    rng = np.random.default_rng(0)
    return SequenceData([rng.integers(1, n_items + 1, size=n) for n in lengths],
                        ["<pad>"] + [str(i) for i in range(1, n_items + 1)],
                        [str(u) for u in range(len(lengths))])


@pytest.mark.parametrize("lengths, n_items, max_len, dropout, mask_prob", [
    ([5] * 90 + [400] * 10, 30000, 50, 0.5, 0.6),    # short and sparse, like Beauty
    ([100] * 70 + [600] * 30, 3000, 200, 0.2, 0.2),  # long and dense, like ML-1M
    ([20] * 75 + [120] * 25, 500, 150, 0.2, 0.2),
    ([30] * 100, 10000, 50, 0.5, 0.6),
])
def test_data_dependent_defaults_come_from_the_data(lengths, n_items, max_len, dropout,
                                                    mask_prob):
    assert settings.data_defaults(sequences(lengths, n_items)) == {
        "max_len": max_len, "dropout": dropout, "mask_prob": mask_prob}


def test_bert4rec_masks_as_its_paper_on_dense_data_unless_a_flag_says_otherwise(tmp_path):
    """The synthetic data are dense (like ML-1M): the BERT4Rec paper's 0.2 there; the
    model's own paper dropout (0.1) still wins over the data's."""
    config = run(tmp_path, "a", "--epochs", "1", "--model", "bert4rec")["config"]
    assert (config["mask_prob"], config["dropout"]) == (0.2, 0.1)
    assert run(tmp_path, "b", "--epochs", "1", "--model", "bert4rec",
               "--mask-prob", "0.5")["config"]["mask_prob"] == 0.5


def test_seen_bias_defaults_on_for_every_backbone_off_for_older_runs(tmp_path):
    assert run(tmp_path, "a", "--epochs", "1")["config"]["seen_bias"] is True
    assert run(tmp_path, "b", "--epochs", "1", "--no-seen-bias")["config"]["seen_bias"] is False
    assert run(tmp_path, "c", "--epochs", "1", "--model", "bert4rec")["config"]["seen_bias"] \
        is True
    # a run recorded before the setting existed resumes as it ran: without the offset
    old = tmp_path / "b" / "config.json"
    config = json.loads(old.read_text())
    del config["seen_bias"]
    old.write_text(json.dumps(config))
    resumed = train.main(["--resume", "--run-dir", str(tmp_path / "b"), "--epochs", "2"])
    assert resumed["config"]["seen_bias"] is False and resumed["epochs_run"] == 2


def test_the_same_data_in_two_formats_trains_with_the_same_settings(tmp_path):
    rows = [(u, f"i{(u * 7 + t) % 60}") for u in range(50) for t in range(8)]
    pairs, table = tmp_path / "pairs.txt", tmp_path / "table.csv"
    pairs.write_text("".join(f"u{u} {item}\n" for u, item in rows))
    table.write_text("user,item,timestamp\n" + "".join(
        f"u{u},{item},{t}\n" for t, (u, item) in enumerate(rows)))
    summaries = [train.main(["--data-file", str(path), "--format", fmt, "--d-model", "16",
                             "--epochs", "1", "--no-progress", "--threads", "1",
                             "--run-dir", str(tmp_path / fmt)])
                 for path, fmt in ((pairs, "pairs"), (table, "csv"))]
    configs = [{k: s["config"][k] for k in ("max_len", "dropout")} for s in summaries]
    assert configs[0] == configs[1] == {"max_len": 50, "dropout": 0.2}
    assert summaries[0]["test"] == summaries[1]["test"]


@pytest.mark.parametrize("entry", [["hymoerec/train.py"], ["-m", "hymoerec.train"],
                                   ["hymoerec/evaluate.py"]])
def test_entry_points_run_as_script_and_module(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout


def test_learning_curves_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (optional 'plot' extra)")
    run(tmp_path, "a", "--epochs", "2")
    png = tmp_path / "a" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, fmt, max_len, dropout, mask_prob", [
    ("beauty.txt", "sequences", 50, 0.5, 0.6), ("ml-1m.txt", "pairs", 200, 0.2, 0.2)])
def test_data_defaults_of_the_papers_datasets(name, fmt, max_len, dropout, mask_prob):
    if not (SHARED_DATA / name).is_file():
        pytest.skip(f"{SHARED_DATA / name} is not here (the project's data are never committed)")
    from hymoerec.data import read_file
    assert settings.data_defaults(read_file(SHARED_DATA / name, fmt)) == {
        "max_len": max_len, "dropout": dropout, "mask_prob": mask_prob}


def test_init_from_upcycles_a_dense_run_and_starts_where_it_ended(tmp_path, capsys):
    dense = run(tmp_path, "dense", "--epochs", "2", "--ffn", "dense")
    up = train.main(["--init-from", str(tmp_path / "dense"), "--ffn", "hymoe", "--epochs", "1",
                     "--expert-init", "drop", "--run-dir", str(tmp_path / "up")])
    record = json.loads((tmp_path / "up" / "log.jsonl").read_text().splitlines()[0])
    started = record["started_from"]
    assert started["run"] == str(tmp_path / "dense" / "best.pt")
    assert started["epoch"] == dense["best_epoch"] and started["upcycled"] == ["blocks.0.ffn",
                                                                                "blocks.1.ffn"]
    assert up["started_from"] == started and up["config"]["ffn"] == "hymoe"
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["init_from"] == str(tmp_path / "dense")          # recorded, absolute
    assert config["synthetic_users"] == 120 and config["d_model"] == 16  # inherited
    # the upcycled model at warm-up step 0 scores exactly like the dense best model
    from hymoerec.checkpoint import load_checkpoint
    from hymoerec.models import build_model
    args = options.parse_args(["--init-from", str(tmp_path / "dense"), "--ffn", "hymoe"])
    args.max_len, args.dropout = config["max_len"], config["dropout"]
    trainer = train.Trainer(argparse.Namespace(**{**vars(args), "run_dir": str(tmp_path / "x")}))
    best = load_checkpoint(tmp_path / "dense" / "best.pt")
    dense_model = build_model("sasrec", 40, settings.model_config(argparse.Namespace(**best["config"])))
    dense_model.load_state_dict(best["model"])
    inputs = torch.tensor([[3, 7, 9, 0], [5, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval().score_next(inputs),
                                   dense_model.eval().score_next(inputs), rtol=1e-5, atol=1e-5)
    assert all(int(layer.step) == 0 for layer in trainer.model.hymoe_layers())
    # a run resumes as the HyMoE model it became
    resumed = train.main(["--resume", "--run-dir", str(tmp_path / "up"), "--epochs", "2"])
    assert resumed["epochs_run"] == 2 and resumed["started_from"] == started


def test_init_from_refuses_other_data_and_other_models(tmp_path, capsys):
    run(tmp_path, "dense", "--epochs", "1", "--ffn", "dense")
    source = str(tmp_path / "dense")
    for flags, message in ((["--synthetic-items", "30"], "trained on different data"),
                           (["--model", "gru4rec"], "is a sasrec model"),
                           (["--d-model", "32"], "it also changes d_model")):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--init-from", source, "--ffn", "hymoe" if "gru4rec" not in flags
                        else "dense", "--epochs", "1", "--run-dir", str(tmp_path / "x"),
                        "--overwrite", *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err


def test_a_partial_epoch_runs_its_first_steps(tmp_path):
    """train_epoch(max_steps=n): the epoch's first n batches (benchmarks time steps so)."""
    trainer = train.Trainer(options.parse_args(TINY + ["--run-dir", str(tmp_path / "p")]))
    first = trainer.train_epoch(max_steps=2)
    assert trainer.step == 2 and np.isfinite(first["loss"])
    trainer.train_epoch()
    assert trainer.step > 4                 # the whole epoch: more batches than two
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        trainer.train_epoch(max_steps=0)


def test_prefix_samples_train_one_target_per_window(tmp_path):
    windows = run(tmp_path, "windows", "--epochs", "1", "--ffn", "dense")
    prefixes = run(tmp_path, "prefixes", "--epochs", "1", "--ffn", "dense",
                   "--train-samples", "prefixes", "--positions", "last")
    # the same targets, one per window, in batches of as many targets (32): as many steps
    # give or take the bucketing's partial batches
    assert abs(prefixes["steps"] - windows["steps"]) <= 0.2 * windows["steps"]
    assert prefixes["config"]["train_samples"] == "prefixes"
    assert 0 <= prefixes["test"]["NDCG@10"] <= prefixes["test"]["HR@10"] <= 1
