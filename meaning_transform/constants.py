"""Names and numbers that several layers share, each defined once. Imports nothing heavy.

The CLI reads its option choices from here, so ``mtx --help`` never imports torch, and the
compute code validates against the same tuples.
"""

from __future__ import annotations

from typing import Literal

ScheduleType = Literal["linear", "sigmoid", "cyclical", "exponential"]
Reduction = Literal["mean", "sum"]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
# Typed as the literals so that ``x in SCHEDULES`` narrows a str to ScheduleType for mypy.
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum")
SCHEDULES: tuple[ScheduleType, ...] = ("linear", "sigmoid", "cyclical", "exponential")
DATA_KINDS: tuple[str, ...] = ("agent_states", "normal", "uniform", "binary", "one_hot")
# The --scenario names (meaning_transform.scenarios.SCENARIOS, which imports torch: shell
# completion must not; a test holds the two together).
SCENARIO_NAMES: tuple[str, ...] = (
    "healthy",
    "nan-input",
    "nan-grad",
    "zero-loss",
    "posterior-collapse",
    "frozen-noise",
    "frozen-no-z",
    "noise-scale",
    "tiny-noise",
    "no-grad-path",
    "vanishing-grad",
    "exploding-grad",
    "dying-relu",
    "unused-params",
    "loss-plateau",
    "loss-oscillation",
    "imbalance",
    "conflict",
    "hidden-term",
    "legacy-reduction",
    "kl-wrong-sign",
    "beta-ignored",
    "collapse-onset",
    "rank-nan",
    "rank-desync",
    "unsynced-bn",
    "original",
)
# check-grads --nproc: local processes at most (each imports torch, ~220 MB)
MAX_NPROC = 8
# The loss components the built-in CombinedLoss reports, in table order.
COMPONENTS: tuple[str, ...] = ("reconstruction", "kl", "semantic", "compression")
# KL per sample = -1/2 sum_z (1 + log_var - mu^2 - exp(log_var)), term by term.
KL_TERM_NAMES: tuple[str, ...] = ("one", "log_var", "neg_mu_sq", "neg_exp_log_var")
COMPONENT_FLOOR = 1e-8  # the original write-up's minimum for each component ...
TOTAL_FLOOR = 1e-6  # ... and for the total
