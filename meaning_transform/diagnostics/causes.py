"""Root cause first: findings that follow from another finding are marked as its
consequence instead of standing as faults of their own.

One fault shows several symptoms: a NaN loss also makes the gradient norms explode and
the loss stop falling; a detached reconstruction starves the decoder (its parameters get
no gradient, the latent collapses, the loss plateaus); dead ReLUs cut the gradient path
(gradients vanish, terms lose their gradient). Reported side by side, the symptoms bury
the cause under remedies that do not apply. Here each finding whose code is a known
consequence of another finding that fired (at warning or error) is reported at ``info``,
with ``consequence_of`` naming the cause, after it, and a remedy pointing at the cause.

:data:`CAUSES` is the graph, in priority order: a code can only be a consequence of a
code listed before it, so the graph has no cycle and the earliest cause present leads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from meaning_transform.diagnostics.findings import Finding, sort_findings

# (cause, why its consequences follow, consequences), earliest cause first. Every code a
# cause names must come later in this order (or be a code that causes nothing).
CAUSES: tuple[tuple[str, str, frozenset[str]], ...] = (
    (
        "nonfinite-input",
        "NaN/Inf in the data makes every later number NaN-driven",
        frozenset(
            {
                "frozen-noise",
                "nonfinite-loss",
                "nonfinite-grad",
                "exploding-grad",
                "vanishing-grad",
                "loss-oscillation",
                "loss-plateau",
                "dying-relu",
                "posterior-collapse",
                "collapse-onset",
                "noise-scale",
                "no-grad-path",
                "grad-dominance",
                "scale-imbalance",
                "zero-loss",
                "kl-formula",
                "beta-schedule",
            }
        ),
    ),
    (
        "kl-formula",
        "a KL term with the wrong sign or scale drives the posterior away from the prior",
        frozenset(
            {
                "nonfinite-loss",
                "nonfinite-grad",
                "exploding-grad",
                "loss-oscillation",
                "loss-plateau",
                "posterior-collapse",
                "collapse-onset",
                "scale-imbalance",
                "grad-dominance",
                "zero-loss",
                "beta-schedule",
            }
        ),
    ),
    (
        "nonfinite-loss",
        "after a NaN/Inf loss the gradient statistics and the loss trend are NaN-driven",
        frozenset(
            {
                "frozen-noise",
                "nonfinite-grad",
                "exploding-grad",
                "vanishing-grad",
                "loss-oscillation",
                "loss-plateau",
                "dying-relu",
                "posterior-collapse",
                "collapse-onset",
                "noise-scale",
                "no-grad-path",
                "grad-dominance",
                "scale-imbalance",
                "zero-loss",
                "beta-schedule",
            }
        ),
    ),
    (
        "nonfinite-grad",
        "a NaN/Inf gradient corrupts the weights, and every statistic after it",
        frozenset(
            {
                "frozen-noise",
                "exploding-grad",
                "vanishing-grad",
                "loss-oscillation",
                "loss-plateau",
                "dying-relu",
                "posterior-collapse",
                "collapse-onset",
                "noise-scale",
                "no-grad-path",
                "grad-dominance",
                "scale-imbalance",
                "zero-loss",
            }
        ),
    ),
    (
        "batch-dependent-weights",
        "a term summed over the batch outweighs the averaged ones by the batch size",
        frozenset(
            {
                "exploding-grad",
                "posterior-collapse",
                "collapse-onset",
                "scale-imbalance",
                "grad-dominance",
                "zero-loss",
            }
        ),
    ),
    (
        "exploding-grad",
        "steps too large for the loss surface throw the weights about",
        frozenset(
            {
                "loss-oscillation",
                "dying-relu",
                "vanishing-grad",
                "posterior-collapse",
                "collapse-onset",
                "grad-dominance",
                "scale-imbalance",
                "loss-plateau",
            }
        ),
    ),
    (
        "loss-oscillation",
        "a learning rate too high for the loss surface throws the weights about",
        frozenset(
            {
                "dying-relu",
                "vanishing-grad",
                "posterior-collapse",
                "collapse-onset",
                "grad-dominance",
                "scale-imbalance",
                "loss-plateau",
            }
        ),
    ),
    (
        "dying-relu",
        "dead units pass no gradient to the layers before them",
        frozenset(
            {
                "vanishing-grad",
                "no-grad-path",
                "posterior-collapse",
                "collapse-onset",
                "grad-dominance",
                "scale-imbalance",
                "loss-plateau",
            }
        ),
    ),
    (
        "vanishing-grad",
        "with the gradient gone the early layers and the terms they feed stop learning",
        frozenset(
            {
                "no-grad-path",
                "posterior-collapse",
                "collapse-onset",
                "grad-dominance",
                "scale-imbalance",
                "loss-plateau",
            }
        ),
    ),
    (
        "no-grad-path",
        "a term without a gradient leaves what it should train untrained",
        frozenset(
            {
                "unused-params",
                "posterior-collapse",
                "collapse-onset",
                "grad-dominance",
                "scale-imbalance",
                "loss-plateau",
                "zero-loss",
            }
        ),
    ),
    (
        "beta-schedule",
        "the KL weight was not what the schedule says",
        frozenset({"posterior-collapse", "collapse-onset", "scale-imbalance", "grad-dominance"}),
    ),
    (
        "frozen-noise",
        "without fresh noise the KL term's pull on log_var meets no reconstruction cost",
        frozenset({"noise-scale", "grad-dominance", "posterior-collapse", "collapse-onset"}),
    ),
    (
        "noise-scale",
        "noise of the wrong scale changes what the KL and reconstruction terms trade",
        frozenset({"grad-dominance", "posterior-collapse", "collapse-onset"}),
    ),
    (
        "posterior-collapse",
        "a collapsed latent has a KL term near zero",
        frozenset({"zero-loss", "scale-imbalance", "grad-dominance"}),
    ),
    (
        "collapse-onset",
        "a collapsed latent has a KL term near zero",
        frozenset({"zero-loss", "scale-imbalance", "grad-dominance"}),
    ),
    (
        "scale-imbalance",
        "a term 1000x smaller than another has a gradient to match",
        frozenset({"grad-dominance"}),
    ),
)

ORDER: tuple[str, ...] = tuple(code for code, _, _ in CAUSES)


def cause_of(code: str, present: Sequence[str]) -> tuple[str, str] | None:
    """The earliest cause among ``present`` codes that ``code`` follows from, and why."""
    for cause, why, consequences in CAUSES:
        if cause != code and cause in present and code in consequences:
            return cause, why
    return None


# Pairs (earlier, later) whose order in CAUSES is the usual one the other way round, but
# whose evidence says which came first: a gradient that went NaN/Inf while the loss was
# finite (sqrt at 0, a custom backward) makes the weights, and then the loss, NaN.
FIRST_LEADS: tuple[tuple[str, str, str], ...] = (
    (
        "nonfinite-grad",
        "nonfinite-loss",
        "the gradient went NaN/Inf while the loss was finite, and the update made the "
        "weights and then the loss NaN",
    ),
)


def _first_step(found: Sequence[Finding], code: str) -> int | None:
    steps = [f.evidence.get("first_step") for f in found if f.code == code]
    ints = [s for s in steps if isinstance(s, int)]
    return min(ints) if ints else None


def _led_by_an_earlier_fault(found: Sequence[Finding]) -> dict[str, tuple[str, str]]:
    """Codes that follow from a finding whose evidence shows it came first (FIRST_LEADS)."""
    led: dict[str, tuple[str, str]] = {}
    for first, later, why in FIRST_LEADS:
        a, b = _first_step(found, first), _first_step(found, later)
        # b is None: the later finding has no first step of its own (nonfinite-loss fired
        # for steps skipped on a non-finite gradient while every loss value was finite)
        if a is not None and (b is None or a < b) and any(f.code == later for f in found):
            led[later] = (first, why)
    return led


def _as_consequence(f: Finding, cause: str, why: str) -> Finding:
    return replace(
        f,
        severity="info",
        consequence_of=cause,
        title=f"{f.title} (consequence of {cause})",
        remedy=f"Fix {cause} first: {why}. This finding follows from it.",
    )


def mark_consequences(found: Sequence[Finding]) -> list[Finding]:
    """The findings, worst first, each consequence marked and placed after its cause.

    A finding is a consequence when a finding of a cause code (:data:`CAUSES`) fired at
    warning or error in the same run; it is reported at ``info`` with ``consequence_of``
    set and a remedy pointing at the cause. Info findings cause nothing.
    """
    present = [f.code for f in found if f.severity in ("error", "warning")]
    led = _led_by_an_earlier_fault(found)
    present = [c for c in present if c not in led]
    marked: list[Finding] = []
    for f in found:
        if f.code in led and not f.consequence_of:
            cause, why = led[f.code]
            marked.append(_as_consequence(f, cause, why))
            continue
        hit = cause_of(f.code, present) if not f.consequence_of else None
        if hit is None:
            marked.append(f)
            continue
        cause, why = hit
        marked.append(_as_consequence(f, cause, why))
    roots = sort_findings(f for f in marked if not f.consequence_of)
    rank = {f.code: i for i, f in enumerate(roots)}
    # each consequence right after its cause; consequences of one cause by code
    consequences = sorted(
        (f for f in marked if f.consequence_of),
        key=lambda f: (rank.get(f.consequence_of, len(rank)), f.code, f.where),
    )
    out: list[Finding] = []
    for i, root in enumerate(roots):
        out.append(root)
        out.extend(c for c in consequences if rank.get(c.consequence_of) == i)
    out.extend(c for c in consequences if c.consequence_of not in rank)
    return out
