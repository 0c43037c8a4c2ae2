"""Inference-only model rewrites: BatchNorm folded into convolutions, channels_last, compile.

Each rewrite is checked against the model it replaces on an example batch; one that
changes the logits beyond float rounding is undone, so a model whose graph does not fit
the pattern keeps its answers and only loses the speed-up.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)


def has_convolutions(model: nn.Module) -> bool:
    """A convolutional network, not a transformer with one patch-embedding conv."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 2


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm's input is that conv's output."""
    last: dict[str, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def after_conv(name: str):
        def hook(_module, _inputs, output):
            last["conv"] = (name, output)
        return hook

    def before_norm(name: str):
        def hook(_module, inputs):
            conv = last.pop("conv", None)
            if conv is not None and inputs[0] is conv[1]:
                pairs.append((conv[0], name))
        return hook

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        with torch.inference_mode():
            model(pixel_values=example)
    finally:
        for hook in hooks:
            hook.remove()
    # A module called more than once (shared weights) is left alone.
    convs = [conv for conv, _ in pairs]
    norms = [norm for _, norm in pairs]
    return [(c, b) for c, b in pairs if convs.count(c) == 1 and norms.count(b) == 1]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a BatchNorm once its affine map lives in the conv."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    # timm's BatchNormAct2d: normalisation, then dropout and activation.
    if hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    raise TypeError(type(bn).__name__)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every conv -> BatchNorm pair folded into one conv."""
    pairs = _conv_bn_pairs(model, example)
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    count = 0
    for conv_name, bn_name in pairs:
        bn = modules[bn_name]
        if bn.track_running_stats is False or bn.running_mean is None:
            continue
        try:
            rest = _after_norm(bn)
        except TypeError:
            continue
        _set(folded, conv_name, fuse_conv_bn_eval(modules[conv_name], bn))
        _set(folded, bn_name, rest)
        count += 1
    return folded, count


def _logit_change(a: nn.Module, b: nn.Module, example: torch.Tensor) -> float:
    """Largest difference between the two models' logits, relative to the largest logit."""
    with torch.inference_mode():
        reference = a(pixel_values=example).logits.float()
        candidate = b(pixel_values=example).logits.float()
    scale = reference.abs().max().clamp_min(1e-6)
    return ((reference - candidate).abs().max() / scale).item()


@dataclass
class Optimised:
    model: nn.Module
    channels_last: bool
    notes: list[str] = field(default_factory=list)


def optimise(model: nn.Module, example: torch.Tensor, fold: bool, channels_last: bool | None,
             compile_model: bool, tolerance: float = 1e-3) -> Optimised:
    """Apply the chosen rewrites to an eval-mode model; ``example`` is a small float batch."""
    notes = []
    convolutional = has_convolutions(model)
    if fold and convolutional:
        folded, count = fold_batchnorm(model, example)
        if count:
            error = _logit_change(model, folded, example)
            if error <= tolerance:
                notes.append(f"{count} BatchNorm layers folded into their convolutions")
                model = folded
            else:
                log.warning("BatchNorm folding changed the logits (relative %.2g); not folded", error)
                notes.append("BatchNorm folding skipped: it changed the logits")
    use_cl = convolutional if channels_last is None else channels_last
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
        notes.append("channels_last")
    if compile_model:
        import torch._inductor.config as inductor_config

        # Freezing folds the (now constant) weights into the graph: the big CPU win. The
        # compiled code is cached (TORCHINDUCTOR_CACHE_DIR), so a rerun pays seconds, not a
        # minute. Shapes are static: the predictor pads a short last batch to the full size.
        inductor_config.freezing = True
        model = torch.compile(model, dynamic=False)
        notes.append("torch.compile (inductor, freezing)")
    return Optimised(model, use_cl, notes)
