"""Run a model in eval mode for a measurement, then put every module back as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode inside the block and restore each module's own mode after.

    Restoring per module (not a blanket ``model.train()``) keeps a deliberately frozen
    sub-module, e.g. a BatchNorm held in eval mode, frozen.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
