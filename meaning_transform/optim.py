"""Adam for mtx's own training loop, without the import of ``torch._dynamo``.

Every ``torch.optim`` optimizer wraps ``add_param_group``, ``zero_grad`` and ``step``'s
helpers in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo``. That
import costs 1.0-1.2 s and about 70 MB on a 2-core machine: a quarter of a default
``mtx debug-loss`` run, spent on a compiler the doctor never uses. The loop in
:mod:`meaning_transform.training` only needs plain Adam, so it uses :class:`Adam` here,
which performs the same tensor operations in the same order as ``torch.optim.Adam``'s
single-tensor path (the one it takes on the CPU): ``amsgrad=False``, ``maximize=False``,
L2 weight decay added to the gradient. ``tests/test_optim.py`` checks that the weights
are bit-identical to ``torch.optim.Adam``'s after many steps, with and without weight
decay and with parameters that receive no gradient.

Any ``torch.optim`` optimizer can still be passed to ``train(optimizer=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class Adam:
    """Adam (Kingma & Ba, 2015) with ``torch.optim.Adam``'s defaults and arithmetic.

    Args:
        params: the tensors to optimise (e.g. ``model.parameters()``).
        lr: learning rate.
        betas: decay rates of the first and second moment estimates.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty, added to the gradient (not decoupled, as in AdamW).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"invalid beta parameter at index {i}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("some parameters appear more than once")
        if any(torch.is_complex(p) for p in self.params):
            raise TypeError("complex parameters are not supported; use torch.optim.Adam")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        # Per parameter, created on its first gradient: steps taken, first and second moments.
        self.steps: list[int] = [0] * len(self.params)
        self._exp_avg: list[Tensor | None] = [None] * len(self.params)
        self._exp_avg_sq: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's ``.grad``, as ``torch.optim`` does."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            exp_avg, exp_avg_sq = self._exp_avg[i], self._exp_avg_sq[i]
            if exp_avg is None or exp_avg_sq is None:
                exp_avg = self._exp_avg[i] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
                exp_avg_sq = self._exp_avg_sq[i] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
            self.steps[i] += 1
            step = float(self.steps[i])
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
