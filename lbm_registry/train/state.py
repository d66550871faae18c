"""Resumable training checkpoints.

A checkpoint is a folder ``<output_dir>/checkpoints/step-<N>/`` holding:

- ``lora.safetensors``: every LoRA factor in fp32, in the native LoRA format (so a checkpoint is
  itself a usable LoRA);
- ``optimizer.pt``: the optimizer state dict (tensors and plain values only);
- ``rng.pt``: generator states (training noise/timesteps, torch, CUDA);
- ``scheduler.pt``: the learning-rate schedule's state (absent in checkpoints of older versions);
- ``state.json``: step, epoch, data position, loss history, the training config.

Why folders renamed into place: the files must agree. They are written into a hidden
temporary folder that is renamed to its final name only when complete, so a crash or Ctrl-C
mid-save never leaves a checkpoint that ``--resume`` would pick up half-written. Everything is
loaded with ``torch.load(weights_only=True)``: resuming never executes pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import CheckpointError
from lbm_registry.fileio import make_temp_dir
from lbm_registry.lora.format import LoRAFile, read_lora, write_lora

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where training stands. ``position`` is the raw sample position inside ``epoch``."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    skipped: int = 0
    train_history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    lr_history: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        d = dict(data)
        d["train_history"] = [tuple(x) for x in d.get("train_history", [])]
        d["val_history"] = [tuple(x) for x in d.get("val_history", [])]
        d["lr_history"] = [tuple(x) for x in d.get("lr_history", [])]
        return cls(**d)


@dataclass
class Checkpoint:
    path: Path
    lora: LoRAFile
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: TrainState
    config: dict[str, Any]
    scheduler: dict[str, Any] | None = None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, *, lora: LoRAFile, optimizer: torch.optim.Optimizer,
                    rng: dict[str, Any], state: TrainState, config: dict[str, Any], keep: int = 2,
                    scheduler: dict[str, Any] | None = None) -> Path:
    """Write ``step-<N>`` atomically, then prune to the newest ``keep`` checkpoints."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = make_temp_dir(root, prefix=f".{final.name}.")  # the umask's mode, not mkdtemp's 0700
    try:
        write_lora(lora, tmp / "lora.safetensors", dtype=torch.float32)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        if scheduler is not None:
            torch.save(scheduler, tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"state": state.to_dict(), "config": config}, indent=1))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        lora = read_lora(path / "lora.safetensors")
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        scheduler = (torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
                     if (path / "scheduler.pt").is_file() else None)
    except (OSError, json.JSONDecodeError, RuntimeError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable training checkpoint ({first})") from None
    return Checkpoint(path, lora, optimizer, rng, TrainState.from_dict(meta["state"]), meta.get("config", {}),
                      scheduler)
