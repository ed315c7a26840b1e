"""HyMoEFFN: schedule, statistics, invariances, padding, state, errors, dtypes, torch.compile."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from hymoe_kernels import HyMoEFFN
from kernel_cases import DEVICE

# every backend; "triton" runs in the interpreter on a CPU machine (see conftest.py)
ALL_BACKENDS = ("reference", "torch", "triton")


def make_layer(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, d_ff=32, num_experts=4, top_k=2, warmup_steps=500)
    args.update(kw)
    return HyMoEFFN(**args)


@pytest.mark.parametrize("t, ramp", [(0, 0.0), (250, 0.5), (500, 1.0), (1000, 1.0)])
def test_alpha_schedule(t, ramp):
    layer = make_layer()
    with torch.no_grad():
        layer.alpha_param.fill_(0.4)
    layer.set_step(t)
    expected = torch.sigmoid(torch.tensor(0.4)) * ramp
    torch.testing.assert_close(layer.alpha, expected)
    layer.eval()
    layer(torch.randn(3, 16))
    assert layer.stats()["alpha"] == pytest.approx(float(expected))
    assert int(layer.step) == t, "eval mode must not advance the warm-up step"


def test_training_forward_advances_step_and_uses_alpha_before_increment():
    layer = make_layer(warmup_steps=4)
    x = torch.randn(5, 16)
    for t in range(3):
        layer(x)
        assert layer.stats()["alpha"] == pytest.approx(0.5 * t / 4)
        assert int(layer.step) == t + 1


def test_alpha_zero_ignores_sparse_experts():
    layer = make_layer()
    layer.set_step(0)                         # ramp 0 -> alpha 0
    x = torch.randn(2, 7, 16)
    y1 = layer(x)
    with torch.no_grad():
        for name in ("expert_w1", "expert_b1", "expert_w2", "expert_b2"):
            getattr(layer, name).normal_()
    layer.set_step(0)
    torch.testing.assert_close(layer(x), y1)


def test_permuting_tokens_permutes_outputs():
    layer = make_layer().eval()
    layer.set_step(300)
    x = torch.randn(20, 16)
    perm = torch.randperm(20)
    torch.testing.assert_close(layer(x[perm]), layer(x)[perm])


def test_padding_does_not_change_router_statistics():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    layer(x, mask)
    stats = layer.stats()
    x_other_padding = x.clone()
    x_other_padding[~mask] = torch.randn(int((~mask).sum()), 16) * 10
    layer(x_other_padding, mask)
    assert stats["gbar"] == pytest.approx(layer.stats()["gbar"])
    assert stats["load"] == pytest.approx(layer.stats()["load"])
    layer(x[mask])                                 # the real tokens alone
    assert stats["gbar"] == pytest.approx(layer.stats()["gbar"], rel=1e-5)
    assert sum(stats["gbar"]) == pytest.approx(1.0, rel=1e-5)


def padded_run(backend, fill, dtype=torch.float32):
    """A training forward + backward of a masked batch whose padded tokens all hold
    ``fill``: (real outputs, gbar, aux_loss, grad of x, grads of every parameter)."""
    layer = make_layer(backend=backend, warmup_steps=4).to(DEVICE)
    layer.set_step(2)                               # alpha > 0: experts and router in play
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, generator=gen).to(DEVICE, dtype)
    target = torch.randn(2, 6, 16, generator=gen).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool,
                        device=DEVICE)
    x[~mask] = fill
    x.requires_grad_()
    y = layer(x, mask)
    loss = (y[mask].float() * target[mask]).sum() + 10 * layer.aux_loss
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    gbar = torch.tensor(layer.stats()["gbar"])
    return (y[mask].detach(), gbar, layer.aux_loss.detach(), *grads)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_non_finite_padding_reaches_nothing(backend, fill):
    """Padding is selected out: whatever a padded token holds, the real outputs, gbar,
    aux_loss and every gradient are finite, the same bits as with finite padding, and the
    same as the reference backend's."""
    finite = padded_run(backend, 0.5)
    poisoned = padded_run(backend, fill)
    for got, want in zip(poisoned, finite):
        assert torch.isfinite(got).all() and torch.equal(got, want)
    for got, want in zip(poisoned, padded_run("reference", fill)):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
    padding = ~torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert not poisoned[3].cpu()[padding].any()               # no gradient reaches padding


def test_padded_tokens_are_computed_as_zero_tokens():
    layer = make_layer(warmup_steps=0).eval()
    x = torch.randn(3, 16)
    mask = torch.tensor([True, False, True])
    y = layer(x, mask)
    torch.testing.assert_close(y[1], layer(torch.zeros(1, 16))[0])
    torch.testing.assert_close(y[mask], layer(x[mask]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_layer_computes_in_the_input_dtype(backend, dtype):
    """Chosen behaviour, the same on every backend: an fp32 layer given a half-precision
    input computes in that dtype, as autocast would (the triton kernels always did), with
    the same outputs as the layer cast to that dtype; its fp32 parameters get the
    gradients through the cast."""
    layer = make_layer(backend=backend, warmup_steps=4).to(DEVICE)
    layer.set_step(2)
    half = copy.deepcopy(layer).to(dtype)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(5)).to(DEVICE) > 0.3
    outs = []
    for module in (layer, half):
        y = module(x, mask)
        grads = torch.autograd.grad(y.float().square().sum() + module.aux_loss,
                                    list(module.parameters()))
        outs.append((y, module.aux_loss, grads))
    (y32, aux32, grads32), (y16, aux16, grads16) = outs
    assert y32.dtype == dtype and torch.equal(y32, y16) and torch.equal(aux32, aux16)
    for (name, param), g32, g16 in zip(layer.named_parameters(), grads32, grads16):
        assert g32.dtype == torch.float32, name
        if name == "alpha_param":                  # its gradient is formed in float32
            torch.testing.assert_close(g32, g16.float(), rtol=1e-2, atol=1e-3)
        else:                                      # the half gradient, cast back exactly
            assert torch.equal(g32, g16.float()), name


@pytest.mark.parametrize("top_k", [1, 4])
def test_extreme_top_k(top_k):
    layer = make_layer(top_k=top_k, warmup_steps=0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert sum(layer.stats()["load"]) == pytest.approx(1.0)
    if top_k == 4:  # every expert sees every token
        assert layer.stats()["load"] == pytest.approx([0.25] * 4)


def test_aux_loss_is_negative_entropy_of_gbar_with_grad():
    layer = make_layer(lb_weight=0.02)
    layer(torch.randn(10, 16))
    gbar = torch.tensor(layer.stats()["gbar"])
    assert layer.aux_loss.item() == pytest.approx(0.02 * float((gbar * gbar.log()).sum()), rel=1e-5)
    layer.aux_loss.backward()
    assert layer.router_w2.grad.abs().sum() > 0
    assert layer.expert_w1.grad is None or layer.expert_w1.grad.abs().sum() == 0


def test_reset_parameters_default_and_normal_init():
    layer = make_layer(d_model=64, d_ff=256)
    bound = 1 / 64 ** 0.5                        # nn.Linear's U(+-1/sqrt(fan_in)), fan_in = D
    assert layer.dense_w1.abs().max() <= bound and layer.dense_w1.abs().max() > 0.9 * bound
    assert layer.dense_b1.abs().max() > 0
    layer.alpha_param.data.fill_(1.0)
    layer.reset_parameters(std=0.02)
    for name, param in layer.named_parameters():
        if name == "alpha_param":
            assert float(param) == 0.0
        elif "_w" in name:
            assert abs(float(param.std()) - 0.02) < 0.004, name
        else:
            assert not param.any(), name           # biases zero


def test_set_step_takes_integers_only():
    layer = make_layer()
    for t in (7, np.int64(8), torch.tensor(9)):
        layer.set_step(t)
        assert int(layer.step) == int(t)
    with pytest.raises(TypeError, match="step must be an int, got 2.7"):
        layer.set_step(2.7)
    with pytest.raises(ValueError, match="step must be >= 0"):
        layer.set_step(-1)
    assert int(layer.step) == 9


def test_state_dict_round_trip_keeps_step():
    layer = make_layer()
    layer.set_step(123)
    other = make_layer()
    other.load_state_dict(layer.state_dict())
    assert int(other.step) == 123
    torch.testing.assert_close(other.alpha, layer.alpha)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k"), (dict(top_k=5), "top_k"), (dict(backend="cuda"), "backend"),
    (dict(d_model=0), "d_model"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(lb_weight=float("nan")), "lb_weight"), (dict(lb_weight=float("inf")), "lb_weight"),
    (dict(lb_weight=-0.1), "lb_weight"), (dict(lb_weight="0.1"), "lb_weight")])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_layer(**kwargs)


def test_forward_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 16), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_input_dtype_and_is_close(dtype):
    layer = make_layer(warmup_steps=0)
    x = torch.randn(4, 9, 16)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == torch.float32
    assert (y - y32).norm() / y32.norm() < 2e-2


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision_module(dtype, tol):
    """A layer converted to bf16 / fp16 computes in that dtype what the fp32 layer of the
    same (rounded) weights computes on the same (rounded) input, to the half type's
    precision, and its load-balance term too."""
    half = make_layer(warmup_steps=0).to(dtype)
    full = copy.deepcopy(half).float()
    x = torch.randn(4, 9, 16).to(dtype)
    y, y32 = half(x), full(x.float())
    assert y.dtype == dtype
    assert (y.float() - y32).norm() / y32.norm() < tol
    torch.testing.assert_close(half.aux_loss, full.aux_loss, rtol=tol, atol=1e-4)


def test_torch_compile_matches_eager():
    layer = make_layer(warmup_steps=10)
    compiled = torch.compile(layer)
    x = torch.randn(3, 8, 16)
    eager = make_layer(warmup_steps=10)
    for _ in range(2):
        y, y_ref = compiled(x), eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.aux_loss, eager.aux_loss, rtol=1e-4, atol=1e-6)
    assert int(layer.step) == 2


class TwoLayerModel(nn.Module):
    """A model holding a HyMoEFFN, as users' models do: embedding -> HyMoE -> linear."""

    def __init__(self, backend: str):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.ffn = HyMoEFFN(16, 32, warmup_steps=0, backend=backend)

    def forward(self, x):
        return self.head(self.ffn(self.embed(x)))


@pytest.mark.parametrize("backward", [True, False])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_deepcopy_pickle_and_swa_after_a_training_forward(backend, backward):
    """EMA / SWA / keep-the-best code copies the model between training steps: the copy
    works (with or without the step's backward), equals the original in every parameter and
    output, is independent of it, and holds no aux_loss until its own training forward,
    while the original's aux_loss keeps its graph."""
    model = TwoLayerModel(backend).train()
    x = torch.randn(4, 5, 8)
    loss = model(x).square().mean() + model.ffn.aux_loss
    if backward:
        loss.backward()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.ffn.aux_loss is None and model.ffn.aux_loss.grad_fn is not None
        assert copied.ffn.stats() == model.ffn.stats()
        for (name, p), q in zip(model.state_dict().items(), copied.state_dict().values()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        torch.testing.assert_close(copied.eval()(x), model.eval()(x), rtol=0, atol=0)
        model.train()
        copied.train()(x).sum().backward()
        assert copied.ffn.aux_loss.grad_fn is not None and int(copied.ffn.step) == 2
    buffer = io.BytesIO()
    torch.save(model, buffer)           # whole-model save, as torch.save(model) users do
    swa = AveragedModel(model)
    model(x).square().mean().backward()
    swa.update_parameters(model)
    torch.testing.assert_close(swa.module.ffn.dense_w1, model.ffn.dense_w1)


def test_float64_routes_in_float64_and_passes_gradcheck_on_the_torch_backend():
    """A float64 input is routed in float64 on the torch backend as on the reference (not
    in float32), so gradcheck passes through the whole layer, load-balance term included."""
    torch.manual_seed(3)
    layer = HyMoEFFN(4, 6, num_experts=3, top_k=2, warmup_steps=0, backend="torch").double()
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 3, 4, dtype=torch.float64)

    def f(x, *weights):
        y = torch.func.functional_call(layer, dict(zip(names, weights)), (x,))
        return (y * probe).sum() + layer.aux_loss

    weights = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *weights), eps=1e-6, atol=1e-6)
    assert layer.aux_loss.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks triton only on CUDA")
def test_auto_runs_float64_on_cuda_on_the_torch_backend():
    """The kernels take fp32 / bf16 / fp16: auto runs a float64 CUDA input on torch (in
    float64) rather than refusing it."""
    layer = make_layer(backend="auto").double().to("cuda")
    x = torch.randn(3, 16, dtype=torch.float64)
    y = layer(x.to("cuda"))
    reference = copy.deepcopy(layer).cpu()
    reference.backend = "reference"
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.cpu(), reference(x), rtol=1e-12, atol=1e-12)
