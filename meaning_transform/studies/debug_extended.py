"""The study behind ``mtx debug-extended``: the deep look at one model per data kind.

For each data kind a fresh model (same seed) goes through, in order:

1. parameter inspection of the untrained model (flags only for real problems);
2. an untrained forward pass in train mode and in eval mode, and why they differ;
3. a short training run (``--epochs``) with the Doctor attached: gradient
   statistics captured by its hooks, and the evidence every command's rules read;
4. on the trained model, in eval mode (z = mu), over all samples: the KL term by
   term, the KL per latent dimension with latent health, and the reconstruction
   error per input feature;
5. a short linear-β annealing run from another fresh model.

Each step builds its own model, so one measurement cannot disturb another (a
train-mode pass moves batch-norm running statistics and draws noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meaning_transform.data import DATA_KINDS, FEATURE_NAMES
from meaning_transform.diagnostics._modes import evaluating
from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.diagnostics.findings import Finding, sort_findings
from meaning_transform.diagnostics.gradients import GradientSnapshot
from meaning_transform.diagnostics.latent import latent_health
from meaning_transform.diagnostics.rules import evaluate
from meaning_transform.losses import kl_per_sample, kl_terms, reconstruction_per_feature
from meaning_transform.scenarios import Scenario
from meaning_transform.studies.setup import (
    ATTRIBUTIONS_PER_RUN,
    Dataset,
    ModelFactory,
    build_loss,
    default_model,
    epoch_row,
    get_data,
    scenario_train_config,
)
from meaning_transform.training import BetaSchedule, TrainConfig, resolve_device, train

SAMPLES_PER_KIND = 256  # small enough that five kinds train in a few seconds on 2 cores
WEIGHTS = {"reconstruction": 1.0, "kl": 0.1, "semantic": 0.5}  # debug-loss's Default preset
ANNEALING = BetaSchedule(schedule_type="linear", min_beta=0.0, max_beta=1.0)
HUGE_PARAMETER = 1e3  # |value| above this at initialisation is a fault, not a choice
KL_TERM_NAMES: tuple[str, ...] = ("one", "log_var", "neg_mu_sq", "neg_exp_log_var")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_DROPOUT_TYPES = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)


# --------------------------------------------------------------------------- data


def extended_datasets(
    data_kind: str,
    path: Path | None,
    n: int = SAMPLES_PER_KIND,
    seed: int = 0,
    scenario: Scenario | None = None,
) -> list[Dataset]:
    """The user's file as the one kind, else ``n`` samples of each chosen synthetic kind."""
    if path is not None:
        return [get_data(path, seed=seed, scenario=scenario)]
    kinds = DATA_KINDS if data_kind == "all" else (data_kind,)
    return [get_data(None, kind=kind, n=n, seed=seed, scenario=scenario) for kind in kinds]


def agent_layout_applies(dataset: Dataset) -> bool:
    """Synthetic agent states, or a user file with the 10-feature layout.

    The generic synthetic kinds also have 10 features, but they are not agent
    states: no semantic term and no agent-state feature names for them.
    """
    return dataset.kind == "agent_states" or (dataset.kind == "file" and dataset.agent_layout)


def feature_names(dataset: Dataset) -> list[str]:
    if agent_layout_applies(dataset):
        return list(FEATURE_NAMES)
    return [f"f{i}" for i in range(dataset.n_features)]


# --------------------------------------------------------------------------- parameters


def _param_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name -> ``weight``, ``bias``, ``norm_weight`` or ``norm_bias``."""
    roles: dict[str, str] = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm:
                roles[full] = "norm_bias" if name == "bias" else "norm_weight"
            else:
                roles[full] = "bias" if name == "bias" else "weight"
    return roles


def inspect_parameters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape and statistics of every parameter, with flags for real problems only.

    Statistics are over the finite entries (so one NaN does not hide the rest);
    ``std`` is the population standard deviation. Flags:

    - ``non-finite``: any NaN or Inf entry.
    - ``identical``: a weight matrix (2-D or more, not a bias or normalisation
      parameter) whose entries are all equal: every unit gets the same gradient,
      so the units can never become different.
    - ``huge``: some finite entry with magnitude above 1e3.

    Not flagged, because they are how layers are meant to start: a bias at zero,
    a batch-norm scale at one and shift at zero.

    Reduced on the parameters' device, one host copy for the whole model.
    """
    named = list(model.named_parameters())
    if not named:
        return {}
    roles = _param_roles(model)
    rows = []
    for _, p in named:
        w = p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        if w.numel() == 0:
            rows.append(w.new_zeros(7))  # no entries: nothing to measure or flag
            continue
        finite = torch.isfinite(w)
        safe = torch.where(finite, w, torch.zeros_like(w))
        mean = safe.sum() / finite.sum()
        var = torch.where(finite, (w - mean) ** 2, torch.zeros_like(w)).sum() / finite.sum()
        rows.append(
            torch.stack(
                [
                    mean,
                    var.sqrt(),
                    torch.where(finite, w, torch.full_like(w, float("inf"))).min(),
                    torch.where(finite, w, torch.full_like(w, -float("inf"))).max(),
                    torch.isnan(w).sum().to(w.dtype),
                    torch.isinf(w).sum().to(w.dtype),
                    safe.abs().max(),
                ]
            )
        )  # (7,)
    device = rows[0].device
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
    stacked = torch.stack([r.to(device=device, dtype=dtype) for r in rows])  # (P, 7)
    host = stacked.cpu().tolist()  # the one host copy
    result: dict[str, dict[str, Any]] = {}
    for (name, p), (mean, std, lo, hi, nan, inf, abs_max) in zip(named, host, strict=True):
        role = roles.get(name, "weight")
        any_finite = int(nan) + int(inf) < p.numel()
        flags: list[str] = []
        if nan or inf:
            flags.append("non-finite")
        if role == "weight" and p.dim() >= 2 and p.numel() > 1 and any_finite and std == 0.0:
            flags.append("identical")
        if any_finite and abs_max > HUGE_PARAMETER:
            flags.append("huge")
        result[name] = {
            "role": role,
            "shape": list(p.shape),
            "numel": p.numel(),
            "mean": mean if any_finite else None,
            "std": std if any_finite else None,
            "min": lo if any_finite else None,
            "max": hi if any_finite else None,
            "nan": int(nan),
            "inf": int(inf),
            "flags": flags,
        }
    return result


# --------------------------------------------------------------------------- statistics


def _summaries(tensors: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """mean, std (population), min, max of each tensor, in float64 on the CPU."""
    rows = []
    for t in tensors.values():
        v = t.detach().cpu().to(torch.float64)
        rows.append(torch.stack([v.mean(), v.std(correction=0), v.min(), v.max()]))  # (4,)
    host = torch.stack(rows).tolist()
    return {
        name: dict(zip(("mean", "std", "min", "max"), row, strict=True))
        for name, row in zip(tensors, host, strict=True)
    }


def _loss_values(result: dict[str, Any]) -> dict[str, float]:
    keys = ("reconstruction_loss", "kl_loss", "semantic_loss", "loss")
    host = torch.stack([result[k].detach().cpu().to(torch.float64) for k in keys]).tolist()
    return dict(zip(("reconstruction", "kl", "semantic", "total"), host, strict=True))


def _max_abs_difference(a: Tensor, b: Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


# --------------------------------------------------------------------------- untrained pass


def _why_modes_differ(model: nn.Module, samples_noise: bool) -> str:
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    has_dropout = any(isinstance(m, _DROPOUT_TYPES) for m in model.modules())
    train_parts, eval_parts = [], []
    if samples_noise:
        train_parts.append("samples z = mu + sigma * eps with fresh noise")
        eval_parts.append("uses z = mu")
    if has_norm:
        train_parts.append("batch norm normalises with this batch's own statistics")
        eval_parts.append(
            "batch norm uses its running statistics (mean 0, variance 1 before any training)"
        )
    if has_dropout:
        train_parts.append("dropout zeroes random units")
        eval_parts.append("dropout is off")
    if not train_parts:
        return "This model has no noise, batch norm or dropout, so train and eval mode agree."
    return f"Train mode {' and '.join(train_parts)}; eval mode {' and '.join(eval_parts)}."


def untrained_pass(model: nn.Module, loss_fn: nn.Module, x: Tensor) -> dict[str, Any]:
    """One forward pass over ``x`` in train mode and in eval mode, no update.

    Runs on a throwaway model: the train-mode pass moves batch-norm running
    statistics and draws noise.
    """
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)  # (N, D)
    passes: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        with evaluating(model):
            outputs["eval"] = model(x)
            passes["eval"] = _pass_summary(outputs["eval"], loss_fn(outputs["eval"], x))
        model.train()
        outputs["train"] = model(x)
        passes["train"] = _pass_summary(outputs["train"], loss_fn(outputs["train"], x))
    train_out, eval_out = outputs["train"], outputs["eval"]
    differences = {
        "max_abs": {
            key: _max_abs_difference(train_out[key], eval_out[key])
            for key in ("reconstruction", "mu", "log_var", "z")
            if key in train_out and key in eval_out
        },
        "loss": {
            name: passes["train"]["loss"][name] - passes["eval"]["loss"][name]
            for name in passes["train"]["loss"]
        },
    }
    samples_noise = "z" in train_out and _max_abs_difference(train_out["z"], train_out["mu"]) > 0
    return {
        "n_samples": int(x.shape[0]),
        "train": passes["train"],
        "eval": passes["eval"],
        "differences": differences,
        "differ": any(v != 0 for v in differences["max_abs"].values()),
        "why": _why_modes_differ(model, samples_noise),
    }


def _pass_summary(output: dict[str, Tensor], loss: dict[str, Any]) -> dict[str, Any]:
    shown = {k: output[k] for k in ("reconstruction", "mu", "log_var", "z") if k in output}
    return {**_summaries(shown), "loss": _loss_values(loss)}


# --------------------------------------------------------------------------- KL and recon


def kl_term_statistics(mu: Tensor, log_var: Tensor) -> dict[str, Any]:
    """The four KL terms (1, log_var, -mu², -exp(log_var)) with statistics, and a sum check.

    KL per sample = -0.5 * sum_z (one + log_var + neg_mu_sq + neg_exp_log_var). The
    check compares the mean of that over samples with the loss library's
    ``kl_per_sample`` (the expm1 form). Computed in float64 on the CPU so the
    check measures the formulas, not float32 cancellation.
    """
    mu = mu.detach().cpu().to(torch.float64)  # (N, Z)
    log_var = log_var.detach().cpu().to(torch.float64)  # (N, Z)
    terms = kl_terms(mu, log_var)  # four (N, Z)
    stats: dict[str, Any] = _summaries({name: terms[name] for name in KL_TERM_NAMES})
    from_terms = -0.5 * torch.stack([terms[n] for n in KL_TERM_NAMES]).sum(0).sum(1)  # (N,)
    a, b = float(from_terms.mean()), float(kl_per_sample(mu, log_var).mean())
    stats["sum_check"] = {
        "kl_per_sample_mean_from_terms": a,
        "kl_per_sample_mean": b,
        "abs_difference": abs(a - b),
    }
    return stats


def _eval_outputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    device = next((p.device for p in model.parameters()), x.device)
    with evaluating(model), torch.no_grad():
        out = model(x.to(device))
    return {k: v.detach().cpu() for k, v in out.items() if isinstance(v, Tensor)}


# --------------------------------------------------------------------------- gradients


def biases_before_batch_norm(model: nn.Module) -> list[str]:
    """Biases of layers whose output goes straight into batch norm.

    Batch norm subtracts the batch mean, so such a bias has no effect on the output
    and its gradient is zero up to rounding (~1e-8): by design, not a vanishing
    gradient. Found structurally: a layer followed by a ``_BatchNorm`` in the same
    ``nn.Sequential``.
    """
    names = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (name, layer), (_, following) in zip(children, children[1:]):
            bias = getattr(layer, "bias", None)
            if isinstance(bias, nn.Parameter) and isinstance(
                following, nn.modules.batchnorm._BatchNorm
            ):
                names.append(f"{seq_name}.{name}.bias" if seq_name else f"{name}.bias")
    return names


def gradient_summary(
    history: list[GradientSnapshot],
    hooks_registered: int,
    training_steps: int,
    batch_norm_centred: list[str] | None = None,
) -> dict[str, Any]:
    """Per parameter: mean and max over captured steps of the gradient 2-norm."""
    norms: dict[str, list[float]] = {}
    for snap in history:
        for s in snap.params:
            norms.setdefault(s.name, [])
            if s.has_grad and s.norm is not None:
                norms[s.name].append(s.norm)
    final = history[-1] if history else None
    return {
        "hooks_registered": hooks_registered,
        "captured_steps": len(history),
        "training_steps": training_steps,
        "final_total_norm": final.total_norm if final else None,
        "final_first_last_ratio": final.first_last_ratio if final else None,
        "never_reached": sorted(name for name, values in norms.items() if not values),
        "batch_norm_centred": list(batch_norm_centred or []),
        "parameters": {
            name: {
                "mean_norm": sum(values) / len(values) if values else None,
                "max_norm": max(values) if values else None,
                "final_norm": values[-1] if values else None,
            }
            for name, values in norms.items()
        },
    }


# --------------------------------------------------------------------------- one kind


def run_kind(
    dataset: Dataset,
    train_config: TrainConfig,
    reduction: str = "mean",
    model_factory: ModelFactory | None = None,
    on_epoch: Callable[[], None] | None = None,
    scenario: Scenario | None = None,
) -> tuple[dict[str, Any], list[Finding]]:
    """Every section for one data kind, and the findings of its training run."""
    where = dataset.kind
    layout = agent_layout_applies(dataset)
    x = dataset.tensor  # (N, D)
    train_config = scenario_train_config(train_config, scenario)

    def fresh_model() -> nn.Module:
        if model_factory is not None:
            return model_factory(dataset.n_features, train_config.seed)
        return default_model(dataset.n_features, train_config.seed, x, scenario)

    def fresh_loss() -> nn.Module:
        semantic = WEIGHTS["semantic"] if layout else 0.0
        return build_loss(
            WEIGHTS["reconstruction"], WEIGHTS["kl"], semantic, dataset, reduction, scenario
        )

    tick = (lambda _r: on_epoch()) if on_epoch is not None else None

    # 1-2. The untrained model, on a throwaway instance.
    probe = fresh_model().to(resolve_device(train_config.device))
    parameters = inspect_parameters(probe)
    untrained = untrained_pass(probe, fresh_loss(), x)
    del probe

    # 3. The main short run with the Doctor attached (its hooks capture the gradients).
    model = fresh_model()
    loss_fn = fresh_loss()
    n = x.shape[0]
    batch = n if train_config.batch_size is None else min(train_config.batch_size, n)
    steps = train_config.epochs * math.ceil(n / batch)
    doctor = Doctor(model, where=where, attribute_every=max(1, steps // ATTRIBUTIONS_PER_RUN))
    with doctor:
        hooks_registered = len(doctor.hooks.handles)
        result = train(model, loss_fn, x, train_config, callbacks=(doctor,), on_epoch=tick)
    evidence = doctor.evidence(result.records, data=x, batch_size=result.batch_size)
    history = list(evidence.snapshots)
    gradients = gradient_summary(
        history, hooks_registered, result.steps, biases_before_batch_norm(model)
    )

    # 4. The trained model in eval mode (z = mu), all samples.
    out = _eval_outputs(model, x)
    mu, log_var = out["mu"].to(torch.float64), out["log_var"].to(torch.float64)  # (N, Z)
    health = latent_health(mu, log_var)
    per_feature = reconstruction_per_feature(out["reconstruction"], x).tolist()  # (D,)
    if evidence.latent is not None:  # the rules see the numbers this report shows
        evidence = replace(evidence, latent=health)

    # 5. A short linear-β annealing run from a fresh model.
    anneal_config = replace(train_config, schedule=ANNEALING)
    annealed = train(fresh_model(), fresh_loss(), x, anneal_config, on_epoch=tick)

    findings = evaluate(evidence)
    health_dict = health.as_dict()
    section = {
        "kind": where,
        "data": dataset.describe(),
        "agent_layout": layout,
        "weights": {
            "reconstruction": float(loss_fn.recon_loss_weight),
            "kl": float(loss_fn.kl_loss_weight),
            "semantic": float(loss_fn.semantic_loss_weight),
        },
        "reduction": result.reduction,
        "batch_size": result.batch_size,
        "output_activation": getattr(model, "output_activation", None),
        "parameters": parameters,
        "untrained_pass": untrained,
        "measured_on": (
            f"kl_terms, kl_per_dim, latent_health and recon_per_feature: the model after "
            f"{train_config.epochs} epoch(s), eval mode (z = mu), all {n} samples"
        ),
        "kl_terms": kl_term_statistics(mu, log_var),
        "kl_per_dim": list(health.kl_per_dim),
        "latent_health": {k: v for k, v in health_dict.items() if k != "kl_per_dim"},
        "recon_per_feature": dict(zip(feature_names(dataset), per_feature, strict=True)),
        "gradients": gradients,
        "annealing": {
            "schedule": ANNEALING.schedule_type,
            "min_beta": ANNEALING.min_beta,
            "max_beta": ANNEALING.max_beta,
            "epochs": [
                {
                    "epoch": r.epoch,
                    "beta": r.beta,
                    "reconstruction": r.raw["reconstruction"],
                    "kl": r.raw["kl"],
                    "semantic": r.raw["semantic"],
                    "total": r.total,
                }
                for r in annealed.records
            ],
        },
        "records": [epoch_row(r) for r in result.records],
        "findings": [f.code for f in findings],
    }
    return section, findings


def run_debug_extended(
    datasets: list[Dataset],
    train_config: TrainConfig,
    reduction: str = "mean",
    model_factory: ModelFactory | None = None,
    on_epoch: Callable[[], None] | None = None,
    scenario: Scenario | None = None,
) -> dict[str, Any]:
    """Run every section on each dataset; return the JSON-ready result.

    ``on_epoch`` is called twice per epoch per dataset (main run and annealing run).
    """
    kinds: list[dict[str, Any]] = []
    findings: list[Finding] = []
    for dataset in datasets:
        section, found = run_kind(
            dataset, train_config, reduction, model_factory, on_epoch, scenario
        )
        kinds.append(section)
        findings.extend(found)
    first = datasets[0]
    data = (
        first.describe()
        if len(datasets) == 1
        else {
            "source": "synthetic:" + ",".join(d.kind for d in datasets),
            "kind": "all",
            "n_samples": int(first.tensor.shape[0]),
            "n_features": first.n_features,
        }
    )
    return {
        "command": "debug-extended",
        "data": data,
        "batch_size": kinds[0]["batch_size"],
        "reduction": reduction,
        "scenario": scenario.name if scenario is not None else "healthy",
        "kinds": kinds,
        "findings": [f.as_dict() for f in sort_findings(findings)],
    }
