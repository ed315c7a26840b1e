"""HyMoE in an existing model: replace its dense FFNs in place (sparse upcycling), and the
two helpers a user's own training loop needs.

``replace_ffn(model)`` turns every position-wise FFN it understands into a
:class:`~hymoe_kernels.layer.HyMoEFFN` built by :meth:`HyMoEFFN.from_dense`, so the model
computes the same function at warm-up step 0 and training then adds the experts as alpha
warms up. It understands:

* ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (exactly those classes)
  with exact GELU: the layer becomes a :class:`HyMoETransformerEncoderLayer` /
  :class:`HyMoETransformerDecoderLayer` (same object, same attention, norms, residuals and
  forward) whose ``linear1`` / ``linear2`` are gone and whose FFN block is
  ``dropout2(ffn(x))`` (``dropout3`` in a decoder layer), ``ffn`` the HyMoE layer. The fused
  inference fast path, which reads ``linear1`` / ``linear2`` directly, is switched off for
  these layers and for the nested-tensor path of an ``nn.TransformerEncoder`` holding them.
  Two differences from the dense layer: the hidden-unit dropout (``dropout`` between
  ``linear1`` and ``linear2``) has no counterpart, since the kernels never materialise the
  hidden layer outside the fused GEMMs (eval outputs are unchanged); and the FFN block is
  called without the padding mask, so padded positions count in the router statistics.
* modules that declare their dense FFN children in a class attribute
  ``hymoe_ffn_slots = {child: (up, down, dropout)}`` (the project's backbones do): child
  ``child`` computes ``dropout(down(gelu(up(x))))`` and is called as ``child(x, mask)``;
  it is replaced by a HyMoE layer with the same output dropout. Children that already are
  HyMoE layers are left alone.
* any module the caller points at: ``which={name_or_class: (up, down)}`` (or
  ``(up, down, dropout)``) says that the module(s) compute ``down(gelu(up(x)))`` (then the
  output dropout ``dropout``); each is checked on a probe input in eval mode and replaced
  in its parent by a HyMoE layer.

A module that cannot be converted (another activation, a subclass of the torch layers,
a module that does not compute what ``which`` says, a name that does not exist) is
reported by name: ``replace_ffn`` raises ValueError listing every one before it changes
anything; it never skips one silently.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import HyMoEFFN, check_gelu

FFNSpec = tuple[str, str] | tuple[str, str, str]


class HyMoETransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose FFN block is ``dropout2(ffn(x))`` with ``ffn`` a
    :class:`HyMoEFFN`; made by :func:`replace_ffn` (it has no ``linear1`` / ``linear2``)."""

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.ffn(x))


class HyMoETransformerDecoderLayer(nn.TransformerDecoderLayer):
    """nn.TransformerDecoderLayer whose FFN block is ``dropout3(ffn(x))`` with ``ffn`` a
    :class:`HyMoEFFN`; made by :func:`replace_ffn` (it has no ``linear1`` / ``linear2``)."""

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.ffn(x))


TORCH_LAYERS = {nn.TransformerEncoderLayer: HyMoETransformerEncoderLayer,
                nn.TransformerDecoderLayer: HyMoETransformerDecoderLayer}


def _torch_layer_problem(layer: nn.Module) -> str | None:
    """Why the torch transformer layer cannot be converted, or None."""
    try:
        check_gelu(layer.activation)
    except ValueError as err:
        return str(err)
    return None


def _spec_problem(module: nn.Module, spec: FFNSpec) -> str | None:
    """Why ``module`` does not compute ``dropout(down(gelu(up(x))))`` as ``spec`` says (its
    up / down attributes missing or not nn.Linear, or a probe input giving another output
    in eval mode), or None."""
    if not isinstance(spec, tuple) or len(spec) not in (2, 3) or \
            not all(isinstance(part, str) for part in spec):
        return f"its spec must be (up, down) or (up, down, dropout) attribute names, got {spec!r}"
    up, down = (getattr(module, part, None) for part in spec[:2])
    for part, linear in zip(spec[:2], (up, down)):
        if not isinstance(linear, nn.Linear):
            return f"its attribute {part!r} is {type(linear).__name__}, not nn.Linear"
    if len(spec) == 3 and not isinstance(getattr(module, spec[2], None), nn.Dropout):
        return f"its attribute {spec[2]!r} is not nn.Dropout"
    if (down.in_features, down.out_features) != (up.out_features, up.in_features):
        return (f"{spec[0]} is Linear({up.in_features}, {up.out_features}) but {spec[1]} is "
                f"Linear({down.in_features}, {down.out_features})")
    weight = up.weight
    probe = torch.randn(4, up.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = F.linear(F.gelu(F.linear(probe, weight, up.bias)), down.weight, down.bias)
            got = module(probe)
    except Exception as err:  # noqa: BLE001 -- any failure of the user's forward is reported
        return f"calling it on a probe input failed ({type(err).__name__}: {err})"
    finally:
        module.train(was_training)
    tol = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    if not isinstance(got, Tensor) or got.shape != want.shape or not torch.allclose(
            got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max())):
        others = ", ".join(repr(child) for child in module.children()
                           if not isinstance(child, (nn.Linear, nn.Dropout)))
        return (f"it does not compute {spec[1]}(gelu({spec[0]}(x))) on a probe input (is its "
                "activation exact GELU?" + (f" its other submodules: {others})" if others else ")"))
    return None


def _targets(model: nn.Module, which) -> tuple[list[tuple[str, nn.Module, FFNSpec | None]],
                                                list[str]]:
    """The (name, module, spec) to convert (spec None: a torch transformer layer) and the
    problems found (each naming its module)."""
    modules = dict(model.named_modules())
    targets, problems = [], []

    def add(name: str, module: nn.Module, spec: FFNSpec | None) -> None:
        if any(module is target for _, target, _ in targets):
            return                                   # named twice in ``which``
        if isinstance(module, HyMoEFFN):
            problems.append(f"{name!r}: already a HyMoEFFN")
            return
        if not name and spec is not None:
            problems.append(f"the model itself ({type(module).__name__}) cannot be replaced in "
                            "place; build its HyMoE layer with HyMoEFFN.from_dense")
            return
        problem = _torch_layer_problem(module) if spec is None else _spec_problem(module, spec)
        if problem:
            problems.append(f"{name!r} ({type(module).__name__}): {problem}")
        else:
            targets.append((name, module, spec))

    if which is None:
        for name, module in modules.items():
            if type(module) in TORCH_LAYERS:
                add(name, module, None)
            elif isinstance(module, tuple(TORCH_LAYERS)) and type(module) not in \
                    TORCH_LAYERS.values():
                problems.append(f"{name!r} ({type(module).__name__}): a subclass of a torch "
                                "transformer layer, whose own code may use linear1 / linear2; "
                                "not converted")
            for child, spec in getattr(type(module), "hymoe_ffn_slots", {}).items():
                submodule = getattr(module, child, None)
                if not isinstance(submodule, HyMoEFFN):
                    add(f"{name}.{child}" if name else child, submodule, spec)
        if not targets and not problems:
            problems.append(f"no FFN to replace in {type(model).__name__}: it has no "
                            "nn.TransformerEncoderLayer / nn.TransformerDecoderLayer and no "
                            "hymoe_ffn_slots; point at its FFNs with which={name: (up, down)}")
        return targets, problems

    if not isinstance(which, Mapping):
        if isinstance(which, str) or not isinstance(which, Iterable):
            raise TypeError(f"which must be None, a list of module names or a mapping "
                            f"{{name or class: (up, down)}}, got {which!r}")
        which = dict.fromkeys(which)
    for key, spec in which.items():
        if isinstance(key, type):
            found = [(name, m) for name, m in modules.items() if type(m) is key]
            if not found:
                problems.append(f"{key.__name__}: no module of this class in the model")
        elif key in modules:
            found = [(key, modules[key])]
        else:
            problems.append(f"{key!r}: no such module")
            continue
        for name, module in found:
            module_spec = spec
            if spec is None and type(module) not in TORCH_LAYERS and \
                    not isinstance(module, HyMoEFFN):
                module_spec = _slot_spec(modules, name)
                if module_spec is None:
                    problems.append(f"{name!r} ({type(module).__name__}): not a torch "
                                    "transformer layer or a declared FFN slot; give its "
                                    "(up, down) attribute names")
                    continue
            add(name, module, module_spec)
    return targets, problems


def _slot_spec(modules: dict[str, nn.Module], name: str) -> FFNSpec | None:
    """The spec that the parent of module ``name`` declares for it in hymoe_ffn_slots."""
    parent, _, child = name.rpartition(".")
    return getattr(type(modules[parent]), "hymoe_ffn_slots", {}).get(child)


def replace_ffn(model: nn.Module, *, which=None, **hymoe_kwargs) -> list[str]:
    """Replace the model's dense position-wise FFNs by HyMoE layers in place (see the module
    docstring for what it understands) and return the names of the new HyMoE modules (the
    keys of :func:`hymoe_stats`), in ``model.named_modules()`` order.

    ``which``: None (every FFN the function understands), a list of module names (torch
    transformer layers or declared FFN slots), or a mapping from a module name or a module
    class (every module of exactly that class) to its ``(up, down)`` or
    ``(up, down, dropout)`` attribute names (None for a torch layer or a declared slot).
    ``hymoe_kwargs`` go to :meth:`HyMoEFFN.from_dense` (num_experts, top_k, expert_init,
    drop_ratio, noise_std, router_std, warmup_steps, lb_weight, dropout, backend,
    router_hidden; those not given default to :data:`hymoe_kernels.config.HYMOE_DEFAULTS`);
    without ``dropout`` a replaced module's own output dropout is kept
    (torch layers: 0, their ``dropout2`` / ``dropout3`` still follows).

    Raises ValueError listing every module that cannot be converted, before anything is
    changed. The new layers are on the device and in the dtype of the FFN they replace;
    an optimizer built before the call does not hold their parameters: build a new one.
    """
    if "activation" in hymoe_kwargs:
        raise TypeError("replace_ffn reads each FFN's activation itself; do not pass activation")
    targets, problems = _targets(model, which)
    if problems:
        raise ValueError("replace_ffn cannot convert:\n  " + "\n  ".join(problems))
    modules = dict(model.named_modules())
    new_layers = []
    for name, module, spec in targets:
        if spec is None:
            layer = HyMoEFFN.from_dense(module.linear1, module.linear2,
                                        activation=module.activation, **hymoe_kwargs)
        else:
            kwargs = dict(hymoe_kwargs)
            if len(spec) == 3:
                kwargs.setdefault("dropout", getattr(module, spec[2]).p)
            layer = HyMoEFFN.from_dense(getattr(module, spec[0]), getattr(module, spec[1]),
                                        **kwargs)
        new_layers.append(layer.train(module.training))
    for (name, module, spec), layer in zip(targets, new_layers):
        if spec is None:
            del module.linear1, module.linear2
            module.ffn = layer
            module.activation_relu_or_gelu = 0       # its fast path reads linear1 / linear2
            module.__class__ = TORCH_LAYERS[type(module)]
        else:
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, layer)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer, HyMoETransformerEncoderLayer) for layer in module.layers):
            module.use_nested_tensor = False         # the fast path reads layers[0].linear1
    names = {id(layer) for layer in new_layers}
    return [name for name, m in model.named_modules() if id(m) in names]


def hymoe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the ``aux_loss`` of every HyMoE layer in ``model`` (each from its last training
    forward): a 0-d tensor with grad to add to the task loss; 0 (float32, on the model's
    first parameter's device) when no HyMoE layer has run in training."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, HyMoEFFN)
              and m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


def hymoe_stats(model: nn.Module) -> dict[str, dict[str, float | list[float]]]:
    """``stats()`` of every HyMoE layer in ``model`` (alpha, gbar, load of its last
    forward; see :meth:`HyMoEFFN.stats`) by module name."""
    return {name: m.stats() for name, m in model.named_modules() if isinstance(m, HyMoEFFN)}
