"""The LoRA fine-tuning loop: bridge-matching steps, validation, checkpoints, progress.

:class:`LoRATrainer` takes an already loaded base model and a LoRA file (resolving references
and registering results is the API layer's job) and owns everything that happens during a
run. Reproducibility is a design goal: with the same seed, a run that is interrupted (Ctrl-C or
a crash after a checkpoint) and resumed ends with exactly the same weights as an uninterrupted
one, because the data order, timesteps and noise all come from explicitly seeded,
checkpointed sources.

One optimizer step consumes a *global batch* of ``num_processes x batch_size x
gradient_accumulation_steps`` consecutive positions of the epoch's sample order. Position ``j``
of the step goes to micro-step ``j // (W B)`` of process ``(j mod W B) // B``, and its timestep
and noise are drawn from a seed of (seed, epoch, position) alone; each process's loss is its
samples' sum divided by the global sample count, and the gradients are summed over processes.
So 1 x 4, 2 x 2 and 1 x 2 with accumulation 2 compute the same update (up to float rounding).
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
from lbm_registry.train.cache import LatentCache, Posterior
from lbm_registry.train.config import TrainConfig
from lbm_registry.train.data import PairStream, RawSample
from lbm_registry.train.distributed import DistContext
from lbm_registry.train.inject import LoRAInjection, inject_lora
from lbm_registry.train.objective import BridgeObjective, latent_from, sample_seed
from lbm_registry.train.schedule import LRSchedule
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


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """bf16 autocast on GPU (``auto``) or when asked (``bf16``/``fp16``); plain fp32 otherwise."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def uses_autocast(device: torch.device, mixed_precision: str) -> bool:
    return autocast_dtype(device, mixed_precision) is not None


def autocast_context(device: torch.device, mixed_precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = autocast_dtype(device, mixed_precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def check_optimizer_available(optimizer: str, device: torch.device) -> None:
    """8-bit AdamW needs bitsandbytes and a CUDA GPU: say so at start-up, not mid-run."""
    if optimizer != "adamw8bit":
        return
    if device.type != "cuda":
        raise TrainingError(f"optimizer adamw8bit needs a CUDA GPU (this run is on {device}); use adamw")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or its own errors when no usable CUDA is found
        raise TrainingError(f"optimizer adamw8bit needs bitsandbytes ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'not installed'}); "
                            "pip install bitsandbytes, or use adamw") from None


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def check_output_folder(output_dir: str | Path) -> None:
    """A ConfigError unless ``output_dir`` is a folder or can be made one (no file or device in the
    way, not inside a registry's own files)."""
    from lbm_registry.errors import ConfigError
    from lbm_registry.fileio import output_folder_problem

    problem = output_folder_problem(output_dir, "output_dir")
    if problem is not None:
        raise ConfigError(problem, cli=output_folder_problem(output_dir, "--output-dir"))


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """Refuse a folder that cannot be one, to mix two runs in one folder, and to resume from
    nothing (cheap: call it early)."""
    check_output_folder(output_dir)
    if resume and latest_checkpoint(output_dir) is None:
        raise TrainingError(f"nothing to resume: no checkpoint in {Path(output_dir) / 'checkpoints'}")
    if not resume and list_checkpoints(output_dir):
        msg = f"{output_dir} already holds checkpoints"
        raise TrainingError(f"{msg}: pass resume=True to continue, or choose another output_dir",
                            cli=f"{msg}: pass --resume to continue, or choose another --output-dir")


class _Progress:
    """A Rich progress bar with loss and it/s, or nothing."""

    def __init__(self, console: Console | None, enabled: bool, total: int | None, completed: int) -> None:
        self._bar = None
        if not (enabled and console is not None):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TextColumn("{task.fields[rate]} it/s"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"), TimeRemainingColumn(),
            console=console, transient=False)
        self._task = self._bar.add_task("train", total=total, completed=completed, loss="-", val="", rate="-",
                                        epoch="0")
        self._t0, self._n0 = time.perf_counter(), completed

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, loss: float | None, val: float | None = None, epoch: int | None = None) -> None:
        if self._bar is None:
            return
        dt = time.perf_counter() - self._t0
        rate = (step - self._n0) / dt if dt > 0 else 0.0
        fields: dict[str, Any] = {"rate": f"{rate:.2f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if epoch is not None:
            fields["epoch"] = str(epoch)
        if val is not None:
            fields["val"] = f"val {val:.4f}"
        self._bar.update(self._task, completed=step, **fields)


@dataclass
class _Micro:
    """One process's share of one micro-step: latents, draws, and (for a pixel loss) targets and
    the latent offsets of each sample's pixel-loss window."""

    z_src: torch.Tensor
    z_tgt: torch.Tensor
    sigma: torch.Tensor
    eps: torch.Tensor
    target: torch.Tensor | None
    crops: list[tuple[int, int]] | None = None

    @property
    def n(self) -> int:
        return int(self.z_src.shape[0])


class LoRATrainer:
    """Fine-tune the LoRA modules matching ``cfg.trainable_lora_modules``; everything else is frozen."""

    def __init__(self, cfg: TrainConfig, *, model: LBMModel, lora: LoRAFile, objective: BridgeObjective,
                 train_stream: PairStream, val_stream: PairStream | None, device: torch.device,
                 lora_info: dict[str, Any] | None = None, tracker: NullTracker | None = None,
                 console: Console | None = None, progress: bool = True, err_console: Console | None = None,
                 dist: DistContext | None = None, latent_cache: LatentCache | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.objective = objective
        self.train_stream = train_stream
        self.val_stream = val_stream
        self.device = device
        self.dist = dist or DistContext(device=device)
        self.lora_info = dict(lora_info or {})
        self.tracker = tracker or NullTracker()
        self.tracker.warn = self.warn
        self.console = console
        self.err_console = err_console or console
        self.show_progress = progress
        if cfg.output_dir is None:
            raise TrainingError("output_dir is not set (the API picks one in the workspace)")
        self.output_dir = Path(cfg.output_dir)
        self.autocast = autocast_context(device, cfg.mixed_precision)
        self.latent_cache = latent_cache

        model.requires_grad_(False)
        model.vae.eval()
        self.injection: LoRAInjection = inject_lora(model.denoiser, lora)
        self.trained_modules = self.injection.set_trainable(cfg.trainable_lora_modules)
        self.params = list(self.injection.trainable_parameters())
        if not self.params:
            raise TrainingError("no trainable LoRA parameters: trainable_lora_modules matched nothing")
        if cfg.gradient_checkpointing:
            model.denoiser.enable_gradient_checkpointing()  # the UNet's own (diffusers, non-reentrant)
        check_optimizer_available(cfg.optimizer, device)
        self.optimizer = build_optimizer(cfg, self.params)
        self.schedule: LRSchedule | None = None  # built by fit(): it needs the run's length
        self.scaler = torch.amp.GradScaler(device.type) if autocast_dtype(device, cfg.mixed_precision) == \
            torch.float16 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        train_stream.group_size = self.global_batch  # aspect buckets: one bucket per optimizer step
        self.state = TrainState()
        self._step_rng: dict[str, Any] | None = None
        self._sample_pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._last_checkpoint_step = -1
        self._skipped_before = 0

    # -- reporting ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.console is not None and self.dist.is_main:
            self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        """Warnings go to stderr (``err_console``), whatever stdout is used for."""
        if self.err_console is not None:
            from rich.markup import escape

            prefix = f"[rank {self.dist.rank}] " if self.dist.distributed else ""
            self.err_console.print(f"[yellow]warning:[/] {prefix}{escape(message)}", soft_wrap=True)

    @property
    def global_batch(self) -> int:
        return self.dist.world_size * self.cfg.batch_size * self.cfg.gradient_accumulation_steps

    @property
    def counts(self) -> dict[str, int]:
        return {"trainable": sum(p.numel() for p in self.params),
                "lora": self.injection.num_parameters(),
                "total": sum(p.numel() for p in self.model.parameters())}

    # -- data for one step -------------------------------------------------------------------
    def my_positions(self, start: int, size: int) -> list[list[int]]:
        """This process's epoch positions for each micro-step of the step covering
        ``[start, start + size)`` (see the module docstring)."""
        W, B, A = self.dist.world_size, self.cfg.batch_size, self.cfg.gradient_accumulation_steps
        micro: list[list[int]] = [[] for _ in range(A)]
        for j in range(size):
            if (j % (W * B)) // B == self.dist.rank:
                micro[j // (W * B)].append(start + j)
        return micro

    @torch.no_grad()
    def _posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior ``(mean, std)`` of ``images``, fp32 on the CPU: the same numbers
        whether they are used now or come back from the latent cache."""
        with self.autocast():
            mean, std = self.objective.posterior(self.model, images.to(self.device))
        return mean.float().cpu(), std.float().cpu()

    def prepare_micro(self, epoch: int, positions: list[int]) -> _Micro | None:
        """Decode (or fetch the cached posteriors of) the samples at ``positions`` and draw their
        timesteps, noise, posterior samples and pixel-loss windows, each from the sample's own
        seed. None when none of them is usable."""
        order = self.train_stream.order(epoch)
        cache = self.latent_cache
        posteriors: dict[int, Posterior] = {}
        images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for q in positions:
            raw: RawSample = order[q]
            hit = cache.get(raw) if cache is not None else None
            if hit is not None:
                posteriors[q] = hit
                continue
            decoded = self.train_stream.decode(raw)
            if decoded is not None:
                images[q] = decoded
        if images:
            keys = sorted(images)
            m_src, s_src = self._posterior(torch.stack([images[q][0] for q in keys]))
            m_tgt, s_tgt = self._posterior(torch.stack([images[q][1] for q in keys]))
            for i, q in enumerate(keys):
                posteriors[q] = (m_src[i], s_src[i], m_tgt[i], s_tgt[i])
                if cache is not None:
                    cache.put(order[q], posteriors[q])
        good = [q for q in positions if q in posteriors]
        if not good:
            return None
        shape = tuple(posteriors[good[0]][0].shape)
        draws = [self.objective.draw(sample_seed(self.cfg.seed, epoch, q), shape) for q in good]
        z_src, z_tgt = [], []
        for q, d in zip(good, draws, strict=True):
            m_s, s_s, m_t, s_t = posteriors[q]
            noise = d.posterior or (None, None)
            z_src.append(latent_from(m_s, s_s, noise[0]))
            z_tgt.append(latent_from(m_t, s_t, noise[1]))
        sigma = torch.stack([d.sigma for d in draws])
        eps = torch.stack([d.eps for d in draws])
        target = crops = None
        if self.objective.pixel_loss is not None:
            target = torch.stack([images[q][1] for q in good]).to(self.device)
            if draws[0].crops is not None:
                crops = [d.crops[0] for d in draws if d.crops is not None]
        return _Micro(torch.stack(z_src).to(self.device), torch.stack(z_tgt).to(self.device), sigma, eps, target,
                      crops)

    # -- one step --------------------------------------------------------------------------------
    def optimizer_step(self, micros: list[_Micro | None]) -> dict[str, float] | None:
        """One optimizer step over this process's micro-batches (None: no usable sample anywhere).

        Each micro-loss is weighted by its share of the global sample count, so accumulation,
        process count and batch size all give the same gradient; gradients and loss sums are then
        summed over processes in one collective."""
        self.model.denoiser.train()
        count = torch.tensor([float(sum(m.n for m in micros if m is not None))], dtype=torch.float64)
        n_global = float(self.dist.all_reduce_sum_(count.to(self._reduce_device))[0])
        if n_global == 0:
            return None
        sums: dict[str, float] = {}
        for m in micros:
            if m is None:
                continue
            with self.autocast():
                out = self.objective.loss_from_latents(self.model, m.z_src, m.z_tgt, m.sigma, m.eps, m.target,
                                                       m.crops)
            loss = out["loss"].float() * (m.n / n_global)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float().item()) * m.n
        names = sorted({"loss", "latent_loss", *(["pixel_loss"] if self.objective.pixel_loss is not None else [])})
        self._all_reduce_grads([sums.get(k, 0.0) for k in names])
        losses = {k: v / n_global for k, v in zip(names, self._reduced_sums, strict=True)}
        if not math.isfinite(losses["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite loss ({losses['loss']}) at step {self.state.step + 1}; "
                                "lower learning_rate or check the data")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if (self.dist.distributed and self.device.type == "cuda") else torch.device("cpu")

    def _all_reduce_grads(self, loss_sums: list[float]) -> None:
        """Sum the LoRA gradients (and the loss sums riding along) over processes."""
        self._reduced_sums = loss_sums
        if not self.dist.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor(loss_sums, dtype=torch.float32, device=grads[0].device)])
        flat = flat.to(self._reduce_device)
        self.dist.all_reduce_sum_(flat)
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(device=p.device, dtype=p.dtype)
            offset += n
        self._reduced_sums = [float(x) for x in flat[offset:].tolist()]

    def train_step(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch of images (every draw from the trainer's generator)."""
        m_src, s_src = self._posterior(source)
        m_tgt, s_tgt = self._posterior(target)
        d = self.objective.draw_batch(m_src.shape[0], tuple(m_src.shape[1:]), self.generator)
        noise = d.posterior or (None, None)
        z_src = latent_from(m_src, s_src, noise[0]).to(self.device)
        z_tgt = latent_from(m_tgt, s_tgt, noise[1]).to(self.device)
        tgt = target.to(self.device) if self.objective.pixel_loss is not None else None
        out = self.optimizer_step([_Micro(z_src, z_tgt, d.sigma, d.eps, tgt, d.crops)])
        assert out is not None
        return out

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
                                    resolution=self.train_stream.resolution, buckets=self.train_stream.buckets,
                                    on_bad_sample="skip", shuffle=False)
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
        lbm = self.model.config
        preds: dict[int, torch.Tensor] = {}
        for shape in dict.fromkeys(s.shape for s, _ in pairs):  # one batch per size (aspect buckets)
            idx = [i for i, (s, _) in enumerate(pairs) if s.shape == shape]
            src = torch.stack([pairs[i][0] for i in idx]).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            with self.autocast():
                z = sample(self.model.velocity, self.model.vae.encode(src), steps=lbm.inference.steps,
                           bridge_noise_sigma=self.objective.bridge_noise_sigma, generator=gen)
                preds.update(zip(idx, self.model.vae.decode(z).float(), strict=True))
        rows = [(to_pil(s), to_pil(preds[i]), to_pil(t)) for i, (s, t) in enumerate(pairs)]
        grid = sample_grid(rows, title=f"step {step}")
        path = save_image(grid, self.output_dir / "samples" / f"step-{step:08d}.png")
        save_image(grid, self.output_dir / SAMPLES)
        self.tracker.log_artifact(path, "samples")
        return self.output_dir / SAMPLES

    def _validation_round(self, step: int) -> float | None:
        """Rank 0 validates and draws samples while the others wait; all learn the value."""
        val = None
        if self.dist.is_main:
            val = self.validate()
            if val is not None:
                self.tracker.log_metrics({"val/loss": val}, step)
            self.sample_images(step)
            self.tracker.flush()
        val = self.dist.broadcast(val)
        if val is not None:
            self.state.val_history.append((step, val))
            if step > 0 and self.schedule is not None:
                self.schedule.validated(val)
        return val

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this process (see :meth:`total_skipped`)."""
        return self._skipped_before + self.train_stream.skipped

    def total_skipped(self) -> int:
        """Skipped by all processes (a collective: every process must call it)."""
        mine = torch.tensor([float(self.train_stream.skipped)], dtype=torch.float64).to(self._reduce_device)
        return self._skipped_before + int(self.dist.all_reduce_sum_(mine)[0])

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path | None:
        """Rank 0 writes the checkpoint (every process holds the same LoRA and optimizer state)."""
        self.state.skipped = self.total_skipped()
        path = self._write_checkpoint(rng) if self.dist.is_main else None
        self._last_checkpoint_step = self.state.step
        self.dist.barrier()
        return path

    def _write_checkpoint(self, rng: dict[str, Any] | None) -> Path:
        """This process's LoRA, optimizer, RNG (and grad scaler) state as the next checkpoint."""
        rng = dict(rng or rng_state(self.generator))
        if self.scaler is not None:
            rng["grad_scaler"] = self.scaler.state_dict()
        return save_checkpoint(self.output_dir, lora=self.injection.to_lora_file(self.lora_info),
                               optimizer=self.optimizer, rng=rng, state=self.state,
                               config=self.cfg.to_dict(), keep=self.cfg.keep_checkpoints,
                               scheduler=self.schedule.state_dict() if self.schedule is not None else None)

    def _resume(self) -> int:
        """Rank 0 reads the newest checkpoint and hands it to every process (no shared disk needed)."""
        ckpt = None
        if self.dist.is_main:
            path = latest_checkpoint(self.output_dir)
            assert path is not None  # check_output_dir ran
            ckpt = load_checkpoint(path)
        ckpt = self.dist.broadcast(ckpt)
        path = ckpt.path
        self.injection.load_lora_file(ckpt.lora)
        self.injection.set_trainable(self.cfg.trainable_lora_modules)
        if ckpt.config.get("trainable_lora_modules") not in (None, self.cfg.trainable_lora_modules):
            raise TrainingError("cannot resume with different trainable_lora_modules "
                                f"({ckpt.config.get('trainable_lora_modules')} in the checkpoint)")
        try:
            self.optimizer.load_state_dict(ckpt.optimizer)
        except (ValueError, KeyError) as exc:
            raise TrainingError(f"{path}: optimizer state does not fit this run ({exc})") from None
        self._resume_schedule(ckpt.scheduler, ckpt.state.step, ckpt.config.get("learning_rate"))
        if self.scaler is not None and "grad_scaler" in ckpt.rng:
            self.scaler.load_state_dict(ckpt.rng["grad_scaler"])
        restore_rng({k: v for k, v in ckpt.rng.items() if k != "grad_scaler"}, self.generator)
        self.state = ckpt.state
        self._skipped_before = ckpt.state.skipped
        self._last_checkpoint_step = self.state.step
        return self.state.step

    def _resume_schedule(self, state: dict[str, Any] | None, step: int, saved_lr: float | None) -> None:
        """Continue the learning-rate schedule where the checkpoint left it. A ``learning_rate``
        changed since the checkpoint scales the whole schedule; a checkpoint without a schedule
        (older versions trained at a constant rate) starts this one at its step."""
        assert self.schedule is not None
        if state is None:
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] = self.cfg.learning_rate
            self.schedule.fast_forward(step)
            return
        try:
            self.schedule.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"the checkpoint's learning-rate schedule does not fit lr_scheduler "
                                f"{self.cfg.lr_scheduler} ({exc})") from None
        if saved_lr and saved_lr != self.cfg.learning_rate:
            self.schedule.rescale(self.cfg.learning_rate / saved_lr)

    def planned_steps(self) -> int:
        """How many optimizer steps this run will make (``max_steps``, or ``epochs`` passes over the
        data, whichever comes first): what a decaying schedule decays over."""
        cfg = self.cfg
        steps = [cfg.max_steps] if cfg.max_steps is not None else []
        if cfg.epochs is not None:
            steps.append(cfg.epochs * self.train_stream.steps_per_epoch(0, self.global_batch))
        return max(1, min(steps))

    # -- the loop --------------------------------------------------------------------------------
    def _done(self) -> bool:
        cfg = self.cfg
        return ((cfg.max_steps is not None and self.state.step >= cfg.max_steps)
                or (cfg.epochs is not None and self.state.epoch >= cfg.epochs))

    def _steps(self) -> Iterator[list[_Micro | None]]:
        """This process's micro-batches for each global step, from the saved position on.

        The epoch counter moves as soon as a step uses the last position of an epoch, so four
        passes over one sample report four epochs; a global step never spans two epochs."""
        while not self._done():
            epoch, start = self.state.epoch, self.state.position
            size = len(self.train_stream.order(epoch))
            if size == 0:
                raise DataError("no usable samples in the training shards")
            if start >= size:  # a checkpoint taken at the very end of an epoch
                self.state.epoch, self.state.position = epoch + 1, 0
                continue
            g = self.train_stream.step_size(epoch, start, self.global_batch)
            micros = [self.prepare_micro(epoch, pos) if pos else None for pos in self.my_positions(start, g)]
            self._next_position = (epoch, start + g, size)
            yield micros

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
        if self.dist.is_main:
            check_output_dir(self.output_dir, resume)
        self.train_stream.warn = self.warn
        self.train_stream.quiet_index = not self.dist.is_main
        if self.val_stream is not None:
            self.val_stream.warn = self.warn
        self.schedule = LRSchedule(cfg.lr_scheduler, self.optimizer, warmup_steps=cfg.lr_warmup_steps,
                                   total_steps=self.planned_steps(), kwargs=cfg.lr_scheduler_kwargs)
        if resume:
            resumed_from = self._resume()
            self.log(f"resuming from step {resumed_from} ({self.output_dir / 'checkpoints'})")
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        c = self.counts
        layout = (f"; {self.dist.world_size} processes x batch {cfg.batch_size} x accumulation "
                  f"{cfg.gradient_accumulation_steps} = {self.global_batch} samples per step"
                  if self.global_batch != cfg.batch_size else "")
        self.log(f"trainable parameters: {c['trainable']:,} of {c['total']:,} "
                 f"(LoRA {c['lora']:,} in {len(self.injection.modules)} modules, "
                 f"{len(self.trained_modules)} trained){layout}")
        self.tracker.log_params({"trainable_params": c["trainable"], "total_params": c["total"],
                                 "num_processes": self.dist.world_size, "global_batch": self.global_batch,
                                 **{k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict | list)}})

        if self.state.step == 0 and not self.state.val_history:
            self._validation_round(0)
        initial_val = self.state.val_history[0][1] if self.state.val_history else None
        last_val = self.state.val_history[-1][1] if self.state.val_history else None

        with _Progress(self.console if self.dist.is_main else None, self.show_progress, cfg.max_steps,
                       self.state.step) as bar:
            try:
                # RNG state as of the last completed step: a Ctrl-C checkpoint must not include
                # draws made by a half-done step, or the resumed run would diverge.
                self._step_rng = rng_state(self.generator)
                last_loss = None
                useful = self.state.position > 0  # resumed mid-epoch: that epoch had steps
                for micros in self._steps():
                    lr = self.schedule.lr
                    losses = self.optimizer_step(micros)
                    epoch, position, size = self._next_position
                    self.state.position = position
                    useful = useful or losses is not None
                    if position >= size:
                        if not useful:
                            raise DataError("no usable samples in the training shards")
                        self.state.epoch, self.state.position, useful = epoch + 1, 0, False
                    if losses is None:  # every sample of this step was bad (skip mode)
                        continue
                    self.state.step += 1
                    self.schedule.step_done()
                    self._step_rng = rng_state(self.generator)
                    step = self.state.step
                    last_loss = losses["loss"]
                    self.state.train_history.append((step, last_loss))
                    self.state.lr_history.append((step, lr))
                    self.tracker.log_metrics({**{f"train/{k}": v for k, v in losses.items()}, "train/lr": lr}, step)
                    if step % cfg.validation_interval == 0:
                        last_val = self._validation_round(step)
                    if step % cfg.checkpoint_interval == 0:
                        self.save_checkpoint()
                    bar.update(step, last_loss, last_val, self.state.epoch)
                if self.state.step > 0 and (not self.state.val_history
                                            or self.state.val_history[-1][0] != self.state.step):
                    last_val = self._validation_round(self.state.step)
                    bar.update(self.state.step, last_loss, last_val, self.state.epoch)
            except KeyboardInterrupt:
                self._save_on_interrupt()
                raise
        if self._last_checkpoint_step != self.state.step:
            self.save_checkpoint()
        return self._finish(initial_val, last_val, resumed_from)

    def _save_on_interrupt(self) -> None:
        if self.state.step > self._last_checkpoint_step and self.dist.is_main:
            self.state.skipped = self.skipped
            path = self._write_checkpoint(self._step_rng)   # no barrier: the others are being interrupted too
            self._last_checkpoint_step = self.state.step
            self.log(f"[yellow]interrupted at step {self.state.step}:[/] checkpoint saved to {path}; "
                     "run again with --resume to continue")

    def _finish(self, initial_val: float | None, last_val: float | None, resumed_from: int | None) -> TrainResult:
        from lbm_registry.train.plots import loss_curve

        recent = [v for _, v in self.state.train_history[-10:]]
        train_loss = sum(recent) / len(recent) if recent else None
        lora_path = self.output_dir / FINAL_LORA
        plot: Path | None = self.output_dir / LOSS_PLOT
        if self.dist.is_main:  # the other processes hold the same LoRA: rank 0 writes it
            lora = self.final_lora_file(train_loss, last_val)
            lora_path = write_lora(lora, lora_path, dtype=SAVE_DTYPES[self.cfg.save_dtype or "fp32"])
            plot = loss_curve(self.state.train_history, self.state.val_history, self.output_dir / LOSS_PLOT)
            self.tracker.log_artifact(plot)  # the weights go to the registry (stored once), not to this run
            metrics = {k: v for k, v in (("final/train_loss", train_loss), ("final/val_loss", last_val))
                       if v is not None}
            self.tracker.log_metrics(metrics, self.state.step)
        self.dist.barrier()
        samples = self.output_dir / SAMPLES
        c = self.counts
        return TrainResult(
            output_dir=self.output_dir, lora_path=lora_path, steps=self.state.step, epochs=self.state.epoch,
            train_loss=train_loss, val_loss=last_val, initial_val_loss=initial_val,
            trainable_params=c["trainable"], lora_params=c["lora"], total_params=c["total"],
            trained_modules=list(self.trained_modules), samples_path=samples if samples.is_file() else None,
            loss_plot=plot, skipped_samples=self.total_skipped(), run_id=self.tracker.run_id,
            resumed_from=resumed_from,
            history={"train": list(self.state.train_history), "val": list(self.state.val_history),
                     "lr": list(self.state.lr_history)})

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
