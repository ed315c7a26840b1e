"""Upcycling: HyMoEFFN.from_dense, replace_ffn (torch transformer layers, the project's
backbones, caller-given (up, down) pairs), hymoe_aux_loss / hymoe_stats, the README example,
and upcycle_to_hymoe for the trainer."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hymoe_kernels import HyMoEFFN, hymoe_aux_loss, hymoe_stats, replace_ffn
from hymoe_kernels.upcycle import HyMoETransformerDecoderLayer, HyMoETransformerEncoderLayer
from hymoerec.models import ModelConfig, build_model
from hymoerec.models.upcycling import upcycle_to_hymoe
from kernel_cases import DEVICE

README = Path(__file__).resolve().parents[2] / "README.md"


def dense_pair(d_model=8, d_ff=16, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    up, down = nn.Linear(d_model, d_ff, bias=bias), nn.Linear(d_ff, d_model, bias=bias)
    return up.to(DEVICE, dtype), down.to(DEVICE, dtype)


def dense_ffn(up, down, x):
    return down(F.gelu(up(x)))


def rel_diff(got, want):
    """max |got - want| / max |want|, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def assert_preserved(got, want, truth):
    """fp32: within 1e-6 of the largest output (the rounding of the same GEMMs). bf16: its
    error against ``truth`` (the float64 FFN of the same bf16 weights and input) at most
    twice the dense bf16 FFN's own (in norm): within bf16 rounding."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        assert rel_diff(got, want) <= 1e-6, rel_diff(got, want)
    else:
        err, dense_err = ((t.detach().double() - truth).norm() for t in (got, want))
        assert err <= 2 * dense_err, (err, dense_err)


def float64_ffn(up, down, x):
    return F.linear(F.gelu(F.linear(x.double(), up.weight.double(), up.bias.double())),
                    down.weight.double(), down.bias.double())


@pytest.mark.parametrize("backend, path, expert_init", [
    ("torch", None, "copy"), ("torch", None, "drop"), ("torch", None, "random"),
    ("reference", None, "drop"), ("triton", None, "drop"), ("triton", "grouped", "drop")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_dense_preserves_function_at_step_zero(backend, path, expert_init, dtype):
    """Against the dense FFN in the same dtype (see assert_preserved). The layer's triton
    backend takes the fused-tile path at this size; the grouped path is called directly."""
    up, down = dense_pair(dtype=dtype)
    x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    want, truth = dense_ffn(up, down, x), float64_ffn(up, down, x)
    layer = HyMoEFFN.from_dense(up, down, expert_init=expert_init, backend=backend,
                                noise_std=0.01)
    if path is not None:
        from hymoe_kernels.hymoe_op.triton_backend import hymoe_triton
        y = hymoe_triton(x.reshape(-1, 8), None, layer.weights(), layer.alpha_param,
                         layer.ramp(), layer.top_k, path=path)[0]
        assert_preserved(y.reshape(x.shape), want, truth)
        return
    for mode in ("eval", "train"):            # the first training forward is at step 0 too
        assert_preserved(layer.train(mode == "train")(x), want, truth)
    assert int(layer.step) == 1 and layer.stats()["alpha"] == 0.0


def test_from_dense_copies_weights_and_starts_router_small():
    up, down = dense_pair(d_model=16, d_ff=64)
    layer = HyMoEFFN.from_dense(up, down, num_experts=3, router_std=0.01)
    dense = (up.weight.t(), up.bias, down.weight.t(), down.bias)
    for name, want in zip(("w1", "b1", "w2", "b2"), dense):
        assert torch.equal(getattr(layer, f"dense_{name}"), want)
        assert torch.equal(getattr(layer, f"expert_{name}"), want.expand(3, *want.shape))
    assert float(layer.router_w2.std()) == pytest.approx(0.01, rel=0.2)
    assert not layer.router_b2.any() and float(layer.alpha_param) == 0 and int(layer.step) == 0
    assert layer.dense_w1.device == up.weight.device


@pytest.mark.parametrize("expert_init, ratio", [("drop", 0.25), ("drop", 0.5), ("random", 1.0)])
def test_drop_upcycling_reinitialises_a_fraction_of_hidden_units(expert_init, ratio):
    up, down = dense_pair(d_model=32, d_ff=128)
    layer = HyMoEFFN.from_dense(up, down, num_experts=4, expert_init=expert_init,
                                drop_ratio=ratio)
    dense = (up.weight.t(), up.bias, down.weight.t())
    subsets = []
    for e in range(4):
        # hidden unit j: column j of W1, entry j of b1, row j of W2 -- the same units in all
        changed = [(layer.expert_w1[e] != dense[0]).any(0), layer.expert_b1[e] != dense[1],
                   (layer.expert_w2[e] != dense[2]).any(1)]
        assert torch.equal(changed[0], changed[1]) and torch.equal(changed[0], changed[2])
        assert int(changed[0].sum()) == round(ratio * 128)
        subsets.append(changed[0])
        kept = ~changed[0]
        assert torch.equal(layer.expert_w1[e][:, kept], dense[0][:, kept])
        fresh = layer.expert_w1[e][:, changed[0]]          # drawn from the dense statistics
        assert float(fresh.std()) == pytest.approx(float(dense[0].std()), rel=0.15)
        assert abs(float(fresh.mean() - dense[0].mean())) < 0.1 * float(dense[0].std())
    assert torch.equal(layer.expert_b2, down.bias.expand(4, -1))
    if ratio < 1:
        assert len({tuple(s.tolist()) for s in subsets}) == 4   # a different subset each


def test_noise_breaks_copies():
    up, down = dense_pair(d_model=32, d_ff=128)
    layer = HyMoEFFN.from_dense(up, down, noise_std=0.003)
    noise = layer.expert_w1 - up.weight.t()
    assert float(noise.std()) == pytest.approx(0.003, rel=0.1)
    assert torch.equal(layer.dense_w1, up.weight.t())


def test_from_dense_without_biases():
    up, down = dense_pair(bias=False)
    layer = HyMoEFFN.from_dense(up, down, backend="reference")
    x = torch.randn(7, 8, device=DEVICE)
    assert not layer.dense_b1.any() and not layer.dense_b2.any()
    assert rel_diff(layer(x), dense_ffn(up, down, x)) <= 1e-6


@pytest.mark.parametrize("activation, name", [
    ("relu", "relu"), (F.relu, "relu"), (nn.ReLU(), "ReLU()"), (F.silu, "silu"),
    (nn.GELU(approximate="tanh"), "GELU(approximate='tanh')")])
def test_from_dense_refuses_other_activations_by_name(activation, name):
    up, down = dense_pair()
    with pytest.raises(ValueError, match=re.escape(f"activation {name} is not exact GELU")):
        HyMoEFFN.from_dense(up, down, activation=activation)


@pytest.mark.parametrize("activation", ["gelu", F.gelu, nn.GELU()])
def test_from_dense_accepts_exact_gelu(activation):
    HyMoEFFN.from_dense(*dense_pair(), activation=activation)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(down=nn.Linear(16, 9)), ValueError, r"down must be Linear\(16, 8\)"),
    (dict(up=nn.Conv1d(8, 16, 1)), TypeError, "up must be an nn.Linear"),
    (dict(warmup_steps=0), ValueError, "warmup_steps must be >= 1"),
    (dict(expert_init="clone"), ValueError, "expert_init"),
    (dict(drop_ratio=1.5), ValueError, "drop_ratio"),
    (dict(noise_std=float("nan")), ValueError, "noise_std"),
    (dict(top_k=5), ValueError, "top_k")])
def test_from_dense_errors(kwargs, error, match):
    up, down = dense_pair()
    args = dict(up=up, down=down)
    args.update({k: kwargs.pop(k).to(DEVICE) for k in ("up", "down") if k in kwargs})
    with pytest.raises(error, match=match):
        HyMoEFFN.from_dense(args["up"], args["down"], **kwargs)


def encoder(activation="gelu", layers=2, **kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, activation=activation,
                                       batch_first=True, **kw)
    return nn.TransformerEncoder(layer, num_layers=layers).eval()


def test_replace_ffn_on_transformer_encoder_keeps_outputs_incl_fast_path():
    model = encoder()
    x = torch.randn(3, 6, 16)
    padding = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]],
                           dtype=torch.bool)
    real = ~padding
    slow = model(x, src_key_padding_mask=padding)
    with torch.no_grad():                    # inference fast path (nested tensors, fused FFN)
        fast = model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(fast[real], slow[real], rtol=1e-5, atol=1e-5)

    names = replace_ffn(model)
    assert names == ["layers.0.ffn", "layers.1.ffn"]
    for layer in model.layers:
        assert type(layer) is HyMoETransformerEncoderLayer and not hasattr(layer, "linear1")
        assert isinstance(layer.ffn, HyMoEFFN) and not layer.ffn.training
    assert not any("linear" in key for key in model.state_dict())
    after = model(x, src_key_padding_mask=padding)
    with torch.no_grad():                    # the fast path is off now, and must not fail
        after_no_grad = model(x, src_key_padding_mask=padding)
    assert rel_diff(after, slow) <= 1e-6 and rel_diff(after_no_grad, slow) <= 1e-6
    torch.testing.assert_close(after_no_grad[real], fast[real], rtol=1e-5, atol=1e-5)


def test_replaced_encoder_trains_experts_and_router_once_warm_up_starts():
    model = encoder(dropout=0.0).train()
    replace_ffn(model, warmup_steps=10, expert_init="drop")
    x = torch.randn(2, 5, 16)
    ffn = model.layers[0].ffn
    grads = []
    for _ in range(2):
        model.zero_grad()
        (model(x).square().mean() + hymoe_aux_loss(model)).backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in ffn.named_parameters()})
    assert grads[0]["expert_w1"] == 0 and grads[0]["router_w2"] > 0   # alpha 0: aux loss only
    assert grads[1]["expert_w1"] > 0 and grads[1]["expert_w2"] > 0 and grads[1]["router_w1"] > 0
    assert grads[1]["alpha_param"] > 0 and grads[1]["dense_w1"] > 0


def test_replace_ffn_on_named_torch_layers_only():
    model = encoder(layers=3)
    assert replace_ffn(model, which=["layers.2"]) == ["layers.2.ffn"]
    assert [type(m).__name__ for m in model.layers] == [
        "TransformerEncoderLayer", "TransformerEncoderLayer", "HyMoETransformerEncoderLayer"]
    with pytest.raises(TypeError, match="which must be"):
        replace_ffn(model, which="layers.0")


def test_replace_ffn_on_transformer_decoder():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, activation=F.gelu,
                                       batch_first=True, norm_first=True)
    model = nn.TransformerDecoder(layer, num_layers=2).eval()
    tgt, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    want = model(tgt, memory)
    assert replace_ffn(model, num_experts=2, top_k=1) == ["layers.0.ffn", "layers.1.ffn"]
    assert type(model.layers[1]) is HyMoETransformerDecoderLayer
    assert rel_diff(model(tgt, memory), want) <= 1e-6


def test_non_gelu_layers_are_refused_by_name_and_nothing_changes():
    model = nn.Sequential(encoder(), encoder(activation="relu", layers=1))
    with pytest.raises(ValueError, match=r"'1\.layers\.0' \(TransformerEncoderLayer\): "
                                         r"activation relu is not exact GELU") as err:
        replace_ffn(model)
    assert "'0.layers.0'" not in str(err.value)
    assert all(type(m) is nn.TransformerEncoderLayer for m in model.modules()
               if isinstance(m, nn.TransformerEncoderLayer))


def test_subclasses_of_torch_layers_are_reported():
    class MyLayer(nn.TransformerEncoderLayer):
        pass

    model = nn.ModuleList([MyLayer(16, 2, 32, activation="gelu")])
    with pytest.raises(ValueError, match=r"'0' \(MyLayer\): a subclass"):
        replace_ffn(model)


class MLP(nn.Module):
    def __init__(self, activation: nn.Module):
        super().__init__()
        self.w_in, self.act, self.w_out = nn.Linear(16, 48), activation, nn.Linear(48, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.w_out(self.act(self.w_in(x))))


class Net(nn.Module):
    def __init__(self, activation: nn.Module = nn.GELU()):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mlps = nn.ModuleList([MLP(activation), MLP(activation)])

    def forward(self, x):
        for mlp in self.mlps:
            x = x + mlp(self.norm(x))
        return x


@pytest.mark.parametrize("which", [{"mlps.0": ("w_in", "w_out", "drop"), "mlps.1":
                                    ("w_in", "w_out", "drop")}, {MLP: ("w_in", "w_out", "drop")}])
def test_replace_ffn_on_caller_given_pairs(which):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 16)
    want = model(x)
    assert replace_ffn(model, which=which) == ["mlps.0", "mlps.1"]
    assert all(isinstance(m, HyMoEFFN) and m.dropout.p == 0.3 for m in model.mlps)
    assert rel_diff(model(x), want) <= 1e-6


@pytest.mark.parametrize("which, match", [
    ({"mlps.0": ("w_in", "w_out")}, r"'mlps\.0' \(MLP\): it does not compute w_out\(gelu\(w_in"
                                    r"\(x\)\)\).*other submodules: ReLU\(\)"),
    ({"mlps.7": ("w_in", "w_out")}, r"'mlps\.7': no such module"),
    ({"mlps.0": ("w_in", "act")}, r"attribute 'act' is ReLU, not nn\.Linear"),
    ({"mlps.0": ("w_in", "w_out", "act")}, r"attribute 'act' is not nn\.Dropout"),
    ({"norm": None}, r"'norm' \(LayerNorm\): not a torch transformer layer"),
    ({nn.GRU: ("a", "b")}, "GRU: no module of this class")])
def test_unconvertible_modules_are_named(which, match):
    model = Net(activation=nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        replace_ffn(model, which=which)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


def test_replace_ffn_without_ffn_and_bad_arguments():
    with pytest.raises(ValueError, match="no FFN to replace in GRU"):
        replace_ffn(nn.GRU(4, 4))
    with pytest.raises(TypeError, match="activation"):
        replace_ffn(encoder(), activation="gelu")
    with pytest.raises(ValueError, match="num_experts"):
        replace_ffn(encoder(), num_experts=0)
    model = encoder()
    replace_ffn(model)
    with pytest.raises(ValueError, match="already a HyMoEFFN"):
        replace_ffn(model, which={"layers.0.ffn": None})


def test_aux_loss_and_stats_helpers():
    model = encoder()
    assert hymoe_aux_loss(model).item() == 0 and hymoe_stats(model) == {}
    names = replace_ffn(model, lb_weight=0.5)
    assert hymoe_aux_loss(model).item() == 0                    # no training forward yet
    model.train()
    model(torch.randn(2, 3, 16))
    layers = [model.get_submodule(n) for n in names]
    torch.testing.assert_close(hymoe_aux_loss(model), layers[0].aux_loss + layers[1].aux_loss)
    assert hymoe_aux_loss(model).requires_grad
    stats = hymoe_stats(model)
    assert list(stats) == names and stats[names[1]] == layers[1].stats()
    assert len(stats[names[0]]["gbar"]) == 4


def test_readme_example_runs(capsys):
    """The README's replace_ffn example, extracted from README.md so it cannot drift."""
    text = README.read_text()
    section = text.split("## HyMoE in an existing model: `replace_ffn`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["names"] == ["layers.0.ffn", "layers.1.ffn"]
    printed = capsys.readouterr().out.split("\n")
    assert printed[0] == "['layers.0.ffn', 'layers.1.ffn']"
    # the third step's alpha: sigmoid(alpha_param) * 2 / 500, alpha_param ~ 0 after 2 steps
    assert float(printed[1]) == pytest.approx(0.5 * 2 / 500, rel=1e-2)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "mamba4rec", "bsarec"])
def test_upcycle_to_hymoe_keeps_the_model_and_matches_a_fresh_hymoe_model(name):
    torch.manual_seed(0)
    config = ModelConfig(max_len=8, d_model=16, n_heads=2, n_layers=2, ffn="dense", dropout=0.1,
                         seen_bias=False)
    model = build_model(name, 30, config).eval()
    items = torch.tensor([[3, 7, 9, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    real = items > 0
    with torch.no_grad():
        want = model.encode(items)
    kept = {k: v.clone() for k, v in model.state_dict().items() if ".ffn." not in k}
    target = dataclasses.replace(config, ffn="hymoe", num_experts=3, top_k=1)
    names = upcycle_to_hymoe(model, target, expert_init="drop")
    prefix = "blocks" if name != "mamba4rec" else "layers"
    assert names == [f"{prefix}.0.ffn", f"{prefix}.1.ffn"] and model.config is target
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    with torch.no_grad():
        got = model.encode(items)
    assert rel_diff(got[real], want[real]) <= 1e-6
    fresh = build_model(name, 30, target)                         # what a checkpoint reloads into
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().encode(items), got, rtol=0, atol=0)
    assert [m.num_experts for m in fresh.hymoe_layers()] == [3, 3]
    model.train()
    task, aux = model.loss(items[:, :-1], items[:, 1:])
    (task + aux).backward()
    assert aux.requires_grad and model.hymoe_layers()[0].router_w2.grad.abs().sum() > 0


def test_replace_ffn_understands_the_project_backbones():
    torch.manual_seed(0)
    config = ModelConfig(max_len=8, d_model=16, n_heads=2, n_layers=2, ffn="dense", dropout=0.2,
                         seen_bias=False)
    model = build_model("sasrec", 30, config)
    assert replace_ffn(model, which=["blocks.1.ffn"]) == ["blocks.1.ffn"]   # just that one
    assert replace_ffn(model) == ["blocks.0.ffn"]                 # the rest
    assert model.blocks[0].ffn.dropout.p == 0.2                   # the dense FFN's own dropout
    hymoe_model = build_model("sasrec", 30, dataclasses.replace(config, ffn="hymoe"))
    with pytest.raises(ValueError, match="no FFN to replace"):   # already HyMoE: nothing to do
        replace_ffn(hymoe_model)


def test_upcycle_to_hymoe_errors():
    config = ModelConfig(max_len=8, d_model=16, n_heads=2, ffn="dense", seen_bias=False)
    model = build_model("sasrec", 30, config)
    with pytest.raises(ValueError, match=r"it also changes d_model \(16 -> 32\), n_heads"):
        upcycle_to_hymoe(model, dataclasses.replace(config, ffn="hymoe", d_model=32, n_heads=4))
    with pytest.raises(ValueError, match="must have ffn='hymoe'"):
        upcycle_to_hymoe(model, config)
    hymoe_config = dataclasses.replace(config, ffn="hymoe")
    with pytest.raises(ValueError, match="only a model built with ffn='dense'"):
        upcycle_to_hymoe(build_model("sasrec", 30, hymoe_config), hymoe_config)
    gru = build_model("gru4rec", 30, config)
    with pytest.raises(ValueError, match="no position-wise FFN"):
        upcycle_to_hymoe(gru, hymoe_config)
