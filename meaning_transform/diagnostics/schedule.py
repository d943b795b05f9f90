"""Which steps the Doctor looks at closely.

Every step the Doctor records what is cheap: the loss and its terms, the analytic KL and
the β applied, the reparameterisation noise, every parameter's gradient norm (so a
NaN/Inf gradient or a spike is seen at the step it happens, and the NaN guard can name
the parameter), the NaN guard's check. On the steps of its :class:`Schedule` it also
takes the full gradient statistics (mean |g|, spread, zero fraction, weight norms), about
0.1 of a training step each time. The default schedule looks at the first steps, where
most faults show, then ever more sparsely: steps 0, 1, 2, 4, 8, ..., 2^k, and every 256th
step, so that a 200-step run gets 9 full steps, a 10 000-step run 53, and a fault that
appears late is still seen within 256 steps. The per-term attribution, 0.5-1 training
step each time, has its own sparser schedule, :data:`ATTRIBUTION_SCHEDULE`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """The steps (0-based, one per :meth:`Doctor.step` call) that get the full evidence:
    each of the first ``dense``, each power ``base ** k`` (k >= 1; 0: none) and each
    multiple of ``every`` (0: none). ``Schedule(every=1)`` is every step."""

    dense: int = 3
    every: int = 256
    base: int = 2

    def __post_init__(self) -> None:
        if self.dense < 0 or self.every < 0:
            raise ValueError(f"dense and every must be >= 0, got {self.dense} and {self.every}")
        if self.base == 1 or self.base < 0:
            raise ValueError(f"base must be 0 or >= 2, got {self.base}")

    def __call__(self, step: int) -> bool:
        if step < self.dense or (self.every > 0 and step % self.every == 0):
            return True
        if self.base < 2 or step < self.base:
            return False
        while step % self.base == 0:
            step //= self.base
        return step == 1

    def count(self, steps: int) -> int:
        """How many of steps 0 .. steps - 1 are on the schedule."""
        return sum(1 for step in range(steps) if self(step))


EVERY_STEP = Schedule(every=1)  # the commands' own runs: everything, every step
# the Doctor's per-term attribution (attribute_every="auto"): steps 0, 4, 16, 64, 256, 1024,
# 4096, then every 4096th; 4 in a 200-step run, 8 in 10 000. An attribution costs 0.5-1
# training step (K - 1 backward passes), so it is the sparsest of the Doctor's evidence.
ATTRIBUTION_SCHEDULE = Schedule(dense=1, every=4096, base=4)
