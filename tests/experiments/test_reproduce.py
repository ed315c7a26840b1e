"""experiments/reproduce.py, the table runner: the paired test and budgets, the table of
tiny runs (each trained by python -m hymoerec.train), --no-train and --keep-runs, the
published columns read from experiments/published/, and the named configs' settings."""
import json

import numpy as np
import pytest

from experiments import reproduce, tables
from hymoerec import options
from study_cases import REPO
TINY_DATA = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "12",
             "--batch-size", "64", "--max-len", "10", "--threads", "1", "--no-progress"]


def test_paired_test_and_budget_parsing():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    same = tables.paired_test(base, base)
    assert same["mean_diff"] == 0 and same["p_permutation"] == 1.0
    better = tables.paired_test(base + 0.05 + 0.01 * rng.standard_normal(400), base)
    assert better["p_permutation"] < 0.001 and better["t"] > 10
    assert better["ci95"][0] < better["mean_diff"] < better["ci95"][1]
    noise = tables.paired_test(base + 0.01 * rng.standard_normal(400), base)
    assert noise["p_permutation"] > 0.01
    assert reproduce.parse_budget("5") == ["--epochs", "5"]
    assert reproduce.parse_budget("2.5m") == ["--max-minutes", "2.5"]
    for bad in ("0", "5h", "1.5"):
        with pytest.raises(Exception, match="--budget"):
            reproduce.parse_budget(bad)


def test_reproduce_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    result = reproduce.main(["--seeds", "1", "--budget", "1", "--models", "gru4rec",
                             "HyMoERec (SASRec backbone)", "--paper-dataset", "beauty",
                             "--run-root", str(tmp_path / "runs"), "--out", str(out),
                             "--d-model", "16", *TINY_DATA])
    text = out.read_text()
    assert "| GRU4Rec |" in text and "| HyMoERec (SASRec backbone) |" in text
    # the paper's Beauty GRU4Rec and HyMoERec rows beside ours
    assert "| 0.0402 | 0.0635 | 0.0274 | 0.0349 |" in text
    assert "| 0.0518 | 0.0756 | 0.0365 | 0.0442 |" in text
    assert "Budgeted run" in text and "against the best baseline, **GRU4Rec**" in text
    assert "Validation NDCG@10 after each epoch" in text
    # our GRU4Rec beside the independent RecBole run of it (0.0342 NDCG@10)
    assert "independent RecBole runs" in text and "| 0.0342 |" in text
    assert set(result["significance"]) == {"HyMoERec (SASRec backbone)"}
    # the Markdown is rendered from the JSON alone: --render gives the same text
    rendered = tmp_path / "again.md"
    reproduce.main(["--render", str(out.with_suffix(".json")), "--out", str(rendered)])
    assert rendered.read_text() == text
    # a second call reuses the finished runs instead of training again
    again = reproduce.main(["--seeds", "1", "--budget", "1", "--models", "gru4rec",
                            "--run-root", str(tmp_path / "runs"), "--out", str(out),
                            "--d-model", "16", *TINY_DATA])
    assert (again["results"]["GRU4Rec"]["runs"][0]["test"]
            == result["results"]["GRU4Rec"]["runs"][0]["test"])
    # the same checkpoints under the other protocol: history excluded never ranks worse
    assert "earlier items removed from the ranking (history excluded)" in text
    for label, r in result["results"].items():
        run = r["runs"][0]
        assert run["test_other_protocol"]["HR@10"] >= run["test"]["HR@10"] and run["finished"]


def test_no_train_tables_what_has_a_summary_and_marks_runs_still_training(tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "2", "--models", "gru4rec", "narm", "--run-root", str(runs),
             "--out", str(tmp_path / "t.md"), "--d-model", "16", *TINY_DATA]
    reproduce.main(["--seeds", "1", "--budget", "1"] + flags[2:])   # gru4rec and narm, seed 1
    summary_path = runs / "narm-dense-s1" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "finished": False}))  # as --max-minutes leaves it
    result = reproduce.main(["--no-train", "--budget", "1"] + flags)
    text = (tmp_path / "t.md").read_text()
    assert [len(r["runs"]) for r in result["results"].values()] == [1, 1]  # no seed 2 trained
    assert "| NARM | 1 | 1 (still training) |" in text and "| GRU4Rec | 1 | 1 |" in text
    assert not (runs / "gru4rec-dense-s2").exists()


def test_keep_runs_fills_a_table_from_an_earlier_report_when_run_folders_are_gone(tmp_path):
    import shutil
    hymoe = "HyMoERec (SASRec backbone)"
    common = ["--seeds", "1", "--budget", "1", "--d-model", "16", *TINY_DATA]
    flags = common + ["--models", "gru4rec", hymoe]
    first = reproduce.main(flags + ["--run-root", str(tmp_path / "a"), "--out",
                                    str(tmp_path / "a.md")])
    assert (tmp_path / "a_ranks.npz").is_file()
    shutil.rmtree(tmp_path / "a")   # a new machine: the run folders are gone
    # GRU4Rec is kept from the earlier report; HyMoERec seed 1 has a fresh run folder here
    fresh = reproduce.main(common + ["--models", hymoe, "--run-root", str(tmp_path / "b"),
                                     "--out", str(tmp_path / "b0.md")])
    again = reproduce.main(flags + ["--no-train", "--run-root", str(tmp_path / "b"),
                                    "--keep-runs", str(tmp_path / "a.json"), "--out",
                                    str(tmp_path / "b.md")])
    assert again["results"]["GRU4Rec"]["runs"] == first["results"]["GRU4Rec"]["runs"]
    assert again["results"][hymoe]["runs"] == fresh["results"][hymoe]["runs"]
    want = tables.paired_test(fresh["results"][hymoe]["ndcg10_per_user"],
                                 first["results"]["GRU4Rec"]["ndcg10_per_user"])
    assert again["significance"][hymoe] == {"against": "GRU4Rec", **want}
    # and the new report keeps them all for the next machine
    third = reproduce.main(flags + ["--no-train", "--run-root", str(tmp_path / "c"),
                                    "--keep-runs", str(tmp_path / "b.json"), "--out",
                                    str(tmp_path / "c.md")])
    assert third["significance"] == again["significance"]
    # an unfinished run is not kept: without its folder it cannot go on
    report = json.loads((tmp_path / "b.json").read_text())
    report["results"]["GRU4Rec"]["runs"][0]["finished"] = False
    (tmp_path / "b.json").write_text(json.dumps(report))
    fourth = reproduce.main(flags + ["--no-train", "--run-root", str(tmp_path / "d"),
                                     "--keep-runs", str(tmp_path / "b.json"), "--out",
                                     str(tmp_path / "d.md")])
    assert list(fourth["results"]) == [hymoe]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads((tmp_path / "a.json").read_text()), "data": "x"}))
    shutil.copy(tmp_path / "a_ranks.npz", tmp_path / "other_ranks.npz")
    with pytest.raises(SystemExit):
        reproduce.main(flags + ["--no-train", "--keep-runs", str(other)])


def fake_report(command_data: list[str], ours: dict[str, float]) -> dict:
    """A results JSON like reproduce.main writes, one seed per row, every metric of a row
    set to ``ours[label]`` (no training)."""
    def run(value):
        test = {m: value for m in reproduce.METRICS} | {"n_head": 30, "n_tail": 70}
        return {"test": test, "valid": test, "epochs_run": 3, "best_epoch": 2,
                "train_seconds_per_epoch": 1.0, "config": {"exclude_history": False, "seed": 1},
                "commits": [], "valid_curve": [0.1, 0.2, 0.15]}
    entries = {e.label: e for e in reproduce.ENTRIES}
    return {"command": ["python", "-m", "experiments.reproduce", *command_data, "--seeds", "1"],
            "data": "d: 100 users, 50 items, 900 interactions",
            "results": {label: {"model": entries[label].model, "ffn": entries[label].ffn,
                                "is_hymoerec": entries[label].is_hymoerec, "runs": [run(v)]}
                        for label, v in ours.items()},
            "significance": {}, "independent_reference": {}}


def table_rows(text: str) -> dict[str, list[str]]:
    """Cells of the main table's rows, keyed by model label."""
    main_table = next(block for block in text.split("\n\n") if block.startswith("| Model | HR@5"))
    rows = ([c.strip() for c in line.strip("|").split("|")] for line in main_table.splitlines()[2:])
    return {cells[0]: cells[1:] for cells in rows}


@pytest.mark.parametrize("dataset, command", [("ml-1m", ["--dataset", "ml-1m"]),
                                              ("beauty", ["--data-file", "x/Beauty.txt"])])
def test_published_columns_are_the_papers_table_1(dataset, command):
    ours = {"GRU4Rec": 0.25, "NARM": 0.2, "BERT4Rec": 0.3, "Mamba4Rec": 0.04,
            "SASRec (dense FFN)": 0.1, "HyMoERec (SASRec backbone)": 0.18,
            "HyMoERec (Mamba4Rec backbone)": 0.05}
    rows = table_rows(reproduce.render(fake_report(command, ours)))
    assert list(rows) == list(ours)
    for label, cells in rows.items():
        paper_row = {e.label: e.paper_row for e in reproduce.ENTRIES}[label]
        if paper_row is None:                  # SASRec: not in the paper's Table 1
            assert cells[4:] == ["—"] * 6
            continue
        paper = reproduce.PUBLISHED[dataset][paper_row]
        assert cells[4:8] == [f"{paper[m]:.4f}" for m in reproduce.METRICS]
        assert cells[8:] == [f"{100 * (ours[label] / paper[m] - 1):+.1f}%"
                             for m in ("HR@10", "NDCG@10")]
    # spot checks against the table, so a mistyped number in PUBLISHED fails here
    if dataset == "ml-1m":
        assert rows["Mamba4Rec"][4:] == ["0.2106", "0.3065", "0.1447", "0.1756", "-86.9%", "-77.2%"]
        assert rows["NARM"][7] == "0.1404" and rows["HyMoERec (Mamba4Rec backbone)"][5] == "0.3103"
    else:
        assert rows["Mamba4Rec"][4:] == ["0.0511", "0.0731", "0.0362", "0.0432", "-45.3%", "-7.4%"]
        assert rows["BERT4Rec"][4:8] == ["0.0243", "0.0402", "0.0151", "0.0202"]


def test_table_without_published_numbers_has_no_paper_columns():
    text = reproduce.render(fake_report(["--dataset", "synthetic"], {"GRU4Rec": 0.5}))
    assert "paper HR@10" not in text and "Published numbers: none for this data" in text
    assert table_rows(text)["GRU4Rec"] == ["0.5000"] * 4


def test_mean_std_cells():
    assert tables.mean_std_cell([0.25]) == "0.2500"
    assert tables.mean_std_cell([1.0, 2.0, 3.0], 1) == "2.0 ± 1.0"
    assert tables.mean_std_cell([]) == tables.NO_VALUE
    assert tables.format_mean_std(0.5, 0.0) == "0.5000 ± 0.0000"


def test_data_flags_are_train_pys_with_the_same_names_and_defaults():
    def flags(parser):
        return {a.dest: (tuple(a.option_strings), a.default) for a in parser._actions
                if a.option_strings and a.dest != "help"}
    train_flags, reproduce_flags = flags(options.build_parser()), flags(reproduce.build_parser())
    shared = set(train_flags) & set(reproduce_flags)
    assert {"dataset", "data_file", "format", "k_core", "user_col", "synthetic_seed"} <= shared
    assert all(train_flags[name] == reproduce_flags[name] for name in shared)


@pytest.mark.parametrize("config", sorted((REPO / "experiments" / "configs").glob("*.json")),
                         ids=lambda p: p.name)
def test_named_configs_are_valid_run_settings(config):
    settings_in_file = json.loads(config.read_text())
    args = options.parse_args(["--config", str(config)])
    assert {k: getattr(args, k) for k in settings_in_file} == settings_in_file
