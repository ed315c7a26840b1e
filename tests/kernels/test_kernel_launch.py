"""How the Triton kernels launch: on their inputs' CUDA device, with PyTorch's TF32 setting.

Triton launches on the *current* CUDA device, whatever device the pointers belong to, so
every op body enters ``on_device_of(x)``. Under the interpreter this is checked by watching
every kernel launch of the layer (both paths, forward and backward) and of the fused
cross-entropy happen inside that guard; with two GPUs, by running on the second while the
first is current.
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings

import pytest
import torch

from hymoe_kernels import HyMoEWeights, hymoe_reference, hymoe_triton, linear_cross_entropy
from hymoe_kernels.backend import INTERPRETING
from hymoe_kernels.cross_entropy import lce_triton_kernels as lce
from hymoe_kernels.hymoe_op import triton_backend
from hymoe_kernels.kernel_launch import on_device_of
from kernel_cases import DEVICE, make_weights, rel_err


def layer_inputs(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = HyMoEWeights(*(w.detach().to(device).requires_grad_()
                             for w in make_weights(8, 6, 3, 10, generator=gen)))
    x = torch.randn(9, 8, generator=gen).to(device).requires_grad_()
    alpha_param = torch.tensor(0.2, device=device, requires_grad=True)
    return x, weights, alpha_param, torch.tensor(0.5, device=device)


def run_layer(path, x, weights, alpha_param, ramp):
    """(y, prob_sum, load, gradients of x, the weights and alpha_param) on ``path``."""
    fn = hymoe_reference if path == "reference" else functools.partial(hymoe_triton, path=path)
    y, prob_sum, load = fn(x, None, weights, alpha_param, ramp, 2)
    grads = torch.autograd.grad(y.square().sum() + prob_sum[0], [x, *weights, alpha_param])
    return (y, prob_sum, load, *grads)


@pytest.mark.skipif(not INTERPRETING, reason="watches the interpreter's kernel launches")
def test_every_launch_is_inside_a_guard_of_its_inputs_device(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    guards, launches = [], []

    @contextlib.contextmanager
    def watched_guard(tensor):
        guards.append(tensor.device)
        try:
            yield
        finally:
            guards.pop()

    real_run = InterpretedFunction.run

    def watched_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, list(guards)))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "on_device_of", watched_guard)
    monkeypatch.setattr(lce, "on_device_of", watched_guard)
    monkeypatch.setattr(InterpretedFunction, "run", watched_run)
    x, weights, alpha_param, ramp = layer_inputs(DEVICE)
    for path in ("grouped", "fused"):
        run_layer(path, x, weights, alpha_param, ramp)
    hidden = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    items = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    loss = linear_cross_entropy(hidden, items, torch.arange(7, device=DEVICE), backend="triton")
    torch.autograd.grad(loss, [hidden, items])
    names = {name for name, _ in launches}
    assert {"_router_topk_kernel", "_row_gemm_kernel", "_weight_grad_kernel",
            "fused_tile_forward_kernel", "fused_tile_weight_grad_kernel",
            "_lce_forward_kernel", "_lce_grad_weight_kernel"} <= names
    unguarded = sorted({name for name, active in launches if active != [x.device]})
    assert not unguarded, f"launched outside on_device_of(x): {unguarded}"


def test_guard_is_a_no_op_for_cpu_tensors():
    assert isinstance(on_device_of(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    inputs = layer_inputs("cuda:1", seed=1)
    for path in ("grouped", "fused"):
        ours = run_layer(path, *inputs)
        reference = run_layer("reference", *inputs)
        assert torch.cuda.current_device() == 0
        assert torch.equal(ours[2], reference[2])
        for out, ref in zip(ours[:2] + ours[3:], reference[:2] + reference[3:]):
            assert out.device == torch.device("cuda:1") and rel_err(out, ref) < 1e-4, path


@pytest.mark.skipif(getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None,
                    reason="torch < 2.9 has no fp32_precision API")
def test_tf32_setting_read_from_fp32_precision():
    """With torch's new API in use, reading the legacy allow_tf32 raises; tf32_allowed()
    reads fp32_precision instead, without a warning."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    hidden = torch.zeros(3, 16, device=DEVICE)
    try:
        for setting, allowed in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert lce.tf32_allowed() is allowed
                assert lce._launch_setup(hidden)[2] is allowed
                assert lce._launch_setup(hidden.half())[2] is False    # fp32 inputs only
    finally:
        matmul.fp32_precision = saved


def test_tf32_setting_legacy_flag(monkeypatch):
    """Where fp32_precision does not exist (torch < 2.9), the legacy flag decides."""
    for flag in (True, False):
        monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=flag))
        assert lce.tf32_allowed() is flag
