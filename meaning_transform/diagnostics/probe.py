"""One forward pass of a model in train mode and in eval mode, and why the two differ.

Meant for an untrained, throwaway model: the train-mode pass moves batch-norm running
statistics and draws reparameterisation noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from meaning_transform.diagnostics._modes import evaluating
from meaning_transform.diagnostics.tensor_stats import TensorStats, tensor_stats

OUTPUT_ROLES: tuple[str, ...] = ("reconstruction", "mu", "log_var", "z")  # shown when present
_DROPOUT_TYPES = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class PassSummary:
    """One forward pass: statistics of each model output, and the loss terms and total."""

    tensors: Mapping[str, TensorStats]  # reconstruction, mu, log_var, z (those present)
    loss: Mapping[str, float]  # the loss's terms (unweighted) under its names, then "total"


@dataclass(frozen=True)
class ModeProbe:
    """The same inputs through the same weights in train mode and in eval mode."""

    n_samples: int
    train: PassSummary
    eval: PassSummary
    max_abs_difference: Mapping[str, float]  # per output, train vs eval
    loss_difference: Mapping[str, float]  # per loss entry, train - eval
    differ: bool  # some output differs
    why: str  # what in this model makes the modes differ (or that nothing does)


def why_modes_differ(model: nn.Module, samples_noise: bool) -> str:
    """One sentence naming what differs between train and eval mode in ``model``."""
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    has_dropout = any(isinstance(m, _DROPOUT_TYPES) for m in model.modules())
    train_parts, eval_parts = [], []
    if samples_noise:
        train_parts.append("samples z = mu + sigma * eps with fresh noise")
        eval_parts.append("uses z = mu")
    if has_norm:
        train_parts.append("batch norm normalises with this batch's own statistics")
        eval_parts.append(
            "batch norm uses its running statistics (mean 0, variance 1 before any training)"
        )
    if has_dropout:
        train_parts.append("dropout zeroes random units")
        eval_parts.append("dropout is off")
    if not train_parts:
        return "This model has no noise, batch norm or dropout, so train and eval mode agree."
    return f"Train mode {' and '.join(train_parts)}; eval mode {' and '.join(eval_parts)}."


def mode_probe(model: nn.Module, loss_fn: nn.Module, x: Tensor) -> ModeProbe:
    """One pass over ``x`` in eval mode, then one in train mode, no update.

    ``model(x)`` returns a dict with the roles in ``OUTPUT_ROLES``; ``loss_fn(out, x)``
    a dict with ``"loss"`` (the total) and ``"terms"`` (name -> unweighted term; the
    sub-terms ``"parent/child"`` are left out). The model is left in train mode.

    Shape:
        - x: (N, D)
    """
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)  # (N, D)
    with torch.no_grad():
        with evaluating(model):
            eval_out = model(x)
            eval_pass = _pass_summary(eval_out, loss_fn(eval_out, x))
        model.train()
        train_out = model(x)
        train_pass = _pass_summary(train_out, loss_fn(train_out, x))
    shown = [k for k in OUTPUT_ROLES if k in train_out and k in eval_out]
    max_abs = _max_abs_differences({k: (train_out[k], eval_out[k]) for k in shown})
    samples_noise = (
        "z" in train_out and "mu" in train_out and bool((train_out["z"] != train_out["mu"]).any())
    )
    return ModeProbe(
        n_samples=int(x.shape[0]),
        train=train_pass,
        eval=eval_pass,
        max_abs_difference=max_abs,
        loss_difference=MappingProxyType(
            {
                name: train_pass.loss[name] - eval_pass.loss[name]
                for name in train_pass.loss
                if name in eval_pass.loss
            }
        ),
        differ=any(v != 0 for v in max_abs.values()),
        why=why_modes_differ(model, samples_noise),
    )


def _pass_summary(output: Mapping[str, Tensor], result: Mapping[str, Any]) -> PassSummary:
    tensors = tensor_stats({k: output[k] for k in OUTPUT_ROLES if k in output})
    values = {n: t for n, t in result.get("terms", {}).items() if "/" not in n}
    values["total"] = result["loss"]
    host = torch.stack([v.detach().cpu().to(torch.float64) for v in values.values()]).tolist()
    return PassSummary(tensors, MappingProxyType(dict(zip(values, host, strict=True))))


def _max_abs_differences(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> Mapping[str, float]:
    if not pairs:
        return MappingProxyType({})
    diffs = [
        (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().max()
        for a, b in pairs.values()
    ]
    host = torch.stack(diffs).cpu().tolist()  # one host copy
    return MappingProxyType(dict(zip(pairs, host, strict=True)))
