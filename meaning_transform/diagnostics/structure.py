"""Facts about a model's structure that change how its gradients must be read."""

from __future__ import annotations

from torch import nn


def biases_before_batch_norm(model: nn.Module) -> tuple[str, ...]:
    """Names of biases whose layer's output goes straight into batch norm.

    Batch norm subtracts the batch mean, so such a bias has no effect on the output and
    its gradient is zero up to rounding (~1e-8): by design, not a vanishing gradient.
    Found structurally: a layer with a ``bias`` parameter followed by a ``_BatchNorm``
    in the same ``nn.Sequential``. Names are the model's own parameter names, in
    registration order.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    found: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for layer, following in zip(children, children[1:]):
            bias = getattr(layer, "bias", None)
            if isinstance(bias, nn.Parameter) and isinstance(
                following, nn.modules.batchnorm._BatchNorm
            ):
                found.add(id(bias))
    return tuple(name for pid, name in names.items() if pid in found)
