"""Every threshold a rule or a flag uses, in one place, each with where it comes from.

A threshold must mean the same at any batch size, loss reduction (sum or mean), parameter
count and data scale: rules compare ratios (between layers, between terms, against the
run's own early steps or against the loss at the same steps), trends and fractions, not
absolute gradient norms or loss values. Beside each constant: its source (a paper, or
"this benchmark": benchmarks/faults and the scenarios in meaning_transform/scenarios.py)
and "scale-free" or why it may stay absolute. tests/diagnostics/test_threshold_edges.py
checks every rule just below and just above its edges, and that each constant here has a
comment. Imports nothing heavy, so the CLI can show them without importing torch.
"""

from __future__ import annotations

import math

from meaning_transform.constants import COMPONENT_FLOOR

# ---- loss values ----
# Absolute, like the floor it detects: mtx's loss clamps each component at this floor
# (the original write-up's minimum), after the reduction, so a floored term has this value
# at any batch size; a term that is really zero is zero at any scale.
ZERO_VALUE = COMPONENT_FLOOR  # a component at or below this is "zero-valued" (the floor)

# ---- gradients ----
# DeepDiagnosis (Wardat et al. 2022): mean |g| < 1e-7 is vanished. Their losses are means
# of order 1, so we divide mean |g| by the loss scale (median |step loss| near the end):
# a summed loss (x batch) or a loss x 1000 scales both, and the verdict does not change.
VANISHING_ABS_MEAN = 1e-7  # (mean |g|) / |loss| below this; scale-free
VANISHING_RATIO = 1e-3  # AUTOTRAINER (Zhang et al. 2021): |g_first| / |g_last|; scale-free
# ... with |g_first| < 1e-4 in AUTOTRAINER, again for losses of order 1: we divide by the
# loss scale as above; scale-free
VANISHING_FIRST = 1e-4
# The loss scale above: the median |loss| of the last this-many finite steps of the last
# step's batch size (a count; the median shrugs off a spike or a short batch)
LOSS_SCALE_STEPS = 10
EXPLODING_RATIO = 70.0  # AUTOTRAINER: |g_first| / |g_last| above this; scale-free
# No literature value for an absolute norm: a summed loss's gradient grows with the batch
# (pytorch/examples' VAE, BCE summed over 128 rows, healthy at a total norm of 1.8e3). We
# compare the run with itself: the largest finite total norm over the median of the first
# EXPLODING_BASELINE_STEPS recorded steps. Scale-free. This benchmark: the healthy runs of
# all five families stay far below (a fresh model's first gradients are its largest or
# near them; mtx's healthy scenario ~1.1x); the exploding-grad scenario (weights x 4)
# reaches ~1.7e3, lr = 1.0 ~1e5. A weight scale huge from the first step shows in the
# first/last ratio, not here.
EXPLODING_GROWTH = 1e3
EXPLODING_BASELINE_STEPS = 5  # the first steps whose median norm is the baseline (a count)
# Per-term gradient norm relative to the term's value: "no gradient" (float32 rounding
# leaves ~1e-7 relative noise, a real gradient is of order 1). Scale-free: a summed term
# scales its value and its gradient alike.
NO_GRAD_RELATIVE = 1e-8
# ... judged only for a term worth more than this share of the total loss magnitude at
# that step (sum of |weight x term|): a saturated term, e.g. a BCE at its 1e-6 clamp next
# to a total of order 1, has no gradient because it is already right. Was an absolute 1e-4
# (that is ~3e-5 of this benchmark's totals of ~3). Scale-free.
NO_GRAD_MIN_SHARE = 1e-5

# ---- the latent ----
# The batch-mean KL bounds I(x; z) from above (Hoffman & Johnson 2016, "ELBO surgery").
# By Fano, telling which half of the data an input came from (any balanced yes/no
# property) 3 times in 4 needs I >= ln 2 - h(1/4) = 0.131 nats (h: binary entropy in
# nats). Below that z says next to nothing about x. Not ln 2 (one bit): this benchmark's
# healthy anneal-demo run ends at 0.33 nats with all units active. Nats per sample, so
# scale-free in the batch, the reduction and the data scale.
COLLAPSE_KL_TOTAL = math.log(2) - (0.25 * math.log(4) + 0.75 * math.log(4 / 3))
# A decoder that ignores z cannot beat predicting the data mean; one that explains more
# than half the variance the mean leaves, next to a tiny KL, contradicts it while units
# are active (collapse not called); with no active unit it sees x another way (this
# benchmark's over-strong-decoder: 96% with KL 0.001 nats), and z is unused. A fraction.
COLLAPSE_RECON_GAIN = 0.5
COLLAPSE_MIN_STEPS = 20  # optimizer steps before collapse can be told from a fresh encoder
# KL back above its lowest point by more than this share at the end: the early dip (KL
# falls as the encoder meets the prior, rises as the decoder starts to use z), not a
# collapse, which keeps falling (this benchmark: the built-in 'Higher KL' run dips to
# 0.134 and ends 23% higher; KL-weight-30 collapse falls 0.26 -> 0.002 without a rise).
# Scale-free (a ratio of the KL to itself).
COLLAPSE_REBOUND = 0.1
# A loss that names no KL term: KL's trend from the traced analytic KL, medians of windows
# of this many recorded steps (a count; one step is too noisy)
COLLAPSE_TREND_STEPS = 5
DEAD_RELU = 0.7  # fraction of a layer's units never active; this benchmark; scale-free

# ---- loss terms against each other ----
# Ratios between terms of one loss: scale-free under a common scaling; mixed reductions
# (one term summed, one averaged) are batch-dependent-weights' finding, not these.
DOMINANCE = 100.0  # one term's weighted gradient norm over another's; this benchmark
SCALE_IMBALANCE = 1e3  # largest / smallest weighted term value; this benchmark
# ---- the loss over time (relative changes and counts: scale-free) ----
PLATEAU_IMPROVEMENT = 0.01  # the total must fall by 1% of |first epoch|; this benchmark
PLATEAU_MIN_EPOCHS = 3  # a count
# ... and this many optimizer steps: a few steps at a sane learning rate move a summed
# loss of thousands by less than 1% (pytorch/examples' VAE: 6 steps, -0.9%).
PLATEAU_MIN_STEPS = 20
OSC_RISE = 0.05  # an epoch total more than 5% above the previous one is a rise ...
OSC_RISE_SHARE = 0.2  # ... and at least 2 rises in 20% of the moves is oscillation
# ... or one step loss more than 10x the median of the OSC_SPIKE_WINDOW finite step losses
# before it of the same batch size (a short last batch of a summed loss is never compared
# with a full one), or one epoch total 10x the one before it. This benchmark: lr = 1.0
# jumps ~1e4-fold in one step; healthy steps stay within ~1.5x of their neighbours.
OSC_SPIKE = 10.0
OSC_SPIKE_WINDOW = 10  # a count of steps
OSCILLATION_MIN_EPOCHS = 5  # a count (the epoch-level criteria; spikes need 2 steps)
# Cosines between per-term gradients: scale-free. cos < 0 is conflict (PCGrad, Yu et al.
# 2020); the share and the means are this benchmark's (mild conflict is normal in a VAE).
CONFLICT_SHARE = 0.5  # share of attributed steps with cos < 0 for "sustained" ...
CONFLICT_INFO = -0.25  # ... with a mean cosine below this (mild conflict is normal)
CONFLICT_WARNING = -0.5  # strong conflict
# The reparameterisation noise (diagnostics/noise.py). eps is standard normal by
# construction, whatever the data or the loss: every noise threshold is scale-free and
# set from its standard errors. Fresh draws differ by ~1 per entry;
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
# (~1e-3 is Karpathy's healthy rule of thumb, CS231n); judged for weight matrices only,
# because vectors such as batch-norm biases start at or near zero. Relative to the weight,
# so free of the parameter count; an SGD step does grow with a summed loss, and then the
# update really is that large.
LARGE_UPDATE = 1e-1
# A loss that gives its total and its named terms: the weighted terms must explain the
# total to this relative precision (float32 sums of a few terms sit near 1e-7). Relative
# to |total|: scale-free.
TERMS_MISMATCH = 1e-3
# |value| above this at initialisation is a fault, not a choice: Glorot/He initialisation
# gives |w| of order 1/sqrt(fan_in). Absolute, but a parameter at initialisation does not
# depend on the batch, the reduction or the data.
HUGE_PARAMETER = 1e3
