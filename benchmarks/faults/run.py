"""Seeded-fault benchmark for mtx's detectors: how often does the Doctor find a known bug?

Every run trains one small VAE (a *family*) on one data set shipped inside scikit-learn
with one *fault* injected as a small patch (a subclass overriding one method, a loss
written slightly differently, one changed hyper-parameter), through the Doctor in a plain
user loop (Adam, batch 64, ``torch.set_num_threads(1)``). Each fault declares the finding
codes it should produce; the tables give per fault recall, precision (and the codes that
fired but were not expected), the false-alarm rate of the healthy runs, and the training
steps and wall time per run.

    python benchmarks/faults/run.py            # default grid: all families, 2 data sets, 3 seeds
    python benchmarks/faults/run.py --quick    # a few faults, 2 families, digits, seed 0 (< 60 s)
    python benchmarks/faults/run.py --json results.json

Detection latency (the step at which a finding would first fire) is not measured yet: the
Doctor judges at the end of the run, so only the steps each run trained for are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meaning_transform.diagnostics.doctor import Doctor
from meaning_transform.losses import CombinedLoss
from meaning_transform.model import MeaningVAE

ROOT = Path(__file__).resolve().parents[2]
BATCH, LR, LATENT = 64, 1e-3, 4
INFO_CODES = {"terms-mismatch", "grad-conflict"}  # documented as info: recalled at info too


def _load_public_vaes() -> Any:
    """tests/public_vaes.py (pytorch/examples' VAE and loss, AntixK's VanillaVAE), by path."""
    path = ROOT / "tests" / "public_vaes.py"
    spec = importlib.util.spec_from_file_location("_bench_public_vaes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PUBLIC = _load_public_vaes()


# ---- data: shipped inside scikit-learn, no download ---------------------------------------


def load_data(name: str, scaling: str) -> Tensor:
    """(N, D) float32: digits (8x8 images, the first 1024 rows) or breast-cancer (30
    features), min-max to [0, 1] ("minmax": BCE and the tanh conv decoder) or standardised
    ("standard": the MSE MLPs; on [0, 1] pixels a unit-variance Gaussian likelihood makes
    collapse the optimum, and the healthy beta-VAE collapsed for real)."""
    from sklearn import datasets

    if name == "digits":
        x = torch.tensor(datasets.load_digits().data[:1024], dtype=torch.float32) / 16.0
    elif name == "breast-cancer":
        x = torch.tensor(datasets.load_breast_cancer().data, dtype=torch.float32)
    else:
        raise ValueError(f"unknown data set {name!r}")
    if scaling == "standard":  # constant columns (digits' border pixels) stay 0
        return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    lo, hi = x.min(0).values, x.max(0).values
    return (x - lo) / (hi - lo).clamp_min(1e-6)


# ---- models ---------------------------------------------------------------------------------


class MLPVAE(nn.Module):
    """A plain MLP VAE with a Gaussian (identity) output; returns a dict with z."""

    def __init__(self, input_dim: int, hidden: int = 64, latent: int = LATENT) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, input_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z: Tensor) -> Tensor:
        return self.fc4(F.relu(self.fc3(z)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return {"reconstruction": self.decode(z), "mu": mu, "log_var": logvar, "z": z}


class PyTorchExamplesVAE(PUBLIC.VAE):  # type: ignore[name-defined,misc]
    """pytorch/examples' VAE, its 64 input features made a parameter (D = 30 too)."""

    def __init__(self, input_dim: int = 64) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.fc1 = nn.Linear(input_dim, 32)
        self.fc4 = nn.Linear(32, input_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x.view(-1, self.input_dim))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def examples_loss(
    recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kl_w: float = 1.0
) -> Tensor:
    """pytorch/examples' loss_function (one scalar, summed), for any D and a KL weight."""
    if kl_w == 1.0 and recon_x.shape[1] == 64:
        return PUBLIC.loss_function(recon_x, x, mu, logvar)  # verbatim
    BCE = F.binary_cross_entropy(recon_x, x.view_as(recon_x), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + kl_w * KLD


# ---- families -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    recon: str  # "mse" or "bce": the generic faulty losses use it
    reduction: str  # "mean" or "sum": the batch reduction of its own loss
    kl_weight: float  # its own KL weight (beta)
    has_z: bool  # its output carries z
    scaling: str  # how its data is scaled: "minmax" or "standard"
    data: tuple[str, ...]
    build: Callable[[int, int], nn.Module]
    image: bool = False  # takes (B, 1, 8, 8)
    bias_reaches_relu: bool = True  # a first-layer bias of -10 kills its ReLUs (no batch norm)


def _mlp(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLPVAE(dim)


def _examples(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PyTorchExamplesVAE(dim)


def _conv(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PUBLIC.VanillaVAE(in_channels=1, latent_dim=LATENT)


def _mtx(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MeaningVAE(input_dim=dim, latent_dim=LATENT, seed=seed)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "mlp-gauss", "mse", "mean", 1.0, True, "standard", ("digits", "breast-cancer"), _mlp
        ),
        Family(
            "mlp-bernoulli",
            "bce",
            "sum",
            1.0,
            False,
            "minmax",
            ("digits", "breast-cancer"),
            _examples,
        ),
        Family(
            "conv",
            "mse",
            "mean",
            0.005,
            False,
            "minmax",
            ("digits",),
            _conv,
            image=True,
            bias_reaches_relu=False,
        ),
        Family("beta-vae", "mse", "mean", 4.0, True, "standard", ("digits", "breast-cancer"), _mlp),
        Family(
            "mtx",
            "mse",
            "mean",
            0.1,
            True,
            "standard",
            ("digits", "breast-cancer"),
            _mtx,
            bias_reaches_relu=False,
        ),
    )
}


# ---- losses ---------------------------------------------------------------------------------

LossOut = tuple[Any, dict[str, Any]]  # (what the loss returned, Doctor.step keywords)


def _recon(fam: Family, recon: Tensor, x: Tensor, reduction: str) -> Tensor:
    x = x.view_as(recon)
    per_elem = (
        F.binary_cross_entropy(recon, x, reduction="none")
        if fam.recon == "bce"
        else (recon - x) ** 2
    )
    if fam.name == "conv" and reduction == "mean":
        return per_elem.mean()  # F.mse_loss's mean over elements, as these authors write it
    per_sample = per_elem.flatten(1).sum(1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _kl(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    per_sample = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _bernoulli_kl_by_hand(fam: Family, recon: Tensor, x: Tensor, reduction: str) -> Tensor:
    """The reconstruction written as KL(x || recon) by hand: x * log(x / recon) is
    0 * -inf = NaN at x = 0 (and log of a negative on standardised data)."""
    x = x.view_as(recon)
    per_elem = x * torch.log(x / recon) + (1 - x) * torch.log((1 - x) / (1 - recon))
    per_sample = per_elem.flatten(1).sum(1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _parts(fam: Family, out: Any) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(out, Mapping):
        return out["reconstruction"], out["mu"], out["log_var"]
    if fam.name == "conv":
        return out[0], out[2], out[3]
    return out[0], out[1], out[2]


def own_loss(fam: Family, model: nn.Module, out: Any, x: Tensor, kl_scale: float = 1.0) -> LossOut:
    """The family's own loss as its authors write it (KL weight times kl_scale)."""
    w = fam.kl_weight * kl_scale
    recon, mu, logvar = _parts(fam, out)
    if fam.name == "mlp-bernoulli":
        return examples_loss(recon, x, mu, logvar, kl_w=w), {}  # one scalar, nothing named
    if fam.name == "conv":
        loss = model.loss_function(*out, M_N=w)  # AntixK: detached copies of its terms
        return loss, {
            "weights": {"KLD": -w},
            "reduction": {"Reconstruction_Loss": "mean", "KLD": "mean"},
        }
    if fam.name == "mtx":
        return CombinedLoss(kl_loss_weight=w, semantic_loss_weight=0.0, on_non_finite="record")(
            out, x
        ), {}
    mse = ((recon - x) ** 2).sum(1).mean()  # Gaussian NLL up to a constant: per-sample sum
    kl = _kl(mu, logvar, "mean")
    return {"loss": mse + w * kl, "MSE": mse, "KLD": kl}, {
        "weights": {"KLD": w},
        "reduction": {"MSE": "mean", "KLD": "mean"},
    }


def generic_loss(
    fam: Family,
    out: Any,
    x: Tensor,
    recon_red: str,
    kl_red: str,
    detach: bool = False,
    by_hand: bool = False,
) -> LossOut:
    """The family's loss rewritten as named terms (a user's own variant of it)."""
    recon, mu, logvar = _parts(fam, out)
    rec = (_bernoulli_kl_by_hand if by_hand else _recon)(fam, recon, x, recon_red)
    if detach:
        rec = rec.detach()
    kl = _kl(mu, logvar, kl_red)
    w = fam.kl_weight
    return {"loss": rec + w * kl, "recon": rec, "KLD": kl}, {
        "weights": {"KLD": w},
        "reduction": {"recon": recon_red, "KLD": kl_red},
    }


# ---- faults ---------------------------------------------------------------------------------


def _fresh(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    std = torch.exp(0.5 * logvar)
    return mu + torch.randn_like(std) * std


def _frozen(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    torch.manual_seed(0)  # "for reproducibility"
    return _fresh(self, mu, logvar)


def _mean_only(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    return mu  # z = mu in training too


def _variance_as_sigma(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    std = torch.exp(logvar)  # the variance used as sigma
    return mu + torch.randn_like(std) * std


def _tiny_noise(self: nn.Module, mu: Tensor, logvar: Tensor) -> Tensor:
    if not self.training:
        return mu
    std = torch.exp(0.5 * logvar)
    return mu + 0.01 * torch.randn_like(std) * std  # noise shrunk "for stability"


def _patch_reparameterize(fn: Callable[..., Tensor]) -> Callable[[nn.Module], nn.Module]:
    def patch(model: nn.Module) -> nn.Module:
        cls = model.__class__
        model.__class__ = type(f"{cls.__name__}Faulty", (cls,), {"reparameterize": fn})
        return model

    return patch


def _dead_relus(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.fc1.bias.fill_(-10.0)
    return model


def _unused_head(model: nn.Module) -> nn.Module:
    model.extra_head = nn.Linear(LATENT, LATENT)  # registered, never called
    return model


@dataclass(frozen=True)
class Fault:
    name: str
    expected: frozenset[str]  # any of these codes counts as found
    consequences: frozenset[str] = frozenset()  # codes the fault legitimately causes too
    patch_model: Callable[[nn.Module], nn.Module] | None = None
    loss: Callable[[Family, nn.Module, Any, Tensor], LossOut] | None = None
    lr_scale: float = 1.0
    applies: Callable[[Family], str | None] = lambda fam: None  # a reason to skip, or None


def _needs_relu_bias(fam: Family) -> str | None:
    return None if fam.bias_reaches_relu else "batch norm after the first layer cancels its bias"


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault("healthy", frozenset()),
        Fault(
            "posterior-collapse",
            frozenset({"posterior-collapse"}),
            loss=lambda fam, m, out, x: own_loss(fam, m, out, x, kl_scale=50.0),
        ),
        Fault(
            "frozen-noise", frozenset({"frozen-noise"}), patch_model=_patch_reparameterize(_frozen)
        ),
        Fault(
            "missing-noise",
            frozenset({"frozen-noise"}),
            patch_model=_patch_reparameterize(_mean_only),
        ),
        Fault(
            "variance-as-sigma",
            frozenset({"noise-scale"}),
            patch_model=_patch_reparameterize(_variance_as_sigma),
        ),
        Fault(
            "tiny-noise", frozenset({"noise-scale"}), patch_model=_patch_reparameterize(_tiny_noise)
        ),
        Fault(
            "detached-recon",
            frozenset({"no-grad-path"}),
            frozenset({"unused-params", "posterior-collapse", "loss-plateau"}),  # decoder starved
            loss=lambda fam, m, out, x: generic_loss(
                fam, out, x, fam.reduction, fam.reduction, detach=True
            ),
        ),
        Fault(
            "reduction-mismatch",
            frozenset({"batch-dependent-weights"}),
            loss=lambda fam, m, out, x: generic_loss(fam, out, x, "sum", "mean"),
        ),
        Fault(
            "nan-log0",
            frozenset({"nonfinite-loss", "nonfinite-grad"}),
            loss=lambda fam, m, out, x: generic_loss(
                fam, out, x, fam.reduction, fam.reduction, by_hand=True
            ),
        ),
        Fault(
            "lr-x1000",
            frozenset({"loss-oscillation", "exploding-grad", "nonfinite-loss", "nonfinite-grad"}),
            lr_scale=1000.0,
        ),
        Fault(
            "dying-relu",
            frozenset({"dying-relu"}),
            frozenset({"vanishing-grad", "posterior-collapse"}),  # a dead encoder: constant mu
            patch_model=_dead_relus,
            applies=_needs_relu_bias,
        ),
        Fault("unused-params", frozenset({"unused-params"}), patch_model=_unused_head),
    )
}


# ---- one run --------------------------------------------------------------------------------


@dataclass
class RunResult:
    family: str
    data: str
    fault: str
    seed: int
    expected: list[str]
    fired: list[str]  # warning/error codes
    info: list[str]  # info codes
    not_checked: list[str]
    steps: int
    seconds: float
    error: str | None = None
    found: bool = False
    alarms: list[str] = field(default_factory=list)  # fired codes not expected


def run_one(fam: Family, data_name: str, fault: Fault, seed: int, epochs: int) -> RunResult:
    torch.manual_seed(seed)
    x_all = load_data(data_name, fam.scaling)
    if fam.image:
        x_all = x_all.view(-1, 1, 8, 8)
    dim = int(x_all[0].numel())
    model = fam.build(dim, seed)
    if fault.patch_model is not None:
        model = fault.patch_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR * fault.lr_scale)
    shuffle = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    steps = 0
    error = None
    fired: list[str] = []
    info: list[str] = []
    skipped: list[str] = []
    try:
        with Doctor(model, where=f"{fam.name}/{fault.name}") as doctor:
            try:
                for _epoch in range(epochs):
                    model.train()
                    perm = torch.randperm(x_all.shape[0], generator=shuffle)
                    for i in range(0, x_all.shape[0], BATCH):
                        xb = x_all[perm[i : i + BATCH]]
                        optimizer.zero_grad()
                        out = model(xb)
                        loss, kwargs = (fault.loss or own_loss)(fam, model, out, xb)
                        doctor.step(out, loss, xb, **kwargs)  # z in it when the family has one
                        total = loss["loss"] if isinstance(loss, Mapping) else loss
                        total.backward()
                        optimizer.step()
                        steps += 1
                    doctor.epoch_end()
            except Exception as exc:  # the user's loop crashed (e.g. BCE on a NaN output):
                error = f"training raised {type(exc).__name__}: {exc}"  # judge what was seen
        found = doctor.findings(data=x_all, batch_size=BATCH)
        fired = sorted({f.code for f in found if f.severity in ("warning", "error")})
        info = sorted({f.code for f in found if f.severity == "info"})
        skipped = sorted({n.code for n in found.not_checked})
    except Exception as exc:  # mtx misbehaved: recorded, reported
        error = f"mtx raised {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    expected = sorted(fault.expected)
    hit = set(fired) | (set(info) & INFO_CODES)
    return RunResult(
        family=fam.name,
        data=data_name,
        fault=fault.name,
        seed=seed,
        expected=expected,
        fired=fired,
        info=info,
        not_checked=skipped,
        steps=steps,
        seconds=seconds,
        error=error,
        found=bool(hit & fault.expected),
        alarms=sorted(set(fired) - fault.expected),
    )


# ---- the grid and its tables ----------------------------------------------------------------

QUICK_FAULTS = (
    "healthy",
    "frozen-noise",
    "nan-log0",
    "dying-relu",
    "detached-recon",
    "unused-params",
)


@dataclass(frozen=True)
class Grid:
    families: tuple[str, ...]
    data: tuple[str, ...]
    faults: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int


DEFAULT = Grid(tuple(FAMILIES), ("digits", "breast-cancer"), tuple(FAULTS), (0, 1, 2), 10)
QUICK = Grid(("mlp-gauss", "mlp-bernoulli"), ("digits",), QUICK_FAULTS, (0,), 4)


def cells(grid: Grid) -> tuple[list[tuple[Family, str, Fault, int]], list[str]]:
    """The runs of the grid, and a line per combination skipped (with why)."""
    runs, skips = [], []
    for fname in grid.families:
        fam = FAMILIES[fname]
        for data in grid.data:
            if data not in fam.data:
                skips.append(f"{fam.name} × {data}: the family takes 8×8 images only")
                continue
            for fault_name in grid.faults:
                fault = FAULTS[fault_name]
                why = fault.applies(fam)
                if why:
                    skips.append(f"{fam.name} × {data} × {fault.name}: {why}")
                    continue
                runs.extend((fam, data, fault, s) for s in grid.seeds)
    return runs, sorted(set(skips))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    out = [line(headers), "  ".join("─" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f}%)" if b else "–"


def report(results: Sequence[RunResult]) -> str:
    parts: list[str] = []
    by_fault: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_fault[r.fault].append(r)

    # per fault: recall, precision, unexpected codes, steps, time
    rows = []
    tp_all = tpc_all = fired_all = found_all = runs_all = 0
    for name, rs in by_fault.items():
        if name == "healthy":
            continue
        fault = FAULTS[name]
        found = sum(r.found for r in rs)
        unchecked = sum(
            1 for r in rs if not r.found and set(r.not_checked) & fault.expected and not r.error
        )
        tp = sum(len(set(r.fired) & fault.expected) for r in rs)
        tpc = sum(len(set(r.fired) & (fault.expected | fault.consequences)) for r in rs)
        fired = sum(len(r.fired) for r in rs)
        alarms = Counter(c for r in rs for c in r.alarms)
        rows.append(
            (
                name,
                ",".join(sorted(fault.expected)),
                _pct(found, len(rs)),
                unchecked,
                _pct(tp, fired),
                _pct(tpc, fired),
                " ".join(f"{c}×{n}" for c, n in alarms.most_common()) or "–",
                f"{sum(r.steps for r in rs) / len(rs):.0f}",
                f"{sum(r.seconds for r in rs) / len(rs):.2f}",
            )
        )
        tp_all, fired_all, found_all, runs_all = (
            tp_all + tp,
            fired_all + fired,
            found_all + found,
            runs_all + len(rs),
        )
        tpc_all += tpc
    parts.append(
        "Per fault. A run whose training raised is judged on the steps before the crash (listed\n"
        "at the end). (recall: an expected code fired at warning/error, or info for info codes;\n"
        "precision: fired warning/error codes that are expected / all fired; +consequences also\n"
        "counts the codes the fault legitimately causes, e.g. a detached reconstruction starves\n"
        "the decoder: unused-params)\n\n"
        + table(
            (
                "fault",
                "expected",
                "recall",
                "not-checked",
                "precision",
                "+consequences",
                "also fired (unexpected)",
                "steps",
                "s/run",
            ),
            rows,
        )
    )
    parts.append(
        f"Overall: recall {_pct(found_all, runs_all)}, precision {_pct(tp_all, fired_all)}, "
        f"precision counting declared consequences {_pct(tpc_all, fired_all)}"
    )

    # per fault x family recall
    fams = sorted({r.family for r in results})
    rows = []
    for name, rs in by_fault.items():
        if name == "healthy":
            continue
        row: list[object] = [name]
        for fam in fams:
            fr = [r for r in rs if r.family == fam]
            row.append(f"{sum(r.found for r in fr)}/{len(fr)}" if fr else "skip")
        rows.append(row)
    parts.append("Recall by family\n\n" + table(("fault", *fams), rows))

    # healthy: false alarms
    healthy = by_fault.get("healthy", [])
    if healthy:
        alarmed = [r for r in healthy if r.fired]
        codes = Counter(c for r in healthy for c in r.fired)
        rows = []
        for fam in fams:
            fr = [r for r in healthy if r.family == fam]
            if fr:
                fc = Counter(c for r in fr for c in r.fired)
                rows.append(
                    (
                        fam,
                        _pct(sum(1 for r in fr if r.fired), len(fr)),
                        " ".join(f"{c}×{n}" for c, n in fc.most_common()) or "–",
                    )
                )
        parts.append(
            f"Healthy runs: false-alarm rate {_pct(len(alarmed), len(healthy))}; codes: "
            + (" ".join(f"{c}×{n}" for c, n in codes.most_common()) or "none")
            + "\n\n"
            + table(("family", "false alarms", "codes"), rows)
        )

    misses = [r for r in results if r.fault != "healthy" and not r.found]
    alarms = [r for r in results if r.alarms]
    errors = [r for r in results if r.error]
    if misses:
        parts.append(
            "Misses\n\n"
            + "\n".join(
                f"  {r.family} × {r.data} × {r.fault} seed {r.seed}: fired {r.fired or '–'}"
                + (", expected code not checked" if set(r.not_checked) & set(r.expected) else "")
                for r in misses
            )
        )
    if alarms:
        parts.append(
            "Unexpected warning/error codes\n\n"
            + "\n".join(
                f"  {r.family} × {r.data} × {r.fault} seed {r.seed}: {r.alarms}" for r in alarms
            )
        )
    if errors:
        parts.append(
            "Runs that raised\n\n"
            + "\n".join(
                f"  {r.family} × {r.data} × {r.fault} seed {r.seed}: {r.error}" for r in errors
            )
        )
    return "\n\n".join(parts)


def run_grid(grid: Grid, progress: bool = False) -> tuple[list[RunResult], list[str]]:
    torch.set_num_threads(1)
    runs, skips = cells(grid)
    results = []
    for i, (fam, data, fault, seed) in enumerate(runs):
        results.append(run_one(fam, data, fault, seed, grid.epochs))
        if progress:
            r = results[-1]
            print(
                f"[{i + 1}/{len(runs)}] {fam.name} {data} {fault.name} s{seed}: "
                f"{r.fired or '–'} {r.seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return results, skips


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (< 60 s)")
    parser.add_argument("--json", type=Path, help="save the raw per-run results here")
    parser.add_argument("--progress", action="store_true", help="one line per run on stderr")
    args = parser.parse_args(argv)
    grid = QUICK if args.quick else DEFAULT
    start = time.perf_counter()
    results, skips = run_grid(grid, progress=args.progress)
    total = time.perf_counter() - start
    header = (
        f"mtx fault benchmark ({'quick' if args.quick else 'default'} grid): "
        f"{len(results)} runs, families {', '.join(grid.families)}; data {', '.join(grid.data)}; "
        f"seeds {list(grid.seeds)}; {grid.epochs} epochs, batch {BATCH}, Adam lr {LR}, 1 thread\n"
        "Detection latency: not measured (the Doctor judges at the end); steps = steps trained."
    )
    skipped = "Skipped combinations\n\n" + ("\n".join(f"  {s}" for s in skips) or "  none")
    text = "\n\n".join([header, report(results), skipped, f"Total time: {total:.1f} s"])
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"grid": asdict(grid), "seconds": total, "runs": [asdict(r) for r in results]},
                indent=1,
            )
        )
    return text


if __name__ == "__main__":
    main()
