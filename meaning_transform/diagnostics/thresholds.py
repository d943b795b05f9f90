"""Every threshold a rule or a flag uses, in one place (literature values where they exist).

Thresholds on gradient norms and loss values are relative or per-sample wherever the
quantity scales with the batch; see the README's findings table for the sources.
Imports nothing heavy, so the CLI can show them without importing torch.
"""

from __future__ import annotations

from meaning_transform.constants import COMPONENT_FLOOR

ZERO_VALUE = COMPONENT_FLOOR  # a component at or below this is "zero-valued" (the floor)
VANISHING_ABS_MEAN = 1e-7  # DeepDiagnosis: mean |g| below this
VANISHING_RATIO = 1e-3  # AUTOTRAINER: |g_first| / |g_last| below this ...
VANISHING_FIRST = 1e-4  # ... with |g_first| below this
EXPLODING_RATIO = 70.0  # AUTOTRAINER: |g_first| / |g_last| above this
EXPLODING_NORM = 1e3  # total norm above this (no literature value; see README)
COLLAPSE_MIN_STEPS = 20  # optimizer steps before collapse can be told from a fresh encoder
DEAD_RELU = 0.7  # fraction of a layer's units never active
DOMINANCE = 100.0  # one term's weighted gradient norm over another's
NO_GRAD_RELATIVE = 1e-8  # a term's gradient norm relative to its value: "none"
NO_GRAD_MIN_VALUE = 1e-4  # ... judged only for a term worth at least this
SCALE_IMBALANCE = 1e3  # largest / smallest weighted term value
PLATEAU_IMPROVEMENT = 0.01  # total must fall by 1% between first and last epoch
PLATEAU_MIN_EPOCHS = 3
# ... and this many optimizer steps: a few steps at a sane learning rate move a summed
# loss of thousands by less than 1% (pytorch/examples' VAE: 6 steps, -0.9%).
PLATEAU_MIN_STEPS = 20
OSC_RISE = 0.05  # an epoch total more than 5% above the previous one is a rise ...
OSC_RISE_SHARE = 0.2  # ... and at least 2 rises in 20% of the moves is oscillation
OSC_SPIKE = 10.0  # ... or one epoch total more than 10x the one before it
OSCILLATION_MIN_EPOCHS = 5
CONFLICT_SHARE = 0.5  # share of attributed steps with cos < 0 for "sustained" ...
CONFLICT_INFO = -0.25  # ... with a mean cosine below this (mild conflict is normal)
CONFLICT_WARNING = -0.5  # strong conflict
# The reparameterisation noise (diagnostics/noise.py). Fresh draws differ by ~1 per entry;
# a repeated draw, recovered as (z - mu) / sigma, matches only to rounding, which grows as
# sigma shrinks next to |mu|: hence a loose "same" and a median over the compared entries.
NOISE_SAME = 1e-3  # median |eps_a - eps_b| at or below this: the same draw
NOISE_SAME_OUTPUT = 1e-5  # two passes of one batch: max |diff| / max |output| at or below
NOISE_FRESH_SHARE = 0.5  # fresh when more than this share of comparable pairs differ
NOISE_MIN_SAMPLES = 500  # eps entries before its scale is judged (std's error ~0.03 there)
NOISE_MEAN_MAX = 0.25  # |mean eps| above this (~6 standard errors at 500 entries)
NOISE_STD_LOW = 0.8  # std of eps below this (0.01-scaled noise gives 0.01) ...
NOISE_STD_HIGH = 1.25  # ... or above this (each ~6 standard errors from 1 at 500 entries)
# z - mu ~ exp(k * log_var): k = 0.5 is right, 1 is exp(log_var) used as sigma, 0 is sigma
# left out. Flag |k - 0.5| above the tolerance, judged only when k's standard error is at
# most NOISE_EXPONENT_MAX_SE (the edge is then 5 standard errors from 0.5 and from 1).
# The error is ~1.1 / (sqrt(entries) * std(log_var)): at 5000 entries log_var must vary by
# 0.31, at 50000 by 0.1. Where it varies less, exp(log_var) and exp(0.5 * log_var) differ
# too little to be told apart, and the exponent is left unjudged (and said so).
NOISE_EXPONENT_TOLERANCE = 0.25
NOISE_EXPONENT_MAX_SE = 0.05
# check-grads' per-parameter flags. ||dw|| / ||w|| above LARGE_UPDATE in one step is large
# (~1e-3 is Karpathy's healthy rule of thumb); judged for weight matrices only, because
# vectors such as batch-norm biases start at or near zero.
LARGE_UPDATE = 1e-1
# A loss that gives its total and its named terms: the weighted terms must explain the
# total to this relative precision (float32 sums of a few terms sit near 1e-7).
TERMS_MISMATCH = 1e-3
HUGE_PARAMETER = 1e3  # |value| above this at initialisation is a fault, not a choice
