"""``mtx check-grads``: per-parameter gradient statistics over a few training steps."""

from __future__ import annotations

import math
from typing import Annotated

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

        bar.begin("loading torch")
        from meaning_transform.studies.check_grads import run_check_grads
        from meaning_transform.studies.report import CheckGradsConfig

        user = common.UserCode.of(model, loss, loss_arg, loss_weight, input_shape)
        dataset, factory, fault, losses = common.prepare(opts, user, scenario, semantic_weight)
        options = CheckGradsConfig(
            **common.run_options(opts, model, scenario, reduction),
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
            pipeline,
            options,
            recon=recon_weight,
            kl=kl_weight,
            semantic=0.5 if semantic_weight is None else semantic_weight,
        )
        bar.close()
        common.finish(report, opts, user)
