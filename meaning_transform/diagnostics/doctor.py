"""The Doctor: attach to a model and loss, call once per step, get findings.

It is both the Python API for a user's own training loop and the step callback
the built-in loop uses, so every command and every user sees the same findings::

    with Doctor(model, loss_fn) as doctor:            # gradient hooks attached
        for x in batches:
            out = model(x)
            result = loss_fn(out, x)                  # a CombinedLoss result
            doctor.step(out, result, x)               # before backward: sees the graph
            result["loss"].backward()                 # hooks record gradient statistics
            optimizer.step()
    findings = doctor.findings(data=x_all)            # hooks are gone here

Per step it records the loss terms, a fingerprint of the reparameterisation noise,
and every ``attribute_every`` steps the per-term gradient attribution; the gradient
statistics come from post-accumulate-grad hooks during ``backward``. At the end,
given data, it measures latent health and dead ReLU units.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from meaning_transform.constants import COMPONENTS
from meaning_transform.diagnostics.attribution import (
    Attribution,
    AttributionSummary,
    Method,
    summarise_attributions,
    term_attribution,
)
from meaning_transform.diagnostics.findings import Finding
from meaning_transform.diagnostics.gradients import GradientHooks, dead_units
from meaning_transform.diagnostics.latent import encode_means, latent_health
from meaning_transform.diagnostics.rules import RunEvidence, evaluate

NOISE_PROBE = 32  # noise values kept per step to tell fresh noise from frozen noise


class Doctor:
    """Collects evidence during training and turns it into findings.

    Args:
        model: the VAE; ``forward(x)`` returns ``reconstruction``, ``mu``, ``log_var``
            (and ``z`` for the noise check).
        where: the name findings are reported under.
        attribute_every: per-term gradient attribution every k steps (0 = never). Each
            attribution costs one extra backward pass per term.
        attribution_method: ``"loop"`` or ``"batched"``
            (see :func:`~meaning_transform.diagnostics.attribution.term_attribution`).
        semantic_features: also attribute each semantic feature, which is how a
            feature with no gradient path (the original's hard thresholds) is found.
    """

    def __init__(
        self,
        model: nn.Module,
        where: str = "run",
        attribute_every: int = 1,
        attribution_method: Method = "loop",
        semantic_features: bool = True,
    ) -> None:
        if attribute_every < 0:
            raise ValueError(f"attribute_every must be >= 0, got {attribute_every}")
        self.model = model
        self.where = where
        self.attribute_every = attribute_every
        self.attribution_method = attribution_method
        self.semantic_features = semantic_features
        self.hooks = GradientHooks(model)
        self.attributions: list[Attribution] = []
        self.term_values: list[dict[str, float]] = []
        self.input_non_finite = 0
        self.reduction: dict[str, str] = {}
        self.steps = 0
        self._noise: list[torch.Tensor] = []

    # ---- lifecycle: the gradient hooks live between attach() and close() ----
    def attach(self) -> Doctor:
        if not self.hooks.active:
            self.hooks.__enter__()
        return self

    def close(self) -> None:
        self.hooks.remove()

    def __enter__(self) -> Doctor:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- per step ----
    def step(
        self,
        output: Mapping[str, torch.Tensor],
        result: Mapping[str, Any],
        x: torch.Tensor | None = None,
    ) -> None:
        """Record one step. Call after the loss, before ``backward`` (it reads the graph)."""
        if x is not None:
            self.input_non_finite += int((~torch.isfinite(x)).sum())
        self.reduction = dict(result.get("reduction", self.reduction))
        self._record_noise(output)
        if self.attribute_every and self.steps % self.attribute_every == 0:
            self._attribute(result)
        self.steps += 1

    def before_backward(self, ctx: Any) -> None:
        """The built-in training loop's callback hook (see ``training.StepCallback``)."""
        self.attach()
        self.step(ctx.output, ctx.loss, ctx.batch)

    def _record_noise(self, output: Mapping[str, torch.Tensor]) -> None:
        """Keep the standardised noise eps = (z - mu) / sigma of a few entries."""
        if not self.model.training or not {"z", "mu", "log_var"} <= set(output):
            return
        z, mu, log_var = (output[k].detach() for k in ("z", "mu", "log_var"))
        eps = ((z - mu) * torch.exp(-0.5 * log_var)).flatten()[:NOISE_PROBE]  # (<=32,)
        self._noise.append(eps.cpu())

    def _attribute(self, result: Mapping[str, Any]) -> None:
        terms_in = result.get("terms", {})
        weights_in = result.get("weights", {})
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for name, t in terms_in.items():
            main = "/" not in name
            if main and (name not in COMPONENTS or weights_in.get(name, 1.0) == 0.0):
                continue
            if not main and not self.semantic_features:
                continue
            if not torch.isfinite(t.detach()).all():
                return  # the non-finite rules report this step; no attribution on NaN
            terms[name] = t
            # a sub-term "semantic/role" enters the total through its parent's weight
            parent = name.split("/")[0]
            weights[name] = float(weights_in.get(name, weights_in.get(parent, 1.0)))
        if not terms or not any(t.requires_grad for t in terms.values()):
            return
        total_of = tuple(n for n in terms if "/" not in n)
        self.attributions.append(
            term_attribution(
                terms, weights, self.model, method=self.attribution_method, total_of=total_of
            )
        )
        values = torch.stack([t.detach().to(torch.float64) for t in terms.values()]).cpu()
        self.term_values.append(dict(zip(terms, values.tolist(), strict=True)))

    # ---- at the end ----
    def noise_changed(self) -> bool | None:
        """False when consecutive steps drew identical noise (frozen); None if unknown."""
        pairs = [(a, b) for a, b in zip(self._noise, self._noise[1:]) if a.shape == b.shape]
        if not pairs:
            return None
        # eps is recovered from z, mu and sigma, so equal noise matches to rounding only
        return any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)

    def evidence(
        self,
        records: tuple[Any, ...] = (),
        data: torch.Tensor | None = None,
        batch_size: int = 0,
    ) -> RunEvidence:
        """Everything measured so far as plain data (measures latent health on ``data``)."""
        latent = dead = None
        if data is not None and data.shape[0] >= 2 and bool(torch.isfinite(data).all()):
            device = next(self.model.parameters()).device
            sample = data[:1024].to(device)  # (N, D)
            mu, log_var = encode_means(self.model, sample)
            latent = latent_health(mu, log_var)
            dead = dead_units(self.model, sample) or None
        return RunEvidence(
            where=self.where,
            records=tuple(records),
            reduction=self.reduction,
            batch_size=batch_size,
            snapshots=tuple(self.hooks.history),
            attributions=tuple(self.attributions),
            term_values=tuple(self.term_values),
            latent=latent,
            dead_units=dead,
            noise_changed=self.noise_changed(),
            input_non_finite=self.input_non_finite,
        )

    def findings(
        self,
        records: tuple[Any, ...] = (),
        data: torch.Tensor | None = None,
        batch_size: int = 0,
    ) -> list[Finding]:
        return evaluate(self.evidence(records, data, batch_size))

    def summary(self) -> AttributionSummary | None:
        """Attribution averaged over the attributed steps (None before any attribution)."""
        return summarise_attributions(self.attributions)
