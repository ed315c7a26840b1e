"""Baseline backbones (GRU4Rec, NARM, BERT4Rec, Mamba4Rec), --ffn inside each backbone, and
the reproduction script."""
import json
import math

import numpy as np
import pytest
import torch

from hymoerec import reproduce, train
from hymoerec.evaluate import Recommender
from hymoerec.models import MODELS, ModelConfig, build_model
from hymoerec.models import mamba4rec, narm
from hymoerec.models.mamba4rec import (SequentialScan, chunked_scan, selective_scan,
                                       selective_scan_reference)

BASELINES = ("gru4rec", "narm", "bert4rec", "mamba4rec")
TINY_DATA = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "12",
             "--batch-size", "64", "--max-len", "10", "--threads", "1", "--no-progress"]


def small_model(name, ffn="dense", n_items=40, **overrides):
    """A tiny backbone ``name`` in eval mode: its paper's model settings (paper_defaults may
    also hold training flags such as lr), small widths, no dropout, then ``overrides``."""
    torch.manual_seed(0)
    paper = {k: v for k, v in MODELS[name].paper_defaults.items()
             if k in ModelConfig.__dataclass_fields__}
    fields = {**paper, "max_len": 8, "d_model": 16, "rnn_hidden": 12, "d_state": 4,
              "dropout": 0.0, "ffn": ffn, **overrides}
    return build_model(name, n_items, ModelConfig(**fields)).eval()


@pytest.mark.parametrize("name,ffn", [(m, "dense") for m in BASELINES]
                         + [("bert4rec", "hymoe"), ("mamba4rec", "hymoe")])
def test_one_epoch_through_train_main(name, ffn, tmp_path):
    summary = train.main(["--model", name, "--ffn", ffn, "--epochs", "1", "--d-model", "16",
                          "--run-dir", str(tmp_path / "run"), *TINY_DATA])
    config = summary["config"]
    assert config["model"] == name and config["ffn"] == ffn
    for field, value in MODELS[name].paper_defaults.items():   # paper config applied
        if field != "ffn":
            assert config[field] == value, field
    assert summary["epochs_run"] == 1
    assert all(math.isfinite(summary["test"][k]) for k in ("HR@10", "NDCG@10"))
    model = Recommender.from_checkpoint(tmp_path / "run").model
    scores = model.score_next(torch.tensor([[3, 7, 9], [5, 0, 0]]))
    assert scores.shape == (2, 41)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_paper_defaults_yield_to_flags_and_models_without_ffn_refuse_hymoe():
    args = train.parse_args(["--model", "mamba4rec"])
    assert (args.n_layers, args.ffn, args.d_state, args.dropout) == (1, "dense", 32, 0.2)
    args = train.parse_args(["--model", "mamba4rec", "--ffn", "hymoe", "--n-layers", "2"])
    assert (args.n_layers, args.ffn) == (2, "hymoe")
    assert train.parse_args([]).ffn == "hymoe"            # sasrec keeps the shared defaults
    for name in ("gru4rec", "narm"):
        with pytest.raises(ValueError, match="no position-wise FFN"):
            small_model(name, ffn="hymoe")


@pytest.mark.parametrize("name", sorted(name for name, cls in MODELS.items() if cls.has_ffn))
def test_hymoe_ffn_inside_every_backbone_with_an_ffn(name):
    model = small_model(name, ffn="hymoe").train()
    assert len(model.hymoe_layers()) == model.config.n_layers
    task, aux = model.loss(torch.tensor([[3, 7, 9, 0]]), torch.tensor([[7, 9, 4, 0]]))
    assert aux.item() != 0 and torch.isfinite(task)
    assert not small_model(name, ffn="dense").hymoe_layers()


def scan_inputs(seed, delta_scale):
    """float64 (x, delta, A, B, C) of a (3, 11, 5, 4) scan, every one requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    Bt, L, Din, N = 3, 11, 5, 4
    shapes = {"x": (Bt, L, Din), "B": (Bt, L, N), "C": (Bt, L, N)}
    x, B, C = (torch.randn(*shapes[k], generator=gen, dtype=torch.float64) for k in "xBC")
    delta = torch.rand(Bt, L, Din, generator=gen, dtype=torch.float64) * delta_scale
    A = -torch.rand(Din, N, generator=gen, dtype=torch.float64).mul(8.0).add(0.5)
    return tuple(t.requires_grad_() for t in (x, delta, A, B, C))


@pytest.mark.parametrize("max_chunk", [1, 3, 64])
def test_chunked_scan_matches_the_step_by_step_recurrence(max_chunk):
    x, delta, A, B, C = scan_inputs(0, 0.3)   # A: long and short memories
    # the total decay over all L steps fits LOG_RANGE, so max_chunk alone sets the chunks
    assert float(delta.detach().max() * (-A.detach()).max()) * x.shape[1] < mamba4rec.LOG_RANGE
    got = chunked_scan(x, delta, A, B, C, max_chunk)
    want = selective_scan_reference(x, delta, A, B, C)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), (x, delta, B, C))
    want_grads = torch.autograd.grad((want * weights).sum(), (x, delta, B, C))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_chunked_scan_stays_exact_when_decay_is_large():
    # total decay far beyond exp's float32 range: chunks shrink instead of overflowing
    torch.manual_seed(1)
    x, delta = torch.randn(2, 20, 3), torch.full((2, 20, 3), 40.0)
    A, B, C = -torch.ones(3, 2), torch.randn(2, 20, 2), torch.randn(2, 20, 2)
    got = chunked_scan(x, delta, A, B, C, max_chunk=64)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, selective_scan_reference(x, delta, A, B, C))


@pytest.mark.parametrize("delta_scale", [0.3, 3.0])
def test_sequential_scan_matches_the_recurrence_forward_and_backward(delta_scale):
    inputs = scan_inputs(2, delta_scale)
    got = SequentialScan.apply(*inputs)
    want = selective_scan_reference(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    assert torch.autograd.gradcheck(SequentialScan.apply, inputs)


def test_selective_scan_on_the_cpu_is_the_sequential_scan_in_float32():
    inputs = [t.detach().float() for t in scan_inputs(3, 1.0)]
    torch.testing.assert_close(selective_scan(*inputs), selective_scan_reference(*inputs))
    # a bfloat16 model's activations with its float32 A: computed in float32, as on the GPU
    mixed = [t if i == 2 else t.bfloat16() for i, t in enumerate(inputs)]
    got = selective_scan(*mixed)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, selective_scan_reference(*[t.float() for t in mixed]))


@pytest.mark.parametrize("ffn", ["dense", "hymoe"])
def test_mamba4rec_init_is_the_official_codes(ffn):
    # RecBole's init over the whole model: N(0, 0.02) weights and zero biases in every Linear,
    # the Mamba mixer's dt projection included, so delta starts near softplus(0) = ln 2
    torch.manual_seed(0)
    model = build_model("mamba4rec", 500, ModelConfig(**{**MODELS["mamba4rec"].paper_defaults,
                                                          "ffn": ffn}))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (6 if ffn == "dense" else 4)
    for layer in linears + [model.item_emb]:
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        if getattr(layer, "bias", None) is not None:
            assert not layer.bias.any()
    assert not model.item_emb.weight[0].any()
    if ffn == "hymoe":
        hymoe = model.hymoe_layers()[0]
        assert hymoe.expert_w1.std().item() == pytest.approx(0.02, rel=0.1)
        assert not hymoe.dense_b1.any()
    block = model.layers[0].mamba
    dt = 0.1 * torch.randn(10, block.dt_rank)      # x_proj's outputs are small at the start
    delta = torch.nn.functional.softplus(block.dt_proj(dt))
    assert delta.mean().item() == pytest.approx(math.log(2), abs=0.005)   # Mamba's: 0.001..0.1
    assert (delta - math.log(2)).abs().max().item() < 0.05
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}


def test_mamba4rec_dense_ffn_drops_its_hidden_units_like_the_official_one():
    model = small_model("mamba4rec", dropout=0.5).train()
    ffn = model.layers[0].ffn
    seen = {}
    ffn.fc2.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0]))
    model.encode(torch.randint(1, 41, (64, 8)))
    zeros = (seen["hidden"] == 0).float().mean().item()
    assert zeros == pytest.approx(0.5, abs=0.05)       # dropout between GELU and W2
    model.eval()
    model.encode(torch.randint(1, 41, (64, 8)))
    assert (seen["hidden"] == 0).float().mean().item() < 0.01


@pytest.mark.parametrize("name", ["gru4rec", "narm", "mamba4rec", "bert4rec"])
def test_padding_does_not_change_real_positions(name):
    model = small_model(name)
    short = torch.tensor([[3, 7, 9], [4, 2, 6]])
    padded = torch.tensor([[3, 7, 9, 0, 0, 0], [4, 2, 6, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded)[:, :3], model.encode(short))
        torch.testing.assert_close(model.score_next(padded), model.score_next(short))
        # in a batch with a longer history, a short one keeps its scores
        mixed = torch.tensor([[3, 7, 9, 0, 0], [1, 2, 3, 4, 5]])
        torch.testing.assert_close(model.score_next(mixed)[0], model.score_next(short[:1])[0])


@pytest.mark.parametrize("name", ["gru4rec", "narm", "mamba4rec"])
def test_recurrent_models_are_causal(name):
    model = small_model(name)
    with torch.no_grad():
        h = model.encode(torch.tensor([[3, 7, 9]]))
        torch.testing.assert_close(model.encode(torch.tensor([[3, 7, 9, 12, 5]]))[:, :3], h)


@pytest.mark.parametrize("elements,blocks", [(1, 1), (10**9, 3), (10**9, 100)])
def test_narm_attention_in_query_blocks_matches_one_block(monkeypatch, elements, blocks):
    # each block of query rows reads only the keys up to its last row: the same outputs and
    # gradients as one block over all keys, padding included
    items = torch.tensor([[3, 7, 9, 4, 11, 2, 0, 0], [5, 6, 8, 1, 0, 0, 0, 0]])
    results = []
    for setting in [(10**9, 1), (elements, blocks)]:
        monkeypatch.setattr(narm, "ATTENTION_ELEMENTS", setting[0])
        monkeypatch.setattr(narm, "QUERY_BLOCKS", setting[1])
        model = small_model("narm")
        out = model.encode(items)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [model.query_proj.weight, model.key_proj.weight])
        results.append((out, *grads))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("B,L,H,rows", [(3, 9, 5, 1), (2, 7, 4, 3), (4, 12, 6, 5), (1, 6, 3, 6)])
def test_narm_local_context_matches_its_reference(B, L, H, rows):
    # the blocked autograd.Function against plain autograd over all keys, forward and every
    # gradient, with right padding of different lengths
    gen = torch.Generator().manual_seed(B * 100 + L)
    inputs = [torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
              for shape in [(B, L, H)] * 3 + [(H,)]]
    key_mask = torch.arange(L).expand(B, L) < torch.randint(1, L + 1, (B, 1), generator=gen)
    got = narm.LocalContext.apply(*inputs, key_mask, rows)
    want = narm.local_context_reference(*inputs, key_mask)
    torch.testing.assert_close(got, want)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    for g, w in zip(torch.autograd.grad((got * weights).sum(), inputs),
                    torch.autograd.grad((want * weights).sum(), inputs)):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda *x: narm.LocalContext.apply(*x, key_mask, rows), inputs)


def test_bert4rec_masking_never_leaks_the_target():
    model = small_model("bert4rec", mask_prob=0.5)
    sequences = torch.tensor([[3, 7, 9, 4, 11, 0], [5, 6, 8, 0, 0, 0]])
    torch.manual_seed(3)
    inputs, targets = model.mask_items(sequences)
    chosen = targets > 0
    assert chosen.any(dim=1).all()                                    # every row predicts
    assert (inputs[chosen] == model.mask_token).all() and (targets[chosen] == sequences[chosen]).all()
    assert (inputs[~chosen] == sequences[~chosen]).all() and (targets[~chosen] == 0).all()
    # alter the true item at each masked position: the model's input, hence its prediction
    # there, is unchanged
    altered = torch.where(chosen, (sequences % 40) + 1, sequences)
    torch.manual_seed(3)
    inputs2, targets2 = model.mask_items(altered)
    assert torch.equal(inputs2, inputs) and torch.equal(targets2[chosen], altered[chosen])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(inputs2), model.encode(inputs))
    # next-item scoring: the appended [mask] is what is scored, never a candidate itself
    history = torch.tensor([[3, 7, 9]])
    scores = model.score_next(history)
    assert scores.shape == (1, 41)
    with torch.no_grad():
        hidden = model.encode(torch.tensor([[3, 7, 9, model.mask_token]]))[0, 3]
    torch.testing.assert_close(scores[0, 1:], hidden @ model.item_emb.weight[1:41].t())


def test_bert4rec_loss_predicts_masked_items_with_full_softmax():
    model = small_model("bert4rec").train()
    inputs, targets = torch.tensor([[3, 7, 9, 0]]), torch.tensor([[7, 9, 4, 0]])
    torch.manual_seed(5)
    task, _ = model.loss(inputs, targets)
    torch.manual_seed(5)
    masked, cloze = model.mask_items(torch.tensor([[3, 7, 9, 4, 0]]))
    hidden = model.encode(masked)
    chosen = cloze > 0
    want = torch.nn.functional.cross_entropy(hidden[chosen] @ model.item_emb.weight[1:41].t(),
                                             cloze[chosen] - 1)
    assert task.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_bert4rec_seen_offset_scores_the_visible_window_items(fused):
    """With seen_bias each masked position's scores get the offset at the items left
    unmasked in its window (here 3 and 4; never the masked 7 and 9), in training; ranking
    gives it to every history item."""
    model = small_model("bert4rec", seen_bias=True, fused_loss=fused).train()
    with torch.no_grad():
        model.seen_offset.fill_(-1.5)
    window = torch.tensor([[3, 7, 9, 4, 0]])
    masked = torch.tensor([[3, model.mask_token, model.mask_token, 4, 0]])
    model.mask_items = lambda sequences: (masked, torch.tensor([[0, 7, 9, 0, 0]]))
    chosen = torch.tensor([[False, True, True, False, False]])
    assert torch.equal(model.visible_items(masked, chosen),
                       torch.tensor([[3, 0, 0, 4, 0], [3, 0, 0, 4, 0]]))
    torch.manual_seed(5)
    task, _ = model.loss(window[:, :-1], window[:, 1:])
    torch.manual_seed(5)
    hidden = model.encode(masked)[chosen]
    offset = torch.zeros(40)
    offset[[2, 3]] = -1.5
    want = torch.nn.functional.cross_entropy(hidden @ model.item_emb.weight[1:41].t() + offset,
                                             torch.tensor([7, 9]) - 1)
    assert task.item() == pytest.approx(want.item(), rel=1e-5)
    task.backward()
    assert model.seen_offset.grad != 0
    model.eval()
    plain = model.score_next(torch.tensor([[3, 7, 9]]))
    with torch.no_grad():
        model.seen_offset.zero_()
    torch.testing.assert_close(plain[0, [3, 7, 9]] + 1.5, model.score_next(
        torch.tensor([[3, 7, 9]]))[0, [3, 7, 9]])


def test_paired_test_and_budget_parsing():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    same = reproduce.paired_test(base, base)
    assert same["mean_diff"] == 0 and same["p_permutation"] == 1.0
    better = reproduce.paired_test(base + 0.05 + 0.01 * rng.standard_normal(400), base)
    assert better["p_permutation"] < 0.001 and better["t"] > 10
    assert better["ci95"][0] < better["mean_diff"] < better["ci95"][1]
    noise = reproduce.paired_test(base + 0.01 * rng.standard_normal(400), base)
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
    want = reproduce.paired_test(fresh["results"][hymoe]["ndcg10_per_user"],
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
    return {"command": ["python", "-m", "hymoerec.reproduce", *command_data, "--seeds", "1"],
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
