"""linear_cross_entropy (chunked torch and Triton-interpreter paths) against the dense
F.cross_entropy of the full score matrix it replaces."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from hymoe_kernels.cross_entropy import linear_cross_entropy, score_chunks

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-2, atol=2e-3),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-3)}


def make_inputs(n_rows, n_items, dim, dtype, seed, ignore_every=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, dim, generator=gen).to(dtype)
    weight = (torch.randn(n_items, dim, generator=gen) * 0.5).to(dtype)
    target = torch.randint(0, n_items, (n_rows,), generator=gen)
    if ignore_every:
        target[::ignore_every] = -100
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = fn(hidden, weight, target)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def dense_reference(hidden, weight, target):
    """F.cross_entropy on the full score matrix, computed in fp32."""
    return F.cross_entropy(hidden.float() @ weight.float().T, target, ignore_index=-100)


def assert_matches_dense(hidden, weight, target, tol, **kwargs):
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, **kwargs),
                         hidden, weight, target)
    want = loss_and_grads(dense_reference, hidden, weight, target)
    for name, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want):
        assert g.dtype == (torch.float32 if name == "loss" else hidden.dtype), name
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, chunk_size", [("torch", 7), ("torch", 64), ("torch", None),
                                                 ("triton", None)])
def test_matches_cross_entropy(backend, chunk_size, dtype):
    """150 rows / 140 items / D = 24, every 5th position ignored: partial row blocks, item
    chunks and tiles, feature padding (Triton's BLOCK_D = 32)."""
    hidden, weight, target = make_inputs(150, 140, 24, dtype, seed=3, ignore_every=5)
    assert_matches_dense(hidden, weight, target, TOL[dtype], chunk_size=chunk_size,
                         backend=backend)


def test_torch_path_row_blocks(monkeypatch):
    """Several row blocks and item chunks (block budget shrunk to 128 scores a thread)."""
    monkeypatch.setattr(score_chunks, "BLOCK_ELEMENTS_PER_CPU_THREAD", 128)
    hidden, weight, target = make_inputs(70, 45, 8, torch.float32, seed=2, ignore_every=3)
    assert_matches_dense(hidden, weight, target, TOL[torch.float32], chunk_size=16,
                         backend="torch")


@settings(max_examples=15, deadline=None)
@given(n_rows=st.integers(1, 40), n_items=st.integers(1, 80), dim=st.integers(1, 12),
       chunk_size=st.integers(1, 33), ignore_every=st.integers(0, 5), seed=st.integers(0, 99))
def test_torch_path_random_shapes(n_rows, n_items, dim, chunk_size, ignore_every, seed):
    hidden, weight, target = make_inputs(n_rows, n_items, dim, torch.float32, seed, ignore_every)
    if (target == -100).all():
        target[0] = 0
    assert_matches_dense(hidden, weight, target, TOL[torch.float32], chunk_size=chunk_size,
                         backend="torch")


def test_triton_path_wide_features():
    """D = 130 pads to BLOCK_D = 256 (the second 16-bit tile config); few rows, many splits.
    fp32 takes D <= 64 only (wider fp32 tiles spill on sm_90): a clear error, and "auto"
    leaves it to the torch path."""
    hidden, weight, target = make_inputs(20, 75, 130, torch.float16, seed=17, ignore_every=3)
    assert_matches_dense(hidden, weight, target, TOL[torch.float16], backend="triton")
    hidden, weight, target = make_inputs(20, 75, 130, torch.float32, seed=17, ignore_every=3)
    with pytest.raises(ValueError, match="D <= 64 in torch.float32"):
        linear_cross_entropy(hidden, weight, target, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_item(backend):
    hidden, weight, target = make_inputs(20, 1, 8, torch.float32, seed=4)
    assert_matches_dense(hidden, weight, target, TOL[torch.float32], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_gives_zero_loss_and_zero_grads(backend):
    hidden, weight, target = make_inputs(12, 30, 8, torch.float32, seed=5)
    target[:] = -100
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend), hidden, weight, target)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0
    assert grad_hidden.shape == hidden.shape and grad_weight.shape == weight.shape


def test_custom_ignore_index_and_int32_target():
    hidden, weight, target = make_inputs(30, 50, 8, torch.float32, seed=6)
    target[::3] = 0  # 0 = padding target here
    got = linear_cross_entropy(hidden, weight, target.int(), ignore_index=0, backend="torch")
    want = F.cross_entropy(hidden @ weight.T, target, ignore_index=0)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_are_bit_reproducible(backend):
    hidden, weight, target = make_inputs(80, 70, 16, torch.float32, seed=7, ignore_every=6)
    target[:40] = 3  # many rows share one item: the weight gradient sums them
    fn = lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=32, backend=backend)  # noqa: E731
    first = loss_and_grads(fn, hidden, weight, target)
    second = loss_and_grads(fn, hidden, weight, target)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_path_gradcheck_float64():
    hidden, weight, target = make_inputs(9, 13, 4, torch.float64, seed=16, ignore_every=4)
    hidden.requires_grad_()
    weight.requires_grad_()
    def loss_fn(h, w):
        return linear_cross_entropy(h, w, target, chunk_size=5, backend="torch")
    assert loss_fn(hidden, weight).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_fn, (hidden, weight))


def test_loss_rejects_bad_input():
    hidden, weight, target = make_inputs(10, 20, 8, torch.float32, seed=9)
    with pytest.raises(ValueError, match="target ids"):
        linear_cross_entropy(hidden, weight, torch.full((10,), 20))
    with pytest.raises(ValueError, match="share D"):
        linear_cross_entropy(hidden, weight[:, :4], target)
    with pytest.raises(ValueError, match="target must be"):
        linear_cross_entropy(hidden, weight, target[:5])
    with pytest.raises(TypeError, match="target must be int64"):
        linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(TypeError, match="share a dtype"):
        linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, target, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)
    with pytest.raises(TypeError, match="backend='triton' takes"):
        linear_cross_entropy(hidden.double(), weight.double(), target, backend="triton")


def offset_reference(hidden, weight, target, offset_items, offset):
    """F.cross_entropy of the full scores plus ``offset`` at each row's listed items (one
    item at a time, so duplicates and negative ids are handled independently)."""
    listed = torch.zeros(hidden.shape[0], weight.shape[0])
    for row, items in enumerate(offset_items.tolist()):
        for item in items:
            if item >= 0:
                listed[row, item] = 1.0
    scores = hidden.float() @ weight.float().T + listed * offset
    return F.cross_entropy(scores, target, ignore_index=-100)


@settings(max_examples=15, deadline=None)
@given(n_rows=st.integers(1, 30), n_items=st.integers(1, 60), n_listed=st.integers(0, 9),
       chunk_size=st.integers(1, 25), ignore_every=st.integers(0, 4),
       offset=st.floats(-9.0, 3.0), seed=st.integers(0, 99))
def test_offset_items_match_cross_entropy_of_offset_scores(n_rows, n_items, n_listed, chunk_size,
                                                          ignore_every, offset, seed):
    """Listed items (with duplicates and -1 = none) score ``offset`` more; the loss and the
    gradients of hidden, weight and the offset match the full score matrix."""
    hidden, weight, target = make_inputs(n_rows, n_items, 6, torch.float32, seed, ignore_every)
    if (target == -100).all():
        target[0] = 0
    gen = torch.Generator().manual_seed(seed + 1)
    items = torch.randint(-1, n_items, (n_rows, n_listed), generator=gen)
    if n_listed:
        items[::2, 0] = target[::2].clamp(min=0)   # some targets among their row's items
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
              torch.tensor(offset, requires_grad=True)]
    got = linear_cross_entropy(leaves[0], leaves[1], target, chunk_size=chunk_size,
                               offset_items=items, offset=leaves[2])
    want = offset_reference(leaves[0], leaves[1], target, items, leaves[2])
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_offset_gradcheck_float64_and_zero_offset_is_the_plain_loss():
    hidden, weight, target = make_inputs(9, 13, 4, torch.float64, seed=17, ignore_every=4)
    items = torch.tensor([[t, (t + 3) % 13, -1] for t in target.clamp(min=0).tolist()])
    offset = torch.tensor(-0.8, dtype=torch.float64, requires_grad=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    def loss_fn(h, w, b):
        return linear_cross_entropy(h, w, target, chunk_size=5, offset_items=items, offset=b)
    assert torch.autograd.gradcheck(loss_fn, (hidden, weight, offset))
    zero = loss_fn(hidden, weight, torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(zero, linear_cross_entropy(hidden, weight, target))


def test_offset_all_ignored_gives_a_zero_offset_gradient():
    hidden, weight, target = make_inputs(6, 10, 4, torch.float32, seed=18)
    offset = torch.tensor(-1.0, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100),
                                offset_items=target[:, None], offset=offset)
    loss.backward()
    assert loss.item() == 0.0 and offset.grad.item() == 0.0


def test_offset_rejects_bad_input():
    hidden, weight, target = make_inputs(10, 20, 8, torch.float32, seed=9)
    items, offset = target[:, None], torch.tensor(-1.0)
    with pytest.raises(ValueError, match="give both or neither"):
        linear_cross_entropy(hidden, weight, target, offset_items=items)
    with pytest.raises(ValueError, match="shape \\(M, L\\)"):
        linear_cross_entropy(hidden, weight, target, offset_items=items[:5], offset=offset)
    with pytest.raises(TypeError, match="offset_items must be int64"):
        linear_cross_entropy(hidden, weight, target, offset_items=items.float(), offset=offset)
    with pytest.raises(TypeError, match="0-d floating-point"):
        linear_cross_entropy(hidden, weight, target, offset_items=items, offset=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_offset_matches_the_offset_scores(dtype):
    """The kernels' bitset offset: 150 rows / 140 items (partial tiles; bytes shared by
    items of two tiles), every 5th position ignored, duplicate and -1 ids; the loss and the
    gradients of hidden, weight and the offset."""
    hidden, weight, target = make_inputs(150, 140, 24, dtype, seed=19, ignore_every=5)
    gen = torch.Generator().manual_seed(20)
    items = torch.randint(-1, 140, (150, 12), generator=gen)
    items[::2, 0] = target[::2].clamp(min=0)
    items[:, 1] = items[:, 2]
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
              torch.tensor(-1.7, requires_grad=True)]
    got = linear_cross_entropy(leaves[0], leaves[1], target, backend="triton",
                               offset_items=items, offset=leaves[2])
    want = offset_reference(leaves[0], leaves[1], target, items, leaves[2])
    torch.testing.assert_close(got, want, **TOL[dtype])
    for name, g, w in zip(("hidden", "weight", "offset"), torch.autograd.grad(got, leaves),
                          torch.autograd.grad(want, leaves)):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
