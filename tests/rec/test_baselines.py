"""Baseline backbones (GRU4Rec, NARM, BERT4Rec, Mamba4Rec) and --ffn inside each backbone."""
import math

import pytest
import torch

from hymoerec import options, train
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
    also hold training flags such as lr), small widths, no dropout, no seen-item offset
    unless ``seen_bias=True``, then ``overrides``."""
    torch.manual_seed(0)
    paper = {k: v for k, v in MODELS[name].paper_defaults.items()
             if k in ModelConfig.__dataclass_fields__}
    fields = {**paper, "max_len": 8, "d_model": 16, "rnn_hidden": 12, "d_state": 4,
              "dropout": 0.0, "ffn": ffn, "seen_bias": False, **overrides}
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
    args = options.parse_args(["--model", "mamba4rec"])
    assert (args.n_layers, args.ffn, args.d_state, args.dropout) == (1, "dense", 32, 0.2)
    args = options.parse_args(["--model", "mamba4rec", "--ffn", "hymoe", "--n-layers", "2"])
    assert (args.n_layers, args.ffn) == (2, "hymoe")
    assert options.parse_args([]).ffn == "hymoe"            # sasrec keeps the shared defaults
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
                                                          "ffn": ffn, "seen_bias": False}))
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
