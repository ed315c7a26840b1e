"""The BSARec backbone: its causal frequency filter against BSARec's windowed FFT, causality
and padding independence of the whole model, training with either FFN, and a run of train.py."""
import functools
import math

import pytest
import torch

from hymoerec import evaluate, train
from hymoerec.models import MODELS
from hymoerec.models.bsarec import FrequencyFilter, causal_low_pass
from test_baselines import small_model
from train_cases import keep_thread_count, run  # noqa: F401 (fixture)

small_bsarec = functools.partial(small_model, "bsarec")   # tiny, eval mode, no dropout


def windowed_fft_filter(x, window, low_freqs, beta):
    """BSARec's filter read at the last position of the window that ends at each position t
    of x (B, L, D), zeros before position 0: (B, L, D) float64, one rfft per position."""
    B, L, D = x.shape
    out = torch.empty(B, L, D, dtype=torch.float64)
    for t in range(L):
        w = torch.zeros(B, window, D, dtype=torch.float64)
        w[:, window - 1 - t:] = x[:, :t + 1].double()
        spectrum = torch.fft.rfft(w, dim=1, norm="ortho")
        spectrum[:, low_freqs // 2 + 1:] = 0
        low = torch.fft.irfft(spectrum, n=window, dim=1, norm="ortho")[:, -1]
        out[:, t] = low + beta.double() * (w[:, -1] - low)
    return out


@pytest.mark.parametrize("window,low_freqs,length", [(12, 5, 12), (12, 5, 7), (12, 1, 12),
                                                     (50, 5, 50), (9, 3, 9), (10, 8, 10)])
def test_frequency_filter_is_bsarecs_fft_of_the_window_ending_at_each_position(
        window, low_freqs, length):
    torch.manual_seed(1)
    layer = FrequencyFilter(window, low_freqs, d_model=4)
    x = torch.randn(3, length, 4)
    want = windowed_fft_filter(x, window, low_freqs, layer.sqrt_beta.detach() ** 2)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_low_pass_keeps_the_mean_and_passes_everything_when_every_bin_is_kept():
    kernel = causal_low_pass(10, 1)   # DC only: the window's mean
    torch.testing.assert_close(kernel, torch.full((10, 10), 0.1).tril())
    torch.testing.assert_close(causal_low_pass(10, 11), torch.eye(10))   # bins 0..5: all
    layer = FrequencyFilter(10, 11, d_model=3)
    x = torch.randn(2, 10, 3)
    torch.testing.assert_close(layer(x), x)   # no high frequencies left to rescale


@pytest.mark.parametrize("ffn", ["dense", "hymoe"])
def test_shapes_dtype_and_scores(ffn):
    model = small_bsarec(ffn)
    inputs = torch.tensor([[3, 7, 9, 0], [5, 1, 2, 8]])
    with torch.no_grad():
        hidden = model.encode(inputs)
        scores = model.score_next(inputs)
    assert hidden.shape == (2, 4, 16) and hidden.dtype == torch.float32
    assert scores.shape == (2, 41) and torch.isinf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()
    assert len(model.hymoe_layers()) == (2 if ffn == "hymoe" else 0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model.encode(torch.ones(1, 9, dtype=torch.long))


def encode_seeded(model, items):
    """model.encode(items) under a fixed dropout seed and HyMoE warm-up step (full alpha),
    so two calls differ only where their inputs do."""
    for layer in model.hymoe_layers():
        layer.set_step(layer.warmup_steps)
    torch.manual_seed(5)
    return model.encode(items)


@pytest.mark.parametrize("ffn", ["dense", "hymoe"])
@pytest.mark.parametrize("training", [False, True])
def test_later_items_never_change_an_earlier_position(ffn, training):
    model = small_bsarec(ffn, dropout=0.3).train(training)
    items = torch.tensor([[3, 7, 9, 12, 5, 1, 30, 22], [4, 2, 6, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        base = encode_seeded(model, items)
        for t in range(items.shape[1] - 1):
            changed = items.clone()
            changed[:, t + 1:] = torch.where(items[:, t + 1:] > 0, 40 - items[:, t + 1:], 0)
            changed[1, t + 1] = 17   # a later real item where row 1 had padding
            out = encode_seeded(model, changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1])
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])   # it did change there
        earlier = items.clone()
        earlier[0, 0] = 11
        out = encode_seeded(model, earlier)
        # an earlier item reaches every later position (through the filter and attention)
        assert all(not torch.allclose(out[0, t], base[0, t]) for t in range(8))


def test_padding_and_the_batch_length_do_not_change_a_real_position():
    model = small_bsarec("hymoe")
    short = torch.tensor([[3, 7, 9]])
    padded = torch.tensor([[3, 7, 9, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        hidden = model.encode(short)
        torch.testing.assert_close(model.encode(padded)[:, :3], hidden)
        torch.testing.assert_close(model.score_next(padded), model.score_next(short))
        targets = torch.tensor([12])
        assert torch.equal(model.rank_next(padded, targets), model.rank_next(short, targets))


@pytest.mark.parametrize("ffn", ["dense", "hymoe"])
def test_one_training_step_with_either_ffn(ffn):
    model = small_bsarec(ffn, dropout=0.2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs = torch.tensor([[3, 7, 9, 12, 0], [5, 1, 2, 8, 6]])
    targets = torch.tensor([[7, 9, 12, 4, 0], [1, 2, 8, 6, 11]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task, aux = model.loss(inputs, targets)
    assert torch.isfinite(task) and (aux.item() < 0 if ffn == "hymoe" else aux.item() == 0)
    (task + aux).backward()
    for block in model.blocks:
        assert block.filter.sqrt_beta.grad.abs().sum() > 0
    optimizer.step()
    after = model.state_dict()
    for name in ("blocks.0.filter.sqrt_beta", "blocks.1.attn.qkv.weight", "item_emb.weight"):
        assert not torch.equal(after[name], before[name]), name


def test_the_filter_weight_mixes_the_two_branches():
    """alpha = 1 leaves attention out, alpha = 0 the filter; in between both count."""
    items = torch.tensor([[3, 7, 9, 12, 5]])
    outputs = {}
    for alpha in (0.0, 0.7, 1.0):
        model = small_bsarec(filter_weight=alpha)
        with torch.no_grad():
            outputs[alpha] = model.encode(items)
            for block in model.blocks:
                block.attn.out.weight.mul_(3.0)    # only the attention branch changes
            outputs[alpha, "attention"] = model.encode(items)
            for block in model.blocks:
                block.attn.out.weight.div_(3.0)
                block.filter.sqrt_beta.mul_(3.0)   # only the filter branch changes
            outputs[alpha, "filter"] = model.encode(items)
    torch.testing.assert_close(outputs[1.0, "attention"], outputs[1.0])
    assert not torch.allclose(outputs[1.0, "filter"], outputs[1.0])
    torch.testing.assert_close(outputs[0.0, "filter"], outputs[0.0])
    assert not torch.allclose(outputs[0.0, "attention"], outputs[0.0])
    for branch in ("attention", "filter"):
        assert not torch.allclose(outputs[0.7, branch], outputs[0.7])


@pytest.mark.parametrize("ffn", ["dense", "hymoe"])
def test_a_tiny_run_through_train_main(ffn, tmp_path):
    summary = run(tmp_path, "run", "--epochs", "1", "--model", "bsarec", "--ffn", ffn,
                  "--max-len", "10")
    config = summary["config"]
    assert config["model"] == "bsarec" and config["ffn"] == ffn
    paper = MODELS["bsarec"].paper_defaults
    assert (config["n_heads"], config["dropout"], config["lr"]) == \
        (paper["n_heads"], paper["dropout"], paper["lr"])
    assert (config["filter_weight"], config["low_freqs"]) == (0.7, 5)
    assert all(math.isfinite(summary["test"][k]) for k in ("HR@10", "NDCG@10"))
    model = evaluate.Recommender.from_checkpoint(tmp_path / "run").model
    assert model.config.low_freqs == 5 and len(model.hymoe_layers()) == (2 if ffn == "hymoe" else 0)
    torch.testing.assert_close(model.blocks[0].filter.low_pass, causal_low_pass(10, 5))


@pytest.mark.parametrize("flags, message", [
    (["--filter-weight", "1.5"], "filter_weight must be in [0, 1], got 1.5"),
    (["--low-freqs", "0"], "low_freqs must be >= 1, got 0"),
])
def test_bad_bsarec_settings_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--model", "bsarec", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
