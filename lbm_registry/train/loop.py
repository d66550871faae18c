"""The LoRA fine-tuning loop: bridge-matching steps, validation, checkpoints, progress.

:class:`LoRATrainer` takes an already loaded base model and a LoRA file (resolving references
and registering results is the API layer's job) and owns everything that happens during a
run. Reproducibility is a design goal: with the same seed, a run that is interrupted (Ctrl-C or
a crash after a checkpoint) and resumed ends with exactly the same weights as an uninterrupted
one, because the data order, timesteps and noise all come from explicitly seeded,
checkpointed sources.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lbm_registry.errors import DataError, TrainingError
from lbm_registry.lbm.model import LBMModel
from lbm_registry.lora.format import LoRAFile, write_lora
from lbm_registry.registry.runs import NullTracker
from lbm_registry.train.config import TrainConfig
from lbm_registry.train.data import PairStream
from lbm_registry.train.inject import LoRAInjection, inject_lora
from lbm_registry.train.objective import BridgeObjective
from lbm_registry.train.state import (
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)

if TYPE_CHECKING:
    from rich.console import Console

FINAL_LORA = "lora.safetensors"
SAMPLES = "samples.png"
LOSS_PLOT = "loss.png"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run produced. ``lora_path`` is the trained LoRA in the native format."""

    output_dir: Path
    lora_path: Path
    steps: int
    epochs: int
    train_loss: float | None
    val_loss: float | None
    initial_val_loss: float | None
    trainable_params: int
    lora_params: int
    total_params: int
    trained_modules: list[str]
    samples_path: Path | None = None
    loss_plot: Path | None = None
    skipped_samples: int = 0
    run_id: str | None = None
    resumed_from: int | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def uses_autocast(device: torch.device, mixed_precision: str) -> bool:
    """bf16 autocast on GPU (``auto``) or when asked (``bf16``); plain fp32 otherwise."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, mixed_precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if not uses_autocast(device, mixed_precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """Refuse to mix two runs in one folder, and to resume from nothing (cheap: call it early)."""
    if resume and latest_checkpoint(output_dir) is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {Path(output_dir) / 'checkpoints'}")
    if not resume and list_checkpoints(output_dir):
        raise TrainingError(f"{output_dir} already holds checkpoints: pass --resume to continue, "
                            "or choose another output_dir")


class _Progress:
    """A Rich progress bar with loss and it/s, or nothing."""

    def __init__(self, console: Console | None, enabled: bool, total: int | None, completed: int) -> None:
        self._bar = None
        if not (enabled and console is not None):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} it/s"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[val]}"), TimeRemainingColumn(), console=console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=completed, loss="-", val="", rate="-")
        self._t0, self._n0 = time.perf_counter(), completed

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, loss: float, val: float | None = None) -> None:
        if self._bar is None:
            return
        dt = time.perf_counter() - self._t0
        rate = (step - self._n0) / dt if dt > 0 else 0.0
        fields: dict[str, Any] = {"loss": f"{loss:.4f}", "rate": f"{rate:.2f}"}
        if val is not None:
            fields["val"] = f"val {val:.4f}"
        self._bar.update(self._task, completed=step, **fields)


class LoRATrainer:
    """Fine-tune the LoRA modules matching ``cfg.trainable_lora_modules``; everything else is frozen."""

    def __init__(self, cfg: TrainConfig, *, model: LBMModel, lora: LoRAFile, objective: BridgeObjective,
                 train_stream: PairStream, val_stream: PairStream | None, device: torch.device,
                 lora_info: dict[str, Any] | None = None, tracker: NullTracker | None = None,
                 console: Console | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.model = model
        self.objective = objective
        self.train_stream = train_stream
        self.val_stream = val_stream
        self.device = device
        self.lora_info = dict(lora_info or {})
        self.tracker = tracker or NullTracker()
        self.tracker.warn = self.warn
        self.console = console
        self.show_progress = progress
        if cfg.output_dir is None:
            raise TrainingError("output_dir is not set (the API picks one in the workspace)")
        self.output_dir = Path(cfg.output_dir)
        self.autocast = autocast_context(device, cfg.mixed_precision)

        model.requires_grad_(False)
        model.vae.eval()
        self.injection: LoRAInjection = inject_lora(model.denoiser, lora)
        self.trained_modules = self.injection.set_trainable(cfg.trainable_lora_modules)
        self.params = list(self.injection.trainable_parameters())
        if not self.params:
            raise TrainingError("no trainable LoRA parameters: trainable_lora_modules matched nothing")
        self.optimizer = build_optimizer(cfg, self.params)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.state = TrainState()
        self._step_rng: dict[str, Any] | None = None
        self._sample_pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._last_checkpoint_step = -1
        self._skipped_before = 0

    # -- reporting ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    @property
    def counts(self) -> dict[str, int]:
        return {"trainable": sum(p.numel() for p in self.params),
                "lora": self.injection.num_parameters(),
                "total": sum(p.numel() for p in self.model.parameters())}

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        self.model.denoiser.train()
        source = source.to(self.device)
        target = target.to(self.device)
        with self.autocast():
            out = self.objective(self.model, source, target, self.generator)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at step {self.state.step + 1}; "
                                "lower learning_rate or check the data")
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach().float().item()) for k, v in out.items()}

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss, with fixed timesteps/noise every time so values are comparable."""
        if self.val_stream is None:
            return None
        self.model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        total, n = 0.0, 0
        for batch in self.val_stream.batches(self.cfg.batch_size, limit=self.cfg.validation_max_samples):
            with self.autocast():
                out = self.objective(self.model, batch.source.to(self.device), batch.target.to(self.device), gen)
            total += float(out["loss"].float().item()) * len(batch.keys)
            n += len(batch.keys)
        if n == 0:
            raise DataError("no usable samples in the validation shards")
        return total / n

    def _grid_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._sample_pairs is None:
            k = self.cfg.num_sample_images
            stream = self.val_stream
            if stream is None:  # no validation set: show training pairs, in file order
                stream = PairStream(self.train_stream.shards, source_key=self.train_stream.source_key,
                                    target_key=self.train_stream.target_key,
                                    resolution=self.train_stream.resolution, on_bad_sample="skip", shuffle=False)
            self._sample_pairs = [(s, t) for _, _, s, t in stream.pairs(limit=k)] if k else []
        return self._sample_pairs

    @torch.no_grad()
    def sample_images(self, step: int) -> Path | None:
        """One-step predictions on a few fixed pairs, as ``samples/step-<N>.png`` and ``samples.png``."""
        from lbm_registry.lbm.imaging import to_pil
        from lbm_registry.lbm.sampler import sample
        from lbm_registry.train.plots import sample_grid, save_image

        pairs = self._grid_pairs()
        if not pairs:
            return None
        self.model.eval()
        src = torch.stack([s for s, _ in pairs]).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        lbm = self.model.config
        with self.autocast():
            z = sample(self.model.velocity, self.model.vae.encode(src), steps=lbm.inference.steps,
                       bridge_noise_sigma=self.objective.bridge_noise_sigma, generator=gen)
            pred = self.model.vae.decode(z)
        rows = [(to_pil(s), to_pil(p), to_pil(t)) for (s, t), p in zip(pairs, pred, strict=True)]
        grid = sample_grid(rows, title=f"step {step}")
        path = save_image(grid, self.output_dir / "samples" / f"step-{step:08d}.png")
        save_image(grid, self.output_dir / SAMPLES)
        self.tracker.log_artifact(path, "samples")
        return self.output_dir / SAMPLES

    def _validation_round(self, step: int) -> float | None:
        val = self.validate()
        if val is not None:
            self.state.val_history.append((step, val))
            self.tracker.log_metrics({"val/loss": val}, step)
        self.sample_images(step)
        self.tracker.flush()
        return val

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        return self._skipped_before + self.train_stream.skipped

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        self.state.skipped = self.skipped
        path = save_checkpoint(self.output_dir, lora=self.injection.to_lora_file(self.lora_info),
                               optimizer=self.optimizer, rng=rng or rng_state(self.generator),
                               state=self.state, config=self.cfg.to_dict(), keep=self.cfg.keep_checkpoints)
        self._last_checkpoint_step = self.state.step
        return path

    def _resume(self) -> int:
        path = latest_checkpoint(self.output_dir)
        assert path is not None  # check_output_dir ran
        ckpt = load_checkpoint(path)
        self.injection.load_lora_file(ckpt.lora)
        self.injection.set_trainable(self.cfg.trainable_lora_modules)
        if ckpt.config.get("trainable_lora_modules") not in (None, self.cfg.trainable_lora_modules):
            raise TrainingError("cannot resume with different trainable_lora_modules "
                                f"({ckpt.config.get('trainable_lora_modules')} in the checkpoint)")
        try:
            self.optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as exc:
            raise TrainingError(f"{path}: optimizer state does not fit this run ({exc})") from None
        for group in self.optimizer.param_groups:  # the config may change the learning rate
            group["lr"] = self.cfg.learning_rate
        restore_rng(ckpt.rng, self.generator)
        self.state = ckpt.state
        self._skipped_before = ckpt.state.skipped
        self._last_checkpoint_step = self.state.step
        return self.state.step

    # -- the loop --------------------------------------------------------------------------------
    def _done(self) -> bool:
        cfg = self.cfg
        return ((cfg.max_steps is not None and self.state.step >= cfg.max_steps)
                or (cfg.epochs is not None and self.state.epoch >= cfg.epochs))

    def _batches(self) -> Iterator[Any]:
        """Batches from the saved position onwards, crossing epochs until the limits are hit."""
        while not self._done():
            got = False
            for batch in self.train_stream.batches(self.cfg.batch_size, epoch=self.state.epoch,
                                                   start=self.state.position):
                got = True
                yield batch
                if self._done():
                    return
            if not got and self.state.position == 0:
                raise DataError("no usable samples in the training shards")
            self.state.epoch += 1
            self.state.position = 0

    def fit(self, resume: bool = False) -> TrainResult:
        """Train until ``max_steps``/``epochs``; Ctrl-C saves a checkpoint, then re-raises.

        The MLflow run (if any) always ends: FINISHED, KILLED on Ctrl-C, FAILED otherwise."""
        try:
            result = self._fit(resume)
        except KeyboardInterrupt:
            self.tracker.end("KILLED")
            raise
        except BaseException:
            self.tracker.end("FAILED")
            raise
        self.tracker.end("FINISHED")
        return result

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        resumed_from = None
        check_output_dir(self.output_dir, resume)
        if resume:
            resumed_from = self._resume()
            self.log(f"resuming from step {resumed_from} ({self.output_dir / 'checkpoints'})")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        c = self.counts
        self.log(f"trainable parameters: {c['trainable']:,} of {c['total']:,} "
                 f"(LoRA {c['lora']:,} in {len(self.injection.modules)} modules, "
                 f"{len(self.trained_modules)} trained)")
        self.tracker.log_params({"trainable_params": c["trainable"], "total_params": c["total"],
                                 **{k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict | list)}})
        self.train_stream.warn = self.warn
        if self.val_stream is not None:
            self.val_stream.warn = self.warn

        if self.state.step == 0 and not self.state.val_history:
            self._validation_round(0)
        initial_val = self.state.val_history[0][1] if self.state.val_history else None
        last_val = self.state.val_history[-1][1] if self.state.val_history else None

        with _Progress(self.console, self.show_progress, cfg.max_steps, self.state.step) as bar:
            try:
                # RNG state as of the last completed step: a Ctrl-C checkpoint must not include
                # draws made by a half-done step, or the resumed run would diverge.
                self._step_rng = rng_state(self.generator)
                for batch in self._batches():
                    losses = self.train_step(batch.source, batch.target)
                    self.state.step += 1
                    self.state.position = batch.position
                    self._step_rng = rng_state(self.generator)
                    step = self.state.step
                    self.state.train_history.append((step, losses["loss"]))
                    self.tracker.log_metrics({f"train/{k}": v for k, v in losses.items()}, step)
                    if step % cfg.validation_interval == 0:
                        last_val = self._validation_round(step)
                    if step % cfg.checkpoint_interval == 0:
                        self.save_checkpoint()
                    bar.update(step, losses["loss"], last_val)
            except KeyboardInterrupt:
                self._save_on_interrupt()
                raise
        if self.state.step > 0 and (not self.state.val_history or self.state.val_history[-1][0] != self.state.step):
            last_val = self._validation_round(self.state.step)
        if self._last_checkpoint_step != self.state.step:
            self.save_checkpoint()
        return self._finish(initial_val, last_val, resumed_from)

    def _save_on_interrupt(self) -> None:
        if self.state.step > self._last_checkpoint_step:
            path = self.save_checkpoint(self._step_rng)
            self.log(f"[yellow]interrupted at step {self.state.step}:[/] checkpoint saved to {path}; "
                     "run again with --resume to continue")

    def _finish(self, initial_val: float | None, last_val: float | None, resumed_from: int | None) -> TrainResult:
        from lbm_registry.train.plots import loss_curve

        recent = [v for _, v in self.state.train_history[-10:]]
        train_loss = sum(recent) / len(recent) if recent else None
        lora = self.final_lora_file(train_loss, last_val)
        lora_path = write_lora(lora, self.output_dir / FINAL_LORA, dtype=SAVE_DTYPES[self.cfg.save_dtype])
        plot = loss_curve(self.state.train_history, self.state.val_history, self.output_dir / LOSS_PLOT)
        self.tracker.log_artifact(plot)  # the weights go to the registry (stored once), not to this run
        metrics = {k: v for k, v in (("final/train_loss", train_loss), ("final/val_loss", last_val)) if v is not None}
        self.tracker.log_metrics(metrics, self.state.step)
        samples = self.output_dir / SAMPLES
        c = self.counts
        return TrainResult(
            output_dir=self.output_dir, lora_path=lora_path, steps=self.state.step, epochs=self.state.epoch,
            train_loss=train_loss, val_loss=last_val, initial_val_loss=initial_val,
            trainable_params=c["trainable"], lora_params=c["lora"], total_params=c["total"],
            trained_modules=list(self.trained_modules), samples_path=samples if samples.is_file() else None,
            loss_plot=plot, skipped_samples=self.skipped, run_id=self.tracker.run_id,
            resumed_from=resumed_from,
            history={"train": list(self.state.train_history), "val": list(self.state.val_history)})

    def final_lora_file(self, train_loss: float | None = None, val_loss: float | None = None) -> LoRAFile:
        """The trained LoRA with its ``lbm_registry`` metadata (base sha256 kept, policy ``trained``)."""
        lora = self.injection.to_lora_file()
        linear = [la.rank for la in lora.layers.values() if not la.is_conv]
        conv = [la.rank for la in lora.layers.values() if la.is_conv]
        info = dict(self.lora_info)
        info.update({
            "policy": "trained", "rank": max(linear, default=0), "conv_rank": max(conv, default=0),
            "steps": self.state.step, "trainable_lora_modules": list(self.cfg.trainable_lora_modules),
            "n_trained_modules": len(self.trained_modules),
        })
        if train_loss is not None and math.isfinite(train_loss):
            info["train_loss"] = train_loss
        if val_loss is not None:
            info["val_loss"] = val_loss
        lora.info = info
        return lora
