"""Loss / scoring primitives, the SASRec backbone (causality, padding masking) and the registry."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from hymoerec.models import (MODELS, ModelConfig, build_model, full_item_scores,
                             full_softmax_loss, register)
from hymoerec.models.base import SequentialRecommender


def small_model(ffn="hymoe", n_items=40, **overrides):
    """A small SASRec; without the seen-item offset unless ``seen_bias=True`` is given."""
    torch.manual_seed(0)
    config = ModelConfig(**{"max_len": 8, "d_model": 16, "n_heads": 2, "ffn": ffn,
                            "dropout": 0.0, "seen_bias": False, **overrides})
    return build_model("sasrec", n_items, config).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_full_softmax_loss_is_cross_entropy_over_the_real_items(fused):
    """Both paths (the fused linear_cross_entropy, tested against F.cross_entropy in
    tests/kernels/cross_entropy/test_lce_dispatch.py, and the plain one) score the items
    1..V, never the padding row 0, which gets no gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(600, 8, requires_grad=True)   # > one row chunk
    emb = torch.randn(31, 8, requires_grad=True)
    targets = torch.randint(1, 31, (600,))
    loss = full_softmax_loss(hidden, emb, targets, fused=fused)
    grads = torch.autograd.grad(3 * loss, [hidden, emb])
    h2, e2 = hidden.detach().requires_grad_(), emb.detach().clone().requires_grad_()
    want = F.cross_entropy(h2 @ e2[1:].t(), targets - 1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(3 * want, [h2, e2])):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert grads[1][0].abs().max() == 0  # padding row gets no gradient


def test_full_item_scores_never_rank_padding():
    scores = full_item_scores(torch.ones(2, 3), torch.ones(5, 3))
    assert scores.shape == (2, 5) and torch.isinf(scores[:, 0]).all() and (scores[:, 1:] == 3).all()


@pytest.mark.parametrize("ffn,head", [
    ("hymoe", {}), ("dense", {}), ("hymoe", {"output_head": True}),
    ("hymoe", {"output_head": True, "head_skip": 0.5})])
def test_padding_and_later_items_do_not_change_earlier_positions(ffn, head):
    model = small_model(ffn, **head)
    short = torch.tensor([[3, 7, 9]])
    padded = torch.tensor([[3, 7, 9, 0, 0, 0]])
    longer = torch.tensor([[3, 7, 9, 12, 5, 1]])
    with torch.no_grad():
        h = model.encode(short)
        torch.testing.assert_close(model.encode(padded)[:, :3], h)
        torch.testing.assert_close(model.encode(longer)[:, :3], h)
        torch.testing.assert_close(model.score_next(padded), model.score_next(short))


def test_router_statistics_exclude_padding():
    model = small_model("hymoe").train()
    with torch.no_grad():
        model.encode(torch.tensor([[3, 7, 9, 4]]))
        unpadded = [layer.stats()["gbar"] for layer in model.hymoe_layers()]
        model.encode(torch.tensor([[3, 7, 9, 4, 0, 0, 0, 0]]))
        padded = [layer.stats()["gbar"] for layer in model.hymoe_layers()]
    assert len(unpadded) == 2
    for a, b in zip(unpadded, padded):
        assert a == pytest.approx(b, abs=1e-4)


def test_loss_ignores_padding_targets_and_includes_aux_loss():
    model = small_model("hymoe").train()
    inputs = torch.tensor([[3, 7, 9, 0], [5, 0, 0, 0]])
    targets = torch.tensor([[7, 9, 4, 0], [6, 0, 0, 0]])
    task, aux = model.loss(inputs, targets)
    hidden = model.encode(inputs)
    real = targets > 0
    want = F.cross_entropy(hidden[real] @ model.item_emb.weight[1:].t(), targets[real] - 1)
    assert task.item() == pytest.approx(want.item(), rel=1e-5)
    assert aux.item() == pytest.approx(sum(l.aux_loss.item() for l in model.hymoe_layers()))
    assert aux.item() < 0  # lb * sum gbar log gbar is negative
    _, dense_aux = small_model("dense").train().loss(inputs, targets)
    assert dense_aux.item() == 0


def test_a_recommender_is_copied_and_averaged_between_training_steps():
    """Keep-the-best and SWA copies of a HyMoE recommender work after a training step; the
    copy scores like the original."""
    model = small_model("hymoe").train()
    inputs, targets = torch.tensor([[3, 7, 9, 0]]), torch.tensor([[7, 9, 4, 0]])
    sum(model.loss(inputs, targets)).backward()
    best, swa = copy.deepcopy(model), AveragedModel(model)
    swa.update_parameters(model)
    want = model.eval().encode(inputs)
    torch.testing.assert_close(best.eval().encode(inputs), want, rtol=0, atol=0)
    torch.testing.assert_close(swa.module.eval().encode(inputs), want, rtol=0, atol=0)


def test_registry_and_config_validation():
    assert "sasrec" in MODELS
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("nope", 10, ModelConfig())
    with pytest.raises(ValueError, match="already registered"):
        register("sasrec")(SequentialRecommender)
    with pytest.raises(ValueError, match="ffn must be one of"):
        ModelConfig(ffn="sparse")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="exceeds max_len"):
        small_model().encode(torch.ones(1, 9, dtype=torch.long))


def test_output_head_transforms_the_last_block_output():
    plain, headed = small_model(), small_model(output_head=True)
    assert isinstance(plain.head, torch.nn.Identity)
    linear, norm = headed.head[0], headed.head[2]
    assert abs(linear.weight.std().item() - 0.02) < 0.005 and not linear.bias.any()
    headed.load_state_dict(plain.state_dict() | {f"head.{k}": v for k, v in
                                                  headed.head.state_dict().items()})
    items = torch.tensor([[3, 7, 9, 0], [5, 1, 2, 8]])
    with torch.no_grad():
        want = norm(F.gelu(linear(plain.encode(items))))
        torch.testing.assert_close(headed.encode(items), want)
        assert not torch.allclose(headed.encode(items), plain.encode(items))
    for model in (name for name, cls in MODELS.items() if not cls.has_output_head):
        with pytest.raises(ValueError, match="no output head"):
            build_model(model, 10, ModelConfig(output_head=True, ffn="dense"))


def test_head_skip_adds_the_last_block_output_back():
    headed, skipped = small_model(output_head=True), small_model(output_head=True, head_skip=0.5)
    skipped.load_state_dict(headed.state_dict())
    items = torch.tensor([[3, 7, 9, 0], [5, 1, 2, 8]])
    with torch.no_grad():
        blocks_out = skipped.encode(items) - headed.encode(items)
        headed.head = torch.nn.Identity()
        torch.testing.assert_close(blocks_out, 0.5 * headed.encode(items))
    with pytest.raises(ValueError, match="head_skip=0.5 needs output_head"):
        ModelConfig(head_skip=0.5)


@pytest.mark.parametrize("exclude", [False, True])
def test_streamed_ranks_equal_ranks_of_full_scores(exclude):
    from hymoe_kernels.cross_entropy import target_ranks
    model = small_model(n_items=300)
    inputs = torch.tensor([[3, 7, 9, 0], [5, 0, 0, 0], [1, 2, 3, 4]])
    targets = torch.tensor([12, 5, 250])
    history = inputs if exclude else None
    with torch.no_grad():
        want = target_ranks(model.score_next(inputs), targets, history)
        got = model.rank_next(inputs, targets, history)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_hymoe_starts_like_the_dense_ffn_it_replaces(model):
    """At warm-up step 0 (alpha = 0) a HyMoE model is the dense model whose FFNs hold the
    HyMoE layers' dense experts, and both start from the same N(0, 0.02) / zero-bias init."""
    config = dict(max_len=8, d_model=32, n_heads=2, dropout=0.0, seen_bias=False)
    hymoe = build_model(model, 40, ModelConfig(ffn="hymoe", **config)).eval()
    dense = build_model(model, 40, ModelConfig(ffn="dense", **config)).eval()
    state = {k: v for k, v in hymoe.state_dict().items() if ".ffn." not in k}
    for i, block in enumerate(hymoe.blocks):
        ffn = block.ffn
        name = f"blocks.{i}.ffn"
        state |= {f"{name}.fc1.weight": ffn.dense_w1.T, f"{name}.fc1.bias": ffn.dense_b1,
                  f"{name}.fc2.weight": ffn.dense_w2.T, f"{name}.fc2.bias": ffn.dense_b2}
        assert int(ffn.step) == 0 and not ffn.dense_b1.any() and not ffn.expert_b2.any()
        for w in (ffn.dense_w1, ffn.expert_w1, ffn.expert_w2):
            assert abs(float(w.std()) - 0.02) < 0.003
    dense.load_state_dict(state)
    inputs = torch.tensor([[3, 7, 9, 0], [5, 1, 2, 4]])
    with torch.no_grad():
        torch.testing.assert_close(hymoe.score_next(inputs), dense.score_next(inputs),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_seen_offset_loss_adds_the_offset_to_the_items_seen_up_to_each_position(fused):
    from hymoerec.models.scoring import seen_items
    torch.manual_seed(0)
    inputs = torch.tensor([[3, 5, 3, 9, 0], [7, 2, 0, 0, 0]])
    targets = torch.tensor([[5, 3, 9, 4, 0], [2, 8, 0, 0, 0]])
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    emb = torch.randn(12, 6, requires_grad=True)
    offset = torch.tensor(-0.7, requires_grad=True)
    real = targets > 0
    seen = seen_items(inputs, targets)
    assert seen.tolist()[:4] == [[3, 0, 0, 0, 0], [3, 5, 0, 0, 0], [3, 5, 3, 0, 0],
                                 [3, 5, 3, 9, 0]]
    loss = full_softmax_loss(hidden[real], emb, targets[real], fused, seen, offset)
    terms = []  # one position at a time
    for b, t in real.nonzero().tolist():
        scores = hidden[b, t] @ emb[1:].t()
        listed = torch.zeros(11)
        listed[inputs[b, :t + 1] - 1] = 1.0
        terms.append(F.cross_entropy((scores + offset * listed)[None], targets[b, t][None] - 1))
    want = torch.stack(terms).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    got_grads = torch.autograd.grad(loss, [hidden, emb, offset])
    for got, expected in zip(got_grads, torch.autograd.grad(want, [hidden, emb, offset])):
        torch.testing.assert_close(got, expected)
    zero = full_softmax_loss(hidden[real], emb, targets[real], fused, seen, torch.tensor(0.0))
    assert zero.item() == pytest.approx(full_softmax_loss(hidden[real], emb, targets[real],
                                                          fused=False).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seen_bias_scores_the_input_items_by_the_learned_offset(name):
    from hymoe_kernels.cross_entropy import target_ranks
    torch.manual_seed(0)
    config = ModelConfig(max_len=6, d_model=16, n_heads=2, ffn="dense", dropout=0.0,
                         seen_bias=True, n_layers=1)
    model = build_model(name, 30, config).eval()
    assert model.seen_offset.item() == 0.0 and "seen_offset" in model.state_dict()
    inputs = torch.tensor([[3, 7, 9, 0], [5, 0, 0, 0]])
    targets = torch.tensor([7, 11])
    with torch.no_grad():
        plain = model.score_next(inputs)
        model.seen_offset.fill_(-2.0)
        scores = model.score_next(inputs)
        assert torch.equal(model.rank_next(inputs, targets), target_ranks(scores, targets))
        _, top = model.top_next(inputs, 3)
    torch.testing.assert_close(plain[0, [3, 7, 9]] - 2.0, scores[0, [3, 7, 9]])
    torch.testing.assert_close(plain[0, [1, 2, 4]], scores[0, [1, 2, 4]])
    assert torch.equal(top, scores.topk(3, dim=1).indices)
    task, _ = model.train().loss(inputs, torch.tensor([[7, 9, 2, 0], [1, 0, 0, 0]]))
    task.backward()
    assert model.seen_offset.grad is not None and model.seen_offset.grad != 0



@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_positions_counted_back_from_the_most_recent_item(model):
    """positions="last": a row's items get the positions they would have left-padded to
    max_len, so the same items give the same last-position output whatever the padding."""
    torch.manual_seed(0)
    config = ModelConfig(max_len=6, d_model=8, n_heads=2, ffn="dense", dropout=0.0,
                         positions="last")
    net = build_model(model, 20, config).eval()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    P = net.pos_emb.num_embeddings
    expected = torch.stack([net.pos_emb.weight[[P - 3, P - 2, P - 1, P - 1, P - 1]],
                            net.pos_emb.weight[P - 5:P]])
    assert torch.equal(net.positions(mask), expected)
    short, padded = torch.tensor([[3, 4, 5]]), torch.tensor([[3, 4, 5, 0, 0]])
    assert torch.allclose(net.encode(short)[:, 2], net.encode(padded)[:, 2], atol=1e-6)


def test_sampled_softmax_over_every_item_is_the_full_softmax():
    from hymoerec.models.scoring import sampled_softmax_loss, seen_items
    torch.manual_seed(0)
    V, D = 30, 8
    item_emb = torch.randn(V + 1, D)
    inputs = torch.randint(1, V + 1, (4, 6))
    targets = torch.randint(1, V + 1, (4, 6))
    hidden = torch.randn(int((targets > 0).sum()), D)
    offset = torch.tensor(-0.7)
    seen = seen_items(inputs, targets)
    full = full_softmax_loss(hidden, item_emb, targets[targets > 0], False, seen, offset)
    sampled = sampled_softmax_loss(hidden, item_emb, targets[targets > 0],
                                   torch.arange(1, V + 1), seen, offset)
    assert torch.allclose(sampled, full, atol=1e-5)
    fewer = sampled_softmax_loss(hidden, item_emb, targets[targets > 0], torch.arange(1, 6))
    assert fewer < full


def test_sampled_softmax_trains_sasrec():
    torch.manual_seed(0)
    model = build_model("sasrec", 30, ModelConfig(max_len=6, d_model=8, ffn="dense",
                                                 negatives=5, seen_bias=True))
    inputs, targets = torch.randint(1, 31, (3, 6)), torch.randint(1, 31, (3, 6))
    task, _ = model.loss(inputs, targets)
    task.backward()
    assert torch.isfinite(task) and model.item_emb.weight.grad.abs().sum() > 0
