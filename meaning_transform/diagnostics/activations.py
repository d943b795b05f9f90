"""Dead units of ReLU-family activations, however the model calls them.

:func:`dead_units` runs the model on data and reports, per activation, the fraction of its
units that were never active. A unit is one entry along dim 1 of the activation's output:
a feature of a Linear output ``(B, F)``, a channel of a conv output ``(B, C, L)`` /
``(B, C, H, W)`` (active if positive anywhere in its map). "Active" means output > 0,
which for every activation here (leaky ones included) means the positive side.

Activations are found both ways a model can call them:

- modules (:data:`ACTIVATION_MODULES`: ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ReLU6``,
  ``nn.ELU``, ...) through a forward hook each, named by their qualified name;
- functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu_``,
  ``F.leaky_relu``, ``F.relu6``, ... see :data:`FUNCTIONAL_ACTIVATIONS`) through a
  ``torch.overrides.TorchFunctionMode`` that is pushed only around the measuring forward
  passes, so training never pays for it.

A functional call is named ``"<anchor> → <function>"``. The anchor is the module whose
forward returned last inside the module now running, i.e. the layer that produced the
input in ``h = F.relu(self.fc1(x))``: ``"fc1 → F.relu"``. When nothing has returned yet
inside the running module, the anchor is that module itself (``"<model>"`` for the root):
``encoder.act`` in a custom activation module that calls ``F.relu`` on its input. The
anchor is where in the code to look, not a proof of data flow: in
``F.relu(a + self.fc2(b))`` it is ``fc2``. The k-th call (k >= 2) of the same function
after the same anchor within one forward pass gets ``#k`` (``"<model> → F.relu#2"``); a
module activation called several times per pass (one ``nn.ReLU`` reused after every
layer) likewise: ``"relu"``, ``"relu#2"``, ... Each call is its own set of units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from meaning_transform.diagnostics._modes import evaluating

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
)
ROOT = "<model>"  # the anchor name of the model itself (its qualified name is "")


def _functional_table() -> dict[object, str]:
    """The function objects a mode sees for ReLU-family calls -> how a user spells them.

    Aliases are one object (``F.relu_ is torch.relu_``, ``F.prelu is torch.prelu``); the
    first spelling listed names it. Names missing from this torch build are skipped.
    """
    spellings: list[tuple[str, object, str]] = [
        ("F", F, "relu"),
        ("F", F, "relu_"),
        ("F", F, "relu6"),
        ("F", F, "leaky_relu"),
        ("F", F, "leaky_relu_"),
        ("F", F, "elu"),
        ("F", F, "elu_"),
        ("F", F, "celu"),
        ("F", F, "celu_"),
        ("F", F, "selu"),
        ("F", F, "selu_"),
        ("F", F, "prelu"),
        ("F", F, "rrelu"),
        ("F", F, "rrelu_"),
        ("torch", torch, "relu"),
        ("torch", torch, "relu_"),
        ("torch", torch, "celu"),
        ("torch", torch, "selu"),
        ("torch", torch, "rrelu"),
        ("Tensor", Tensor, "relu"),
        ("Tensor", Tensor, "relu_"),
    ]
    table: dict[object, str] = {}
    for owner, namespace, attr in spellings:
        func = getattr(namespace, attr, None)
        if func is not None:
            table.setdefault(func, f"{owner}.{attr}")
    return table


FUNCTIONAL_ACTIVATIONS: dict[object, str] = _functional_table()


def _active_units(output: Tensor) -> Tensor:
    """(B, C, ...) activation output -> (C,) bool: positive anywhere for some sample.

    A NaN output is counted as active: it says the weights are broken (the non-finite
    rules report that), not that the unit is dead."""
    positive = (output > 0) | torch.isnan(output)
    if positive.dim() == 1:  # (B,): one unit
        return positive.any().reshape(1)
    if positive.dim() > 2:
        positive = positive.flatten(2).any(dim=2)  # (B, C)
    return positive.any(dim=0)  # (C,)


@dataclass
class _Frame:
    """One module whose forward is running, and its child that returned last."""

    module: nn.Module
    name: str
    last_returned: str | None = None


class _Recorder:
    """Which units of each activation were ever active, over the measuring passes."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): name or ROOT for name, m in model.named_modules()}
        self.ever_active: dict[str, Tensor] = {}  # first-run order
        self._stack: list[_Frame] = []
        self._calls: dict[str, int] = {}  # calls per base name in the current pass

    def start_pass(self) -> None:
        self._stack.clear()
        self._calls.clear()

    def before_forward(self, module: nn.Module, args: Any) -> None:
        self._stack.append(_Frame(module, self.names[id(module)]))

    def after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        frame = self._stack.pop()
        if self._stack:
            self._stack[-1].last_returned = frame.name
        if isinstance(module, ACTIVATION_MODULES):
            self._record(frame.name, output)

    def functional(self, label: str, output: Any) -> None:
        if not self._stack:
            anchor = ROOT
        else:
            top = self._stack[-1]
            if isinstance(top.module, ACTIVATION_MODULES):
                return  # nn.ReLU's own F.relu: its forward hook records it
            anchor = top.last_returned or top.name
        self._record(f"{anchor} → {label}", output)

    def _record(self, base: str, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() == 0:
            return
        k = self._calls.get(base, 0) + 1
        self._calls[base] = k
        name = base if k == 1 else f"{base}#{k}"
        active = _active_units(output)  # (C,)
        seen = self.ever_active.get(name)
        if seen is None:
            self.ever_active[name] = active
        elif seen.shape != active.shape:
            raise ValueError(
                f"activation {name!r} had {seen.numel()} units along dim 1 in one batch "
                f"and {active.numel()} in another; dead units need a fixed dim 1"
            )
        else:
            self.ever_active[name] = seen | active


class _FunctionalActivations(TorchFunctionMode):
    """Reports every ReLU-family functional call's output; passes everything through."""

    def __init__(self, on_call: Callable[[str, Any], None]) -> None:
        super().__init__()
        self._on_call = on_call

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # The mode is off inside this handler: F.relu's own torch.relu is not seen again.
        output = func(*args, **(kwargs or {}))
        label = FUNCTIONAL_ACTIVATIONS.get(func)
        if label is not None:
            self._on_call(label, output)
        return output


@contextmanager
def measuring(model: nn.Module, *tensors: Tensor) -> Iterator[None]:
    """Eval mode, ``no_grad`` and a forked RNG for a measuring forward pass.

    The CPU RNG and the CUDA RNGs of the devices of the model and ``tensors`` are restored
    afterwards, so a forward that draws noise even in eval mode does not shift the
    caller's random stream (a generator the model owns is not restored).
    """
    devices = {p.device for p in model.parameters()} | {t.device for t in tensors}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), evaluating(model), torch.no_grad():
        yield


def _iter_batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def dead_units(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 1024,
    outputs: list[tuple[Tensor, Any]] | None = None,
) -> dict[str, float]:
    """Fraction of each ReLU-family activation's units that are never active on ``x``.

    A unit (one entry along dim 1, see the module docstring) is dead when its output is
    ``<= 0`` everywhere for every sample in ``x``. Module and functional activations are
    both seen and named as the module docstring describes. Runs in eval mode under
    ``no_grad`` with the RNG forked (BatchNorm uses its running statistics), restores each
    module's mode afterwards and removes every hook and the function mode. The dying-ReLU
    rule fires at a fraction >= 0.7. With ``outputs``, each batch and what the model
    returned for it are appended there, so that one pass also serves other eval-mode
    measurements (the Doctor's latent health, :func:`~.latent.latent_of_outputs`).

    Returns:
        ``{activation name: dead fraction}`` in the order the activations first ran;
        empty when the model runs none.

    Example:
        >>> fractions = dead_units(model, data[:1024])
        >>> fractions["fc1 → F.relu"]  # pytorch/examples' VAE: h1 = F.relu(self.fc1(x))
    """
    recorder = _Recorder(model)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(recorder.before_forward))
        handles.append(module.register_forward_hook(recorder.after_forward))
    device = next((p.device for p in model.parameters()), x.device)
    try:
        with measuring(model, x), _FunctionalActivations(recorder.functional):
            for batch in _iter_batches(x, batch_size):
                recorder.start_pass()
                rows = batch.to(device)
                output = model(rows)
                if outputs is not None:
                    outputs.append((rows, output))
    finally:
        for handle in handles:
            handle.remove()
    if not recorder.ever_active:
        return {}
    names = list(recorder.ever_active)
    fractions = torch.stack(
        [1.0 - recorder.ever_active[n].to(device, torch.float32).mean() for n in names]
    ).cpu()  # the one host copy
    return dict(zip(names, fractions.tolist(), strict=True))
