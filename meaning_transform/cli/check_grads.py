"""``mtx check-grads``: per-parameter gradient statistics over a few training steps."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any

import typer

from meaning_transform.cli import common
from meaning_transform.cli.common import (
    BatchSize,
    DataPath,
    Device,
    Epochs,
    FailOn,
    Force,
    Format,
    InputShape,
    Json,
    LossArgs,
    LossSpec,
    LossWeights,
    Lr,
    ModelSpec,
    Output,
    Plot,
    ScenarioName,
    Seed,
)
from meaning_transform.constants import MAX_NPROC


def check_grads(
    kl_weight: Annotated[float, typer.Option("--kl-weight", help="KL weight.")] = 0.1,
    recon_weight: Annotated[
        float, typer.Option("--recon-weight", help="Reconstruction weight.")
    ] = 1.0,
    semantic_weight: Annotated[
        float | None,
        typer.Option(
            "--semantic-weight",
            help="Semantic weight (default 0.5; off on data that is not the agent layout).",
            show_default=False,
        ),
    ] = None,
    reduction: Annotated[
        str, typer.Option("--reduction", help="mean (per sample) | sum (over the batch).")
    ] = "mean",
    clip: Annotated[
        float | None,
        typer.Option(
            "--clip",
            help="Clip gradients to this max norm (statistics are taken before clipping).",
            show_default=False,
        ),
    ] = None,
    model: ModelSpec = None,
    loss: LossSpec = None,
    loss_arg: LossArgs = None,
    loss_weight: LossWeights = None,
    input_shape: InputShape = None,
    scenario: ScenarioName = "healthy",
    seed: Seed = 0,
    device: Device = "auto",
    epochs: Epochs = 3,
    batch_size: BatchSize = 128,
    lr: Lr = 1e-3,
    data: DataPath = None,
    json: Json = False,
    plot: Plot = None,
    fail_on: FailOn = "error",
    force: Force = False,
    output_format: Format = None,
    output: Output = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            help=f"Run the study on N local processes under DistributedDataParallel (gloo, "
            f"CPU), 1 to {MAX_NPROC}; --batch-size is split between them.",
        ),
    ] = 1,
) -> None:
    """Train a fresh VAE for a few steps and show every parameter's gradient.

    Every optimizer step of --epochs epochs is monitored (512 samples, batch 128, 3 epochs:
    12 steps). Per step: the total gradient norm, which equals what
    torch.nn.utils.clip_grad_norm_ returns for the same gradients, and the ratio of the
    gradient norms of the first and the last layer (Linear or conv) in forward order.
    For the last step, per parameter: shape, norm, mean, std, min, max, share of exact
    zeros, NaN/Inf count and the update relative to the weight. Parameters that require
    a gradient but never got one, and vanished, non-finite, frozen or oversized updates
    are flagged. With --clip the
    gradients are clipped after they are measured: reported norms are before clipping.
    With --nproc N the same study runs on N ranks under DDP, and the ranks are checked
    against each other (a NaN on one rank, replicas or buffers out of sync, data).

    Example: mtx check-grads --epochs 2 --clip 1.0 --json
    """
    opts = common.CommonOptions(
        seed, device, epochs, batch_size, lr, data, json, plot, fail_on, force
    ).reporting(output_format, output)
    quiet = opts.machine_stdout  # stdout carries the report's format alone
    with common.user_errors_exit(json=quiet), common.progress(enabled=not quiet) as bar:
        opts.validate()
        common.choice("--reduction", reduction, common.REDUCTIONS)
        for name, value in (
            ("--kl-weight", kl_weight),
            ("--recon-weight", recon_weight),
            ("--semantic-weight", semantic_weight),
        ):
            if value is not None:
                common.non_negative(name, value)
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise common.UsageProblem(f"--clip must be a positive number, got {clip}")
        common.count_option("--nproc", nproc, 1, MAX_NPROC)
        if nproc > 1 and device not in ("auto", "cpu"):
            raise common.UsageProblem(
                f"--nproc runs its ranks on the CPU (gloo): use --device cpu, not {device}"
            )

        bar.begin("loading torch")
        from meaning_transform.studies.check_grads import run_check_grads
        from meaning_transform.studies.report import CheckGradsConfig

        user = common.UserCode.of(model, loss, loss_arg, loss_weight, input_shape)
        dataset, factory, fault, losses = common.prepare(
            opts, user, scenario, semantic_weight, nproc
        )
        semantic = 0.5 if semantic_weight is None else semantic_weight
        config = common.run_options(opts, model, scenario, reduction)
        if nproc > 1:
            from meaning_transform.studies.report import DistributedCheckGradsConfig

            report: Any = _distributed(
                opts,
                user,
                dataset,
                DistributedCheckGradsConfig(
                    **config,
                    recon_weight=recon_weight,
                    kl_weight=kl_weight,
                    semantic_weight=semantic_weight,
                    clip=clip,
                    nproc=nproc,
                ),
                semantic,
                bar,
            )
        else:
            options = CheckGradsConfig(
                **config,
                recon_weight=recon_weight,
                kl_weight=kl_weight,
                semantic_weight=semantic_weight,
                clip=clip,
            )
            bar.begin("training", total=epochs)
            pipeline = common.pipeline(
                opts, dataset, factory, fault, reduction, bar, losses, clip_grad_norm=clip
            )
            report = run_check_grads(
                pipeline, options, recon=recon_weight, kl=kl_weight, semantic=semantic
            )
        bar.close()
        common.finish(report, opts, user)


def _distributed(
    opts: common.CommonOptions,
    user: common.UserCode,
    dataset: Any,
    options: Any,
    semantic: float,
    bar: common.ProgressBar,
) -> Any:
    """Run the study on ``options.nproc`` ranks (see ``studies/distributed.py``)."""
    from meaning_transform.studies import distributed

    shape = None
    if user.input_shape is not None:
        from meaning_transform.adapters import parse_input_shape

        shape = parse_input_shape(user.input_shape)  # checked by prepare()
    weights = common.loss_kwargs(user.loss_weights, "--loss-weight")
    config = common.train_config(opts, clip_grad_norm=options.clip)
    job = distributed.DistributedJob(
        nproc=options.nproc,
        dataset=dataset,
        train_config=replace(  # gloo ranks train on the CPU
            config,
            batch_size=distributed.rank_batch_size(config.batch_size, options.nproc),
            device="cpu",
        ),
        reduction=options.reduction,
        scenario=options.scenario,
        options=options,
        recon=options.recon_weight,
        kl=options.kl_weight,
        semantic=semantic,
        model_spec=user.model,
        input_shape=shape,
        loss_spec=user.loss,
        loss_kwargs=tuple(common.loss_kwargs(user.loss_args).items()),
        loss_weights=tuple((k, float(v)) for k, v in weights.items()),  # type: ignore[arg-type]
    )
    bar.begin(f"training on {options.nproc} ranks")
    try:
        return distributed.run_check_grads_distributed(job)
    except distributed.DistributedRunError as e:
        raise common.UsageProblem(str(e)) from e
