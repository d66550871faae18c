"""``lbm-reg train`` and ``lbm-reg data synth``: parse options -> call ``api.train`` -> render.

Every training-config key can be set from the command line: the common ones have their own
option, the rest go through ``--set KEY=VALUE`` (dotted keys, YAML values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lbm_registry.cli._common import JSON_OPTION, console, fail, print_json, settings
from lbm_registry.errors import ConfigError

data_app = typer.Typer(help="Datasets (webdataset shards).", no_args_is_help=True)


def train(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", help="Training config YAML (configs/lora-finetune.yaml)."),
    base: str | None = typer.Option(None, "--base", help="Base model REF."),
    lora: str | None = typer.Option(None, "--lora", help="LoRA REF to start from."),
    model_config: str | None = typer.Option(None, "--model-config", help="LBM config (when the base has none)."),
    train_shards: list[str] | None = typer.Option(None, "--train-shards", metavar="PATH", help="Shard path or brace pattern (repeatable)."),
    validation_shards: list[str] | None = typer.Option(
        None, "--validation-shards", metavar="PATH",
        help="Validation shards (repeatable); '[]' = no validation (as in the config)."),
    trainable_lora_modules: list[str] | None = typer.Option(
        None, "--trainable-lora-modules", metavar="PATTERN",
        help="Modules to train (repeatable): a plain name selects every module containing it (attn1, up_blocks); "
             "globs (*, ?, [) and re:REGEX match whole names."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    epochs: int | None = typer.Option(None, "--epochs", help="... or after this many passes over the shards."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Samples per process per micro-step."),
    gradient_accumulation_steps: int | None = typer.Option(
        None, "--gradient-accumulation-steps", help="Micro-steps per optimizer step."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute UNet activations in backward: far less memory, ~30% more time, same result."),
    cache_latents: str | None = typer.Option(
        None, "--cache-latents", help="Encode each pair once: no, memory or disk (under the run folder)."),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="auto, no, bf16 or fp16."),
    num_processes: int | None = typer.Option(
        None, "--num-processes", help="Local data-parallel workers (gloo on CPU, NCCL on GPU)."),
    resolution: str | None = typer.Option(
        None, "--resolution", help="Training image side in pixels, or HEIGHTxWIDTH (480x640)."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="Optimizer learning rate."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adamw, adamw8bit (GPU + bitsandbytes) or sgd."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the data order, timesteps and noise (0 to 2**63-1)."),
    validation_interval: int | None = typer.Option(None, "--validation-interval",
                                                   help="Validation loss and samples every N steps."),
    checkpoint_interval: int | None = typer.Option(None, "--checkpoint-interval",
                                                   help="A checkpoint (for --resume) every N steps."),
    on_bad_sample: str | None = typer.Option(None, "--on-bad-sample", help="error or skip."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Where checkpoints, samples and the LoRA go."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    mlflow: bool | None = typer.Option(None, "--mlflow/--no-mlflow", help="Log the run to the workspace's MLflow."),
    register: str | None = typer.Option(None, "--register", help="Register the trained LoRA under this name."),
    resume: bool = typer.Option(False, "--resume", help="Resume from the last checkpoint in the output dir."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help="Any other config key: KEY=VALUE (repeatable)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Fine-tune an existing LoRA (or a new one) on webdataset shards; optionally register it."""
    from lbm_registry.api.train import parse_set_option, train_lora

    overrides: dict[str, Any] = parse_set_option(set_)
    options = {
        "base": base, "lora": lora, "model_config": model_config, "train_shards": train_shards or None,
        "validation_shards": _no_validation(validation_shards), "trainable_lora_modules": trainable_lora_modules or None,
        "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size, "resolution": resolution,
        "gradient_accumulation_steps": gradient_accumulation_steps, "gradient_checkpointing": gradient_checkpointing,
        "cache_latents": cache_latents, "mixed_precision": mixed_precision, "num_processes": num_processes,
        "learning_rate": learning_rate, "optimizer": optimizer, "seed": seed,
        "validation_interval": validation_interval, "checkpoint_interval": checkpoint_interval,
        "on_bad_sample": on_bad_sample, "output_dir": output_dir, "device": device, "mlflow": mlflow,
        "register": register,
    }
    overrides.update({k: v for k, v in options.items() if v is not None})
    con = console(stderr=as_json)
    result = train_lora(config, overrides, settings=settings(ctx), resume=resume, progress=True, console=con,
                        err_console=console(stderr=True), json_output=as_json)
    if result.get("process_rank", 0) != 0:  # one of several workers (accelerate launch / torchrun): rank 0 reports
        return
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.5f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    t = Table(title="LoRA training", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for key in ("base", "parent", "steps", "epochs", "num_processes", "global_batch", "resumed_from", "initial_val_loss", "val_loss", "train_loss",
                "trainable_params", "lora_params", "trained_modules", "skipped_samples", "lora_path",
                "samples", "loss_plot", "mlflow_run_id"):
        if result.get(key) is not None:
            t.add_row(key.replace("_", " "), fmt(result[key]))
    con.print(t)
    if result.get("ref"):
        con.print(f"[green]registered[/] {result['ref']}  (sha256 {result['sha256'][:12]})")


def _no_validation(shards: list[str] | None) -> list[str] | None:
    """``--validation-shards '[]'`` is the config's ``[]`` (no validation), not a file named '[]'."""
    if shards and [s.strip() for s in shards] == ["[]"]:
        return []
    if shards and "[]" in (s.strip() for s in shards):
        raise ConfigError("--validation-shards '[]' (no validation) cannot be given with shard paths")
    return shards or None


@data_app.command("synth")
def synth(
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the shards."),
    n: int = typer.Option(16, "--n", help="Number of pairs."),
    resolution: int = typer.Option(128, "--resolution", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    shard_size: int = typer.Option(64, "--shard-size", help="Pairs per shard."),
    prefix: str = typer.Option("synth", "--prefix", help="Shard file names: PREFIX-000.tar ..."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write synthetic relighting pairs (source lit from one side, target from another) as shards."""
    if n < 1:
        fail("--n must be >= 1")
    from lbm_registry.api.train import synth_data

    result = synth_data(output, n, resolution=resolution, seed=seed, shard_size=shard_size, prefix=prefix)
    if as_json:
        print_json(result)
        return
    con = console()
    for p in result["shards"]:
        con.print(p)
    con.print(f"[green]wrote[/] {n} pairs in {len(result['shards'])} shard(s): {result['pattern']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.add_typer(data_app, name="data")
