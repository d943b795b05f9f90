"""Per-loss-term gradient attribution: which term actually moves the weights.

A loss term can dominate the loss value and still contribute nothing to the update (the
original hard-threshold semantic term had no gradient path at all). For each term t_i we
take its own gradient g_i = d t_i / d theta over all parameters and report:

- ``norm``            ||g_i||                     (unweighted)
- ``weighted_norm``   ||w_i g_i|| = |w_i| ||g_i||
- ``share``           <w_i g_i, g> / ||g||^2, with g = sum over ``total_of`` of w_i g_i.
  This is the fraction of the total gradient that lies along term i's contribution
  (its projection share). Over the ``total_of`` terms the shares sum to exactly 1; a share
  can be negative (the term pulls against the total) or above 1 (others cancel it).
  Sub-terms such as ``"semantic/position"`` get the same projection share with their own
  weight (1.0 unless given); they are parts of a total term and do not add to the sum.
- ``cosine``          cos(g_i, g_j); 0.0 when either norm is 0 (reported in
  ``zero_gradient``), so the matrix is NaN-free for finite gradients. PCGrad (Yu et al.
  2020) calls two terms conflicting when the cosine is < 0: see ``conflicts``.

Everything is reduced on the device to a k x k Gram matrix G_ij = <g_i, g_j> (one dot
product per parameter and pair, accumulated over parameters in float64 except on MPS; small
parameters are stacked and multiplied in float64 instead) and copied to the host once.

Two ways to get the g_i: ``"loop"`` — one ``torch.autograd.grad`` per term on the retained
graph — and ``"batched"`` — one call over the stacked terms with ``is_grads_batched=True``
(vmap over the backward), falling back to ``"loop"`` when an op has no batching rule.
On a CPU, "loop" is the faster of the two for an MLP: autograd prunes what a term does not
reach (the KL term never enters the decoder), while the vmapped backward pushes every
term's cotangent, zero or not, through the whole graph, and batching the matrix products
buys nothing on 2 cores. On an accelerator with a small model, where a backward is bound
by kernel launches, "batched" can win. ``docs/benchmarks.md`` has the numbers.

With ``write_grad=True`` the combined gradient sum w_i g_i is added to ``param.grad``,
exactly what ``total.backward()`` would have accumulated, so a training step that wants
attribution does NOT pay for a second backward pass: attribute, then ``optimizer.step()``.
Per-term gradients are never stacked or copied to float64 wholesale: a multi-megabyte
temporary per step costs more in page faults than the arithmetic it feeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor, nn

Method = Literal["batched", "loop"]
METHODS: tuple[str, ...] = ("batched", "loop")


@dataclass(frozen=True)
class Attribution:
    """Per-term gradient attribution at one step (plain host floats, JSON-friendly).

    ``cosine[a][b]`` is cos(g_a, g_b) for every pair including a == b (1.0, or 0.0 for a
    term with zero gradient). ``zero_gradient`` names the terms whose gradient is exactly
    zero for every parameter (no gradient path, or a path that carries nothing);
    ``detached`` is the subset whose tensor does not require grad at all.
    """

    terms: tuple[str, ...]
    weights: dict[str, float]
    total_of: tuple[str, ...]
    norm: dict[str, float]
    weighted_norm: dict[str, float]
    share: dict[str, float]
    cosine: dict[str, dict[str, float]]
    total_norm: float  # ||sum over total_of of w_i g_i||
    method: Method  # the method that produced the numbers (after any fallback)
    fallback_reason: str | None  # why "batched" fell back to "loop", else None
    zero_gradient: tuple[str, ...]
    detached: tuple[str, ...]
    conflicts: tuple[tuple[str, str], ...]  # pairs with cosine < 0 (PCGrad)
    # the term whose gradient was the total's minus the others' (see begin_attribution),
    # None when every term had its own backward pass
    derived: str | None = None
    step: int | None = None  # the Doctor's step it was taken at (None: not in a run)

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-friendly data (tuples become lists)."""
        return asdict(self)


@dataclass(frozen=True)
class AttributionSummary:
    """Per-term attribution over a run: every number is the mean over the attributed steps.

    ``cosine[a][b]`` is the mean of cos(g_a, g_b) over the steps (the rules judge
    conflict on the same steps); ``zero_gradient`` is the last attributed step's.
    """

    steps_attributed: int
    method: str
    weights: Mapping[str, float]
    norm: Mapping[str, float]  # ||g_term||
    weighted_norm: Mapping[str, float]  # ||w * g_term||
    share: Mapping[str, float]  # projection of w * g on the total gradient
    cosine: Mapping[str, Mapping[str, float]]
    zero_gradient: tuple[str, ...]


def summarise_attributions(attributions: Sequence[Attribution]) -> AttributionSummary | None:
    """Mean over the attributed steps of every per-term number; None when there are none.

    A term is averaged over the steps that attributed it with a finite value: a term whose
    weight was 0 at some steps (β = 0 at the start of an annealing run) is left out of
    those steps rather than turning its mean into NaN.
    """
    if not attributions:
        return None
    last = attributions[-1]
    names = tuple(dict.fromkeys(n for a in attributions for n in a.terms))

    def mean(values: Iterable[float | None]) -> float:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def per_term(key: str) -> Mapping[str, float]:
        return MappingProxyType(
            {n: mean(getattr(a, key).get(n) for a in attributions) for n in names}
        )

    cosine = {
        a: MappingProxyType(
            {b: mean(att.cosine.get(a, {}).get(b) for att in attributions) for b in names}
        )
        for a in names
    }
    return AttributionSummary(
        steps_attributed=len(attributions),
        method=last.method,
        weights=MappingProxyType(dict(last.weights)),
        norm=per_term("norm"),
        weighted_norm=per_term("weighted_norm"),
        share=per_term("share"),
        cosine=MappingProxyType(cosine),
        zero_gradient=tuple(last.zero_gradient),
    )


def _named_params(
    params: nn.Module | Iterable[tuple[str, Tensor]],
) -> list[tuple[str, Tensor]]:
    items = params.named_parameters() if isinstance(params, nn.Module) else params
    seen: set[int] = set()
    out = []
    for name, p in items:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise ValueError("expected at least one parameter that requires grad, got none")
    return out


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


PerTerm = list[list[Tensor | None]]  # [term][parameter] -> gradient or None (not reached)
_SMALL = 1 << 16  # parameters with k * numel up to this are stacked for one float64 GEMM


def _batched_grads(terms: list[Tensor], params: list[Tensor]) -> PerTerm:
    """Every term's gradient w.r.t. every parameter from ONE vmapped backward."""
    vector = torch.stack(terms)  # (k,)
    eye = torch.eye(len(terms), dtype=vector.dtype, device=vector.device)  # (k, k)
    grads = torch.autograd.grad(
        vector,
        params,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,  # kept so that a failure can still fall back to the loop
        allow_unused=True,
    )  # per parameter: (k, *shape) or None
    return [[None if g is None else g[i] for g in grads] for i in range(len(terms))]


def _loop_grads(terms: list[Tensor], params: list[Tensor], retain_graph: bool) -> PerTerm:
    """Every term's gradient w.r.t. every parameter, one backward per term."""
    return [
        list(
            torch.autograd.grad(
                t,
                params,
                retain_graph=retain_graph or i < len(terms) - 1,
                allow_unused=True,
            )
        )
        for i, t in enumerate(terms)
    ]


def _reaching(per_term: PerTerm, j: int) -> dict[int, Tensor]:
    """Term index -> gradient w.r.t. parameter ``j``, for the terms that reach it, in order."""
    column: dict[int, Tensor] = {}
    for a, grads in enumerate(per_term):
        g = grads[j]
        if g is not None:
            column[a] = g
    return column


def _gram(per_term: PerTerm, device: torch.device, acc: torch.dtype) -> Tensor:
    """(k, k) Gram matrix sum over parameters of <g_a, g_b>, accumulated in ``acc``.

    Large parameters: one BLAS dot product per pair and parameter (no temporary). All the
    small ones together: each term's small gradients are concatenated (zeros where a term
    does not reach) into one (k, n_small) matrix, multiplied in ``acc`` with one GEMM.
    """
    k = len(per_term)
    n_params = len(per_term[0]) if per_term else 0
    small: list[tuple[int, Tensor]] = []  # (parameter, the first reaching term's gradient)
    dots: list[Tensor] = []
    dot_index: list[tuple[int, int]] = []
    for j in range(n_params):
        column = _reaching(per_term, j)
        if not column:
            continue
        first = next(iter(column.values()))
        if k * first.numel() <= _SMALL or first.dtype not in _DOT_DTYPES:
            small.append((j, first))
            continue
        flat = {a: g.reshape(-1) for a, g in column.items()}
        for a in flat:
            for b in flat:
                if a <= b:
                    dots.append(torch.dot(flat[a], flat[b]))
                    dot_index.append((a, b))
    gram = torch.zeros(k, k, dtype=acc, device=device)
    if small:
        rows = []
        for a in range(k):
            parts = []
            for j, like in small:
                g = per_term[a][j]
                parts.append((torch.zeros_like(like) if g is None else g).reshape(-1).to(device))
            rows.append(torch.cat(parts))
        block = torch.stack(rows).to(acc)  # (k, n_small)
        gram += block @ block.T
    if dots:
        values = torch.stack([d.to(device) for d in dots]).to(acc)  # (n_dots,)
        rows_i = torch.tensor([a for a, _ in dot_index], device=device)
        cols_i = torch.tensor([b for _, b in dot_index], device=device)
        upper = torch.zeros(k, k, dtype=acc, device=device)
        upper.index_put_((rows_i, cols_i), values, accumulate=True)
        gram += upper + upper.T - torch.diag(upper.diagonal())
    return gram


_DOT_DTYPES = (torch.float32, torch.float64)


def term_attribution(
    terms: Mapping[str, Tensor],
    weights: Mapping[str, float],
    params: nn.Module | Iterable[tuple[str, Tensor]],
    method: Method = "batched",
    retain_graph: bool = True,
    total_of: tuple[str, ...] | None = None,
    write_grad: bool = False,
) -> Attribution:
    """Attribute the total gradient to the loss terms that produced it.

    Args:
        terms: name -> unweighted scalar loss term, still attached to the graph.
        weights: name -> weight w_i. Required for every term in ``total_of``; others
            (sub-terms) default to 1.0.
        params: a module (its trainable parameters) or ``(name, parameter)`` pairs.
        method: ``"batched"`` (vmapped backward, falls back to ``"loop"`` if an op has no
            batching rule; the result's ``method`` says which ran) or ``"loop"``.
        retain_graph: keep the graph for a later backward. ``"batched"`` always retains
            it during its attempt so that it can fall back.
        total_of: the terms whose weighted sum is the total. Default: every term whose
            name has no ``"/"`` (``"semantic/position"`` is part of ``"semantic"``).
        write_grad: add sum over ``total_of`` of w_i g_i to ``param.grad`` (accumulating,
            as ``backward()`` does), so the step needs no second backward. Parameters that
            no term reaches are left untouched, as ``backward()`` leaves them.

    Returns:
        An :class:`Attribution`; one host copy.

    Example:
        >>> out = loss_fn(model(x), x)
        >>> terms = {"recon": out["reconstruction_loss"], "kl": out["kl_loss"]}
        >>> att = term_attribution(terms, {"recon": 1.0, "kl": beta}, model, write_grad=True)
        >>> optimizer.step()  # uses the gradient attribution wrote
    """
    names, total_names, w = _check_terms(terms, weights, method, total_of)

    named = _named_params(params)
    plist = [p for _, p in named]
    connected = [i for i, n in enumerate(names) if terms[n].requires_grad]
    per_term, used, fallback_reason = _term_grads(
        terms, names, connected, plist, method, retain_graph
    )
    attribution = _attribution(
        names, w, total_names, connected, per_term, plist, used, fallback_reason, None
    )
    if write_grad and connected:
        total_w = [w[names[i]] if names[i] in total_names else 0.0 for i in connected]
        with torch.no_grad():
            _write_total_grad(per_term, plist, total_w)
    return attribution


@dataclass
class PendingAttribution:
    """Every term's gradient but one, waiting for the total's (see :func:`begin_attribution`)."""

    names: tuple[str, ...]
    weights: dict[str, float]
    total_of: tuple[str, ...]
    connected: list[int]  # term indices with a graph, in the order of ``per_term``
    derived: int  # index into ``connected`` of the term still to come (-1: none)
    per_term: PerTerm  # its row is empty until complete_attribution fills it
    params: list[Tensor]
    before: list[Tensor | None]  # each .grad before the backward (None: there was none)
    method: Method
    fallback_reason: str | None


def begin_attribution(
    terms: Mapping[str, Tensor],
    weights: Mapping[str, float],
    params: nn.Module | Iterable[tuple[str, Tensor]],
    derive: str | None,
    method: Method = "loop",
    total_of: tuple[str, ...] | None = None,
    grads_before: bool = True,
) -> PendingAttribution:
    """Start an attribution whose ``derive`` term comes from the total's own backward.

    With K terms, K - 1 get a backward pass here (each only through the part of the
    network it reaches: autograd runs no node that does not lead to the term, so the KL
    term's pass never enters the decoder); the graph is kept for the training step's own
    ``total.backward()``. Once that backward has written the total's gradient g, hand every
    parameter's ``.grad`` to :func:`complete_attribution`, which takes the last term by
    linearity: g_d = (g - sum over the others of w_i g_i) / w_d. That holds only when the
    backward is of sum over ``total_of`` of w_i * term_i and nothing else: check it first
    with ``derive=None`` (every term gets its own pass; :func:`complete_attribution` then
    returns the relative residual of that identity), as the Doctor does.

    ``derive`` must be in the total with a nonzero weight and reach every parameter the
    total reaches (else the rounding left over where it does not would be read as its
    gradient); choose the term whose backward costs most (it reaches the most), the largest.

    ``grads_before``: remember each ``.grad`` now, to be subtracted from the ``.grad``
    handed to :func:`complete_attribution` (gradient accumulation). ``False`` when the
    caller hands over the backward's own incoming gradients instead (``Tensor`` hooks, as
    the Doctor does: a loop may zero ``.grad`` between this call and its backward).
    """
    names, total_names, w = _check_terms(terms, weights, method, total_of)
    if derive is not None and (derive not in total_names or w[derive] == 0.0):
        raise ValueError(f"derive must name a term of the total with a nonzero weight: {derive!r}")
    named = _named_params(params)
    plist = [p for _, p in named]
    connected = [i for i, n in enumerate(names) if terms[n].requires_grad]
    derived = names.index(derive) if derive is not None else -1
    if derived >= 0 and derived not in connected:
        raise ValueError(f"the term to derive has no graph: {derive!r}")
    own = [i for i in connected if i != derived]
    before = [
        None if p.grad is None or not grads_before else p.grad.detach().clone() for p in plist
    ]
    per_term, used, reason = _term_grads(terms, names, own, plist, method, retain_graph=True)
    if derived >= 0:
        per_term.insert(connected.index(derived), [])
    return PendingAttribution(
        names=names,
        weights=w,
        total_of=total_names,
        connected=connected,
        derived=connected.index(derived) if derived >= 0 else -1,
        per_term=per_term,
        params=plist,
        before=before,
        method=used,
        fallback_reason=reason,
    )


@torch.no_grad()
def complete_attribution(
    pending: PendingAttribution, grads: Sequence[Tensor | None] | None
) -> tuple[Attribution, float]:
    """The attribution, from ``pending`` and every parameter's ``.grad`` after the total's
    backward (in ``pending.params`` order), and the relative residual
    ||g - sum w_i g_i|| / ||g|| of the terms' weighted sum against the total's gradient g
    (measured with every term's own gradient; NaN for a derived term, whose gradient is
    that difference). A derived gradient within float32 rounding of zero
    (:data:`DERIVED_ZERO` of the largest contribution) is reported as exactly zero.
    ``grads=None``: no backward of the total came; only an attribution with every term's
    own gradient can be completed then (residual NaN), one with a derived term raises.
    """
    names, w = pending.names, pending.weights
    if grads is None:
        if pending.derived >= 0:
            raise ValueError("a derived term needs the total's gradient: pass grads")
        return _finished(pending, pending.per_term, None), math.nan
    if len(grads) != len(pending.params):
        raise ValueError(f"expected {len(pending.params)} gradients, got {len(grads)}")
    weights = [w[names[i]] if names[i] in pending.total_of else 0.0 for i in pending.connected]
    totals = [g if b is None or g is None else g - b for g, b in zip(grads, pending.before)]
    if pending.derived < 0:
        sums = _weighted_sums(pending.per_term, weights, len(pending.params), skip=-1)
        diff = [
            (t if s is None else t - s) if t is not None else s
            for t, s in zip(totals, sums, strict=True)
        ]
        return _finished(pending, pending.per_term, None), _relative(diff, totals)
    d, wd = pending.derived, weights[pending.derived]
    derived: list[Tensor | None] = []
    for j, t in enumerate(totals):  # g_d = (g - sum over the others of w_i g_i) / w_d
        parts: list[tuple[Tensor, float]] = []
        for i, (row, wi) in enumerate(zip(pending.per_term, weights, strict=True)):
            g = row[j] if i != d else None
            if g is not None and wi != 0.0:
                parts.append((g, wi))
        if t is None and not parts:
            derived.append(None)
            continue
        out = torch.zeros_like(parts[0][0]) if t is None else t.clone()
        for g, wi in parts:
            out.sub_(g, alpha=wi)
        derived.append(out.div_(wd))
    per_term = list(pending.per_term)
    per_term[d] = derived
    name = names[pending.connected[d]]
    attribution = _finished(pending, per_term, name)
    largest = max([attribution.total_norm, *attribution.weighted_norm.values()])
    if 0.0 < attribution.weighted_norm[name] <= DERIVED_ZERO * largest:
        per_term[d] = [None if g is None else torch.zeros_like(g) for g in derived]
        attribution = _finished(pending, per_term, name)
    return attribution, math.nan


def _finished(pending: PendingAttribution, per_term: PerTerm, derived: str | None) -> Attribution:
    return _attribution(
        pending.names, pending.weights, pending.total_of, pending.connected, per_term,
        pending.params, pending.method, pending.fallback_reason, derived,
    )  # fmt: skip


# float32 rounding of a sum of K gradients: ~K * 6e-8 of the largest one, elementwise; a
# derived gradient this small next to the largest contribution is no gradient at all
DERIVED_ZERO = 1e-5


def _weighted_sums(
    per_term: PerTerm, weights: list[float], n_params: int, skip: int
) -> list[Tensor | None]:
    """Per parameter: sum over the terms (but ``skip``) of w_i g_i (None: none reaches it)."""
    out: list[Tensor | None] = [None] * n_params
    for i, (grads, wi) in enumerate(zip(per_term, weights, strict=True)):
        if i == skip or wi == 0.0:
            continue
        for j, g in enumerate(grads):
            if g is not None:
                out[j] = g * wi if out[j] is None else out[j].add_(g, alpha=wi)  # type: ignore[union-attr]
    return out


def _norm_of(grads: Sequence[Tensor | None]) -> float:
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0
    return float(torch.stack(torch._foreach_norm(present)).double().norm())


def _relative(diff: Sequence[Tensor | None], totals: Sequence[Tensor | None]) -> float:
    total = _norm_of(totals)
    return _norm_of(diff) / total if total > 0 else (0.0 if _norm_of(diff) == 0 else math.inf)


def _check_terms(
    terms: Mapping[str, Tensor],
    weights: Mapping[str, float],
    method: str,
    total_of: tuple[str, ...] | None,
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, float]]:
    """The term names, the names in the total, and every term's weight; raises on bad input."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    names = tuple(terms)
    if not names:
        raise ValueError("expected at least one loss term, got none")
    for name, t in terms.items():
        if t.dim() != 0:
            raise ValueError(f"expected a scalar loss term {name!r}, got shape {tuple(t.shape)}")
    total_names = tuple(n for n in names if "/" not in n) if total_of is None else tuple(total_of)
    unknown = [n for n in total_names if n not in terms]
    if unknown:
        raise ValueError(f"total_of names terms that were not given: {', '.join(unknown)}")
    unweighted = [n for n in total_names if n not in weights]
    if unweighted:
        raise ValueError(f"missing weights for terms in the total: {', '.join(unweighted)}")
    return names, total_names, {n: float(weights.get(n, 1.0)) for n in names}


def _term_grads(
    terms: Mapping[str, Tensor],
    names: tuple[str, ...],
    connected: list[int],
    plist: list[Tensor],
    method: Method,
    retain_graph: bool,
) -> tuple[PerTerm, Method, str | None]:
    """The gradients of the ``connected`` terms (in that order), the method that ran, and
    why "batched" fell back to "loop" (None if it did not)."""
    per_term: PerTerm = []
    used: Method = method
    fallback_reason = None
    if not connected:
        return per_term, used, fallback_reason
    live = [terms[names[i]] for i in connected]
    dtype = torch.promote_types(live[0].dtype, torch.float32)
    for t in live[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    live = [t.to(dtype) for t in live]
    if method == "batched":
        try:
            per_term = _batched_grads(live, plist)
        except RuntimeError as err:  # an op without a vmap batching rule
            used = "loop"
            fallback_reason = str(err).strip().splitlines()[0] if str(err) else repr(err)
    if used == "loop":
        per_term = _loop_grads(live, plist, retain_graph)
    return per_term, used, fallback_reason


def _attribution(
    names: tuple[str, ...],
    w: dict[str, float],
    total_names: tuple[str, ...],
    connected: list[int],
    per_term: PerTerm,
    plist: list[Tensor],
    used: Method,
    fallback_reason: str | None,
    derived: str | None,
) -> Attribution:
    """Norms, shares and cosines from the connected terms' gradients: one host copy."""
    k = len(names)
    device = plist[0].device
    acc = _acc_dtype(device)
    # Gram matrix of the connected terms' gradients, accumulated parameter by parameter.
    with torch.no_grad():
        gram_c = _gram(per_term, device, acc)  # (kc, kc)
    gram = torch.zeros(k, k, dtype=acc, device=device)  # (k, k); detached rows stay 0
    if connected:
        index = torch.tensor(connected, device=device)
        gram[index.unsqueeze(1), index.unsqueeze(0)] = gram_c

    wvec = torch.tensor([w[n] for n in names], dtype=acc, device=device)  # (k,)
    in_total = torch.tensor([n in total_names for n in names], dtype=acc, device=device)
    w_total = wvec * in_total  # (k,)
    projected = gram @ w_total  # (k,)  <g_i, g>
    total_sq = w_total @ projected  # ||g||^2
    share = torch.where(total_sq > 0, wvec * projected / total_sq, torch.zeros_like(projected))
    norms = gram.diagonal().clamp(min=0).sqrt()  # (k,)
    denom = norms.unsqueeze(1) * norms.unsqueeze(0)  # (k, k)
    cosine = torch.where(denom > 0, gram / denom, torch.zeros_like(gram)).clamp(-1.0, 1.0)
    cosine.diagonal().copy_((norms > 0).to(acc))  # exactly 1 (or 0), not 1 - 2e-16
    packed = torch.cat([norms, share, cosine.flatten(), total_sq.clamp(min=0).sqrt().reshape(1)])
    host = packed.cpu().tolist()  # the one host copy

    norm_h = dict(zip(names, host[:k], strict=True))
    cos_flat = host[2 * k : 2 * k + k * k]
    cos_h = {a: {b: cos_flat[i * k + j] for j, b in enumerate(names)} for i, a in enumerate(names)}
    return Attribution(
        terms=names,
        weights=w,
        total_of=total_names,
        norm=norm_h,
        weighted_norm={n: abs(w[n]) * norm_h[n] for n in names},
        share=dict(zip(names, host[k : 2 * k], strict=True)),
        cosine=cos_h,
        total_norm=host[-1],
        method=used,
        fallback_reason=fallback_reason,
        zero_gradient=tuple(n for n in names if norm_h[n] == 0.0),
        detached=tuple(n for i, n in enumerate(names) if i not in connected),
        conflicts=tuple(
            (a, b) for i, a in enumerate(names) for b in names[i + 1 :] if cos_h[a][b] < 0.0
        ),
        derived=derived,
    )


def _write_total_grad(per_term: PerTerm, params: list[Tensor], weights: list[float]) -> None:
    """``param.grad += sum_i w_i g_i`` over the connected terms (weights 0 outside the total).

    Parameters are grouped by which terms reach them; each group is combined with one
    ``_foreach_mul`` and one ``_foreach_add_`` per further term. A parameter that some
    term reaches but none with a nonzero weight gets zeros added, as ``backward()`` of the
    total would; one that no term reaches is left untouched.
    """
    # reached terms -> [(parameter, term -> its gradient)] for the parameters they reach
    groups: dict[tuple[int, ...], list[tuple[int, dict[int, Tensor]]]] = {}
    for j in range(len(params)):
        column = _reaching(per_term, j)
        if column:
            groups.setdefault(tuple(column), []).append((j, column))
    for reached, members in groups.items():
        first, rest = reached[0], [i for i in reached[1:] if weights[i] != 0.0]
        combined = list(torch._foreach_mul([col[first] for _, col in members], weights[first]))
        for i in rest:
            torch._foreach_add_(combined, [col[i] for _, col in members], alpha=weights[i])
        for (j, _), c in zip(members, combined, strict=True):
            p = params[j]
            if p.grad is None:
                p.grad = c
            else:
                p.grad.add_(c)
