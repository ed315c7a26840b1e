"""HyMoEFFN: schedule, statistics, invariances, state, errors, dtypes, torch.compile."""
import pytest
import torch

from hymoe_kernels import HyMoEFFN


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


def test_state_dict_round_trip_keeps_step():
    layer = make_layer()
    layer.set_step(123)
    other = make_layer()
    other.load_state_dict(layer.state_dict())
    assert int(other.step) == 123
    torch.testing.assert_close(other.alpha, layer.alpha)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k"), (dict(top_k=5), "top_k"), (dict(backend="cuda"), "backend"),
    (dict(d_model=0), "d_model"), (dict(warmup_steps=-1), "warmup_steps")])
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


def test_half_precision_module():
    layer = make_layer(warmup_steps=0).to(torch.bfloat16)
    x = torch.randn(4, 9, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


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
