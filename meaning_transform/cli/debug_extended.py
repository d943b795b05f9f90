"""``mtx debug-extended``: the deep look at one model per data kind."""

from __future__ import annotations

from typing import Annotated

import typer

from meaning_transform.cli import common
from meaning_transform.cli.common import (
    BatchSize,
    BetaKwarg,
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
from meaning_transform.constants import DATA_KINDS

DATA_KIND_CHOICES: tuple[str, ...] = ("all", *DATA_KINDS)


def debug_extended(
    data_kind: Annotated[
        str,
        typer.Option(
            "--data-kind",
            help="all|agent_states|normal|uniform|binary|one_hot (synthetic data only).",
            autocompletion=common.completes(DATA_KIND_CHOICES),
        ),
    ] = "all",
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples", help="Synthetic samples per data kind, at least 2 (default 256)."
        ),
    ] = None,
    reduction: Annotated[
        str, typer.Option("--reduction", help="mean (per sample) | sum (over the batch).")
    ] = "mean",
    seed: Seed = 0,
    device: Device = "auto",
    epochs: Epochs = 5,
    batch_size: BatchSize = 128,
    lr: Lr = 1e-3,
    data: DataPath = None,
    json: Json = False,
    plot: Plot = None,
    fail_on: FailOn = "error",
    force: Force = False,
    output_format: Format = None,
    output: Output = None,
    model: ModelSpec = None,
    loss: LossSpec = None,
    loss_arg: LossArgs = None,
    loss_weight: LossWeights = None,
    input_shape: InputShape = None,
    beta_kwarg: BetaKwarg = None,
    scenario: ScenarioName = "healthy",
) -> None:
    """The deep look: inspect, probe and briefly train a VAE per data kind.

    Per kind (agent_states, normal, uniform, binary, one_hot; --data-kind picks
    one), each step from a fresh model at the same seed: parameter statistics of
    the untrained model, flagging only NaN/Inf, all-identical weight matrices and
    magnitudes above 1e3 (zero biases and batch-norm ones are how layers start);
    an untrained pass in train and in eval mode, and why they differ; a short
    training run with gradient statistics captured by hooks; then, on the trained
    model, the KL term by term (1, log_var, -mu², -exp(log_var)), the KL per
    latent dimension with active units and free bits, and the reconstruction
    error per feature; and a short linear-β annealing run. The semantic term is
    on for agent states only.

    With --data FILE the file is the one kind: leave --data-kind and --samples
    out. --model runs your own VAE instead of the built-in one; --scenario injects
    a known fault into the built-in setup.

    Example: mtx debug-extended --data-kind normal --epochs 3 --json
    """
    opts = common.CommonOptions(
        seed, device, epochs, batch_size, lr, data, json, plot, fail_on, force
    ).reporting(output_format, output)
    quiet = opts.machine_stdout  # stdout carries the report's format alone
    with common.user_errors_exit(json=quiet), common.progress(enabled=not quiet) as bar:
        opts.validate()
        common.choice("--data-kind", data_kind, DATA_KIND_CHOICES)
        common.choice("--reduction", reduction, common.REDUCTIONS)
        if samples is not None:
            common.count_option("--samples", samples, 2, common.MAX_SAMPLES)
        if data is not None and data_kind != "all":
            raise common.UsageProblem(
                f"--data-kind {data_kind} cannot be used with --data: the file is the data"
            )
        if data is not None and samples is not None:
            raise common.UsageProblem("--samples cannot be used with --data: the file is the data")

        bar.begin("loading torch")
        from dataclasses import replace

        from meaning_transform.studies.debug_extended import (
            extended_datasets,
            run_debug_extended,
        )
        from meaning_transform.studies.report import DebugExtendedConfig

        if loss is not None and beta_kwarg is None:
            raise common.UsageProblem(
                "debug-extended's annealing run sets the KL weight each epoch: name the "
                "keyword of your --loss that takes it with --beta-kwarg (e.g. --beta-kwarg M_N)"
            )
        user = common.UserCode.of(model, loss, loss_arg, loss_weight, input_shape, beta_kwarg)
        factory, fault = common.model_and_scenario(user, scenario)
        losses = common.loss_factory(user)
        sizes = {} if samples is None else {"n": samples}
        datasets = extended_datasets(data_kind, data, seed=seed, scenario=fault, **sizes)
        n = int(datasets[0].tensor.shape[0])
        if n < 2:
            raise common.UsageProblem(f"the data has {n} sample(s); need at least 2")
        for dataset in datasets:
            common.checked_model(factory, dataset, opts, model, fault, losses)
        options = DebugExtendedConfig(
            **common.run_options(opts, model, scenario, reduction),
            data_kind="file" if data is not None else data_kind,
            samples=n,
        )
        bar.begin("debugging", total=2 * epochs * len(datasets))  # main + annealing run
        pipeline = common.pipeline(opts, datasets[0], factory, fault, reduction, bar, losses)
        report = run_debug_extended(lambda d: replace(pipeline, dataset=d), datasets, options)
        bar.close()
        common.finish(report, opts, user)
