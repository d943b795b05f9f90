"""``mtx check-grads --nproc N``: the check-grads study on N local processes under DDP.

The parent process never trains: :func:`run_check_grads_distributed` starts ``N``
spawned ranks (``torch.multiprocessing.start_processes``), which meet over a localhost
TCP rendezvous on a free port and form a gloo process group. Each rank rebuilds the same
study from a :class:`DistributedJob` (plain, picklable data: the user's model and loss
travel as their specs and are loaded again in the rank), wraps its fresh model in
``DistributedDataParallel``, trains on its ``DistributedSampler`` share with the Doctor
attached (which adds the rank checks of ``diagnostics/distributed.py``) and writes its
result, a :class:`RankResult`, to a pickle file in a temporary directory. The parent
joins the ranks with a deadline, then merges the results into one
:class:`~meaning_transform.studies.report.DistributedCheckGradsReport`.

Failures: a rank that raises writes its exception (and traceback) instead; the parent
re-raises the first one (bad input stays bad input, so the CLI prints its one line). A
rank that dies without a result, or does not finish by the deadline, ends the run in a
:class:`DistributedRunError` naming it; the others are killed.
"""

from __future__ import annotations

import copyreg
import datetime
import math
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from meaning_transform.constants import MAX_NPROC
from meaning_transform.diagnostics.distributed import (
    RankEvidence,
    rank_findings,
    rank_not_checked,
)
from meaning_transform.diagnostics.findings import (
    merge_findings,
    merge_not_checked,
    sort_findings,
)
from meaning_transform.studies.report import (
    CheckGradsConfig,
    CheckGradsReport,
    DistributedCheckGradsConfig,
    DistributedCheckGradsReport,
    RankRow,
)
from meaning_transform.studies.setup import Dataset
from meaning_transform.training import TrainConfig

BACKEND = "gloo"  # CPU collectives
INIT_TIMEOUT_S = 60  # the process group's timeout: rendezvous and every collective
# the parent's deadline for the whole run: a rank stuck past it is killed. A hung
# collective already fails after INIT_TIMEOUT_S; this also catches a rank stuck elsewhere.
DEADLINE_BASE_S = 120.0
DEADLINE_PER_EPOCH_S = 2.0  # longer runs get longer: the built-in epoch takes ~50 ms
GRACE_S = 5.0  # after one rank failed, how long the others get to exit on their own


class DistributedRunError(RuntimeError):
    """A rank hung, died or could not start; the message names it."""


@dataclass(frozen=True)
class DistributedJob:
    """Everything a rank needs to rebuild the study, as plain picklable data.

    ``train_config.batch_size`` is the batch of one rank (the CLI's ``--batch-size``
    divided by ``nproc``); ``options`` is the report's config as the user gave it.
    """

    nproc: int
    dataset: Dataset
    train_config: TrainConfig
    reduction: str
    scenario: str  # a SCENARIOS name
    options: DistributedCheckGradsConfig
    recon: float
    kl: float
    semantic: float
    model_spec: str | None = None
    input_shape: tuple[int, ...] | None = None
    loss_spec: str | None = None
    loss_kwargs: tuple[tuple[str, object], ...] = ()
    loss_weights: tuple[tuple[str, float], ...] = ()

    @property
    def deadline_s(self) -> float:
        return DEADLINE_BASE_S + DEADLINE_PER_EPOCH_S * self.train_config.epochs


@dataclass(frozen=True)
class RankResult:
    """What one rank sends back: its own check-grads report, its row of the rank table
    and the rank checks' evidence."""

    report: CheckGradsReport  # its findings: this rank's own
    row: RankRow
    ranks: RankEvidence | None  # the rank checks' evidence (the same on every rank)


def check_nproc(nproc: int) -> int:
    """Refuse a process count outside 1..:data:`MAX_NPROC` (a ValueError)."""
    if not 1 <= nproc <= MAX_NPROC:
        raise ValueError(f"--nproc must be 1 to {MAX_NPROC} local processes, got {nproc}")
    return nproc


def rank_batch_size(batch_size: int | None, nproc: int) -> int | None:
    """One rank's batch: the global ``batch_size`` split evenly (None: each rank's full
    share). At least 1."""
    return None if batch_size is None else max(1, batch_size // nproc)


def rank_share(n: int, nproc: int) -> int:
    """Samples per rank and epoch: ``DistributedSampler`` pads to equal shares."""
    return -(-n // nproc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- parent


def run_check_grads_distributed(
    job: DistributedJob, on_tick: Callable[[], None] | None = None
) -> DistributedCheckGradsReport:
    """Run the study on ``job.nproc`` ranks; merge their results into one report.

    ``on_tick`` is called about every 0.2 s while the ranks run (a progress bar).
    """
    import torch.multiprocessing as mp

    check_nproc(job.nproc)
    with tempfile.TemporaryDirectory(prefix="mtx-nproc-") as tmp:
        out = Path(tmp)
        port = free_port()
        context = mp.start_processes(
            _rank_main,
            args=(job, port, str(out)),
            nprocs=job.nproc,
            join=False,
            start_method="spawn",
        )
        procs = list(context.processes)
        _join(procs, out, job.deadline_s, on_tick)
        results = [_read(out, r, procs[r].exitcode) for r in range(job.nproc)]
    return merge_ranks(job, results)


def _join(
    procs: list[Any], out: Path, deadline_s: float, on_tick: Callable[[], None] | None
) -> None:
    """Wait for every rank; past the deadline, or once a rank failed and the others did
    not follow within :data:`GRACE_S`, kill the rest. Raises for a hung rank."""
    start = time.monotonic()
    failed_at: float | None = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(
            not p.is_alive() and p.exitcode != 0 or (out / f"rank{r}.error").exists()
            for r, p in enumerate(procs)
        ):
            failed_at = now
        if failed_at is not None and now - failed_at > GRACE_S:
            _kill(procs)
            return  # the failed rank's error explains it
        if now - start > deadline_s:
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            _kill(procs)
            which = ", ".join(str(r) for r in hung)
            raise DistributedRunError(
                f"rank{'s' if len(hung) > 1 else ''} {which} did not finish within "
                f"{deadline_s:g} s (killed)"
            )
        if on_tick is not None:
            on_tick()
        procs[0].join(0.2)


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def _read(out: Path, rank: int, exitcode: int | None) -> RankResult:
    """Rank ``rank``'s result; the earliest rank error is re-raised as it was."""
    errors = sorted(out.glob("rank*.error"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        error, tb = pickle.loads(errors[0].read_bytes())
        if isinstance(error, BaseException):
            error.add_note(tb)  # type: ignore[attr-defined]  # shown with a bug's traceback, never in an error line
            raise error
        raise DistributedRunError(str(error))
    path = out / f"rank{rank}.pkl"
    if not path.exists():
        raise DistributedRunError(
            f"rank {rank} exited with code {exitcode} before sending its result"
        )
    result = pickle.loads(path.read_bytes())
    if not isinstance(result, RankResult):
        raise TypeError(f"rank {rank} sent a {type(result).__name__}, expected a RankResult")
    return result


def merge_ranks(job: DistributedJob, results: list[RankResult]) -> DistributedCheckGradsReport:
    """One report: rank 0's check-grads study (its gradients are the all-reduced ones),
    every rank's own findings merged naming the ranks, the rank checks' findings (the
    same on every rank: judged once, on rank 0's evidence), and one row per rank."""
    first = results[0].report
    merged = ("config", "findings", "not_checked")
    ranks = results[0].ranks
    own = {f.name: getattr(first, f.name) for f in fields(CheckGradsReport) if f.init}
    rows = tuple(r.row for r in results)
    return DistributedCheckGradsReport(
        **{k: v for k, v in own.items() if k not in merged},
        config=job.options,
        findings=tuple(
            sort_findings(
                [
                    *merge_findings([(f"rank {r.row.rank}", r.report.findings) for r in results]),
                    *(rank_findings(ranks) if ranks is not None else ()),
                ]
            )
        ),
        not_checked=merge_not_checked(
            [
                *((f"rank {r.row.rank}", r.report.not_checked) for r in results),
                ("all ranks", rank_not_checked(ranks) if ranks is not None else []),
            ]
        ),
        nproc=job.nproc,
        backend=BACKEND,
        ranks=rows,
    )


# --------------------------------------------------------------------------- one rank


def _rank_main(rank: int, job: DistributedJob, port: int, out_dir: str) -> None:
    """One rank: join the group, run the study, write the result (or the error)."""
    import torch.distributed as dist

    out = Path(out_dir)
    # the parent alone writes stdout (the report, pure under --json); what the user's
    # code prints goes to stderr
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            BACKEND,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=job.nproc,
            timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S),
        )
        result = _run_rank(rank, job)
        data = _dumps(result)
        tmp = out / f"rank{rank}.pkl.tmp"
        tmp.write_bytes(data)
        tmp.rename(out / f"rank{rank}.pkl")
    except BaseException as e:  # sent to the parent, which re-raises it
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps((e, tb))
        except Exception:  # an exception that does not pickle: its text
            payload = pickle.dumps((f"rank {rank}: {type(e).__name__}: {e}", tb))
        (out / f"rank{rank}.error").write_bytes(payload)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _dumps(result: RankResult) -> bytes:
    """Pickle a result; a report's read-only mappings (``MappingProxyType``) go as dicts
    and come back read-only."""
    copyreg.pickle(types.MappingProxyType, _reduce_mapping)
    return pickle.dumps(result)


def _reduce_mapping(m: types.MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return (read_only, (dict(m),))


def read_only(d: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    """A read-only view of ``d`` (how a pickled report's mappings come back)."""
    return types.MappingProxyType(d)


def _run_rank(rank: int, job: DistributedJob) -> RankResult:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from meaning_transform.scenarios import SCENARIOS
    from meaning_transform.studies.check_grads import check_grads_run
    from meaning_transform.studies.pipeline import DataParallel, Pipeline

    scenario = None if job.scenario == "healthy" else SCENARIOS[job.scenario]
    fault = scenario.rank_fault if scenario is not None else None
    broadcast_buffers = fault.broadcast_buffers if fault is not None else True

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        if fault is not None:
            fault.after_broadcast(model, rank)
        return ddp

    def sampler(n: int) -> DistributedSampler[Any]:
        indices: Any = range(n)  # the sampler needs only len() of its data set
        return DistributedSampler(indices, shuffle=True, seed=job.train_config.seed)

    factory = losses = None
    if job.model_spec is not None:
        from meaning_transform.user_model import load_model_factory

        factory = load_model_factory(job.model_spec, job.input_shape)
    if job.loss_spec is not None:
        from meaning_transform.user_model import load_loss_factory

        losses = load_loss_factory(
            job.loss_spec, dict(job.loss_kwargs), None, dict(job.loss_weights)
        )
    pipeline = Pipeline(
        dataset=job.dataset,
        train_config=job.train_config,
        reduction=job.reduction,
        model_factory=factory,
        scenario=scenario,
        loss_factory=losses,
        parallel=DataParallel(wrap=wrap, sampler=sampler, rank=rank),
    )
    options: CheckGradsConfig = job.options
    report, ranks = check_grads_run(
        pipeline, options, job.recon, job.kl, job.semantic, where=f"rank {rank}"
    )
    samples = len(sampler(job.dataset.tensor.shape[0])) * job.train_config.epochs
    return RankResult(report=report, row=rank_row(rank, report, ranks, samples), ranks=ranks)


def rank_row(
    rank: int, report: CheckGradsReport, ranks: RankEvidence | None, samples: int
) -> RankRow:
    """One rank's line: its steps and samples, last finite loss, median local gradient
    norm (before DDP's all-reduce, from the rank checks) and the number of its own
    findings (the rank checks' are apart: they are the same on every rank)."""
    finite = [s.loss for s in report.steps if math.isfinite(s.loss)]
    local = [
        step[rank]
        for step in (ranks.local_grad_norm if ranks is not None else ())
        if rank < len(step) and math.isfinite(step[rank])
    ]
    return RankRow(
        rank=rank,
        steps=len(report.steps),
        samples=samples,
        skipped_steps=sum(
            1
            for s in report.steps
            if not (math.isfinite(s.loss) and math.isfinite(s.clip_grad_norm))
        ),
        final_loss=finite[-1] if finite else None,
        median_local_grad_norm=statistics.median(local) if local else None,
        findings=len(report.findings),
    )
