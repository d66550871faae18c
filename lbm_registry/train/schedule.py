"""Learning-rate schedules (``lr_scheduler``), stepped once per optimizer step and resumable.

Two families, both well-kept implementations rather than our own arithmetic:

- diffusers' ``get_scheduler`` names (``constant``, ``constant_with_warmup``, ``linear``,
  ``cosine``, ``cosine_with_restarts``, ``polynomial``, ``piecewise_constant``), the vocabulary
  of diffusers' and kohya's trainers, with ``lr_warmup_steps`` and the run's planned number of
  steps; ``lr_scheduler_kwargs`` may add ``num_cycles``, ``power`` or ``step_rules``;
- the ``torch.optim.lr_scheduler`` classes upstream LBM's trainer accepts
  (``learning_rate_scheduler: StepLR`` ... with ``learning_rate_scheduler_kwargs``), stepped every
  optimizer step as upstream's Lightning config does (``interval: step``).
  ``ReduceLROnPlateau`` is stepped with each validation loss instead (upstream monitors a
  ``val_loss`` it never logs, so it cannot run there at all).

The schedule's state is part of every training checkpoint, so ``--resume`` continues it exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lbm_registry.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a schedule is built: the config validates without it
    import torch

DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                       "polynomial", "piecewise_constant")
TORCH_SCHEDULES = ("StepLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "ExponentialLR",
                   "ReduceLROnPlateau")
SCHEDULES = DIFFUSERS_SCHEDULES + TORCH_SCHEDULES
NEEDS_TOTAL = ("linear", "cosine", "cosine_with_restarts", "polynomial")


class LRSchedule:
    """One optimizer's learning rate over a run."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int = 0,
                 total_steps: int | None = None, kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(kwargs or {})
        self.name = name
        self.optimizer = optimizer
        self.on_validation = name == "ReduceLROnPlateau"
        import torch

        try:
            if name in TORCH_SCHEDULES:
                if warmup_steps:
                    raise ConfigError(f"lr_warmup_steps applies to the diffusers schedules "
                                      f"({', '.join(DIFFUSERS_SCHEDULES)}), not to {name}: give its own "
                                      "arguments in lr_scheduler_kwargs")
                self.scheduler: Any = getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
            elif name in DIFFUSERS_SCHEDULES:
                from diffusers.optimization import get_scheduler

                if name == "constant" and warmup_steps:
                    name = "constant_with_warmup"
                if name in NEEDS_TOTAL and total_steps is None:
                    raise ConfigError(f"lr_scheduler {name} needs the number of steps: set max_steps or epochs")
                self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                               num_training_steps=total_steps, **kwargs)
            else:
                raise ConfigError(f"unknown lr_scheduler {name!r}: use one of {', '.join(SCHEDULES)}")
        except (TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"lr_scheduler {name} with lr_scheduler_kwargs {kwargs}: {first}") from None

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step_done(self) -> None:
        """After each optimizer step (also one an fp16 gradient scaler skipped: the schedule counts
        steps, as upstream's does; torch's warning about that order is silenced)."""
        if not self.on_validation:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                self.scheduler.step()

    def validated(self, val_loss: float) -> None:
        """After each validation round (``ReduceLROnPlateau`` only)."""
        if self.on_validation:
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

    def fast_forward(self, steps: int) -> None:
        """Catch up ``steps`` optimizer steps (a checkpoint written before schedules were saved)."""
        for _ in range(steps):
            self.step_done()

    def rescale(self, ratio: float) -> None:
        """Scale the whole schedule by ``ratio`` (``learning_rate`` changed between a checkpoint and
        its resume): the current rate, the base rates and the recorded last rates."""
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        for attr in ("base_lrs", "_last_lr"):
            if isinstance(getattr(self.scheduler, attr, None), list):
                setattr(self.scheduler, attr, [v * ratio for v in getattr(self.scheduler, attr)])


def check_schedule(name: str, warmup_steps: int, kwargs: dict[str, Any], total_steps: int | None,
                   has_validation: bool) -> None:
    """Build the schedule on a throw-away optimizer: a bad name, argument or combination is a
    start-up error, before any model weights load (``total_steps`` None: not known yet)."""
    if name == "ReduceLROnPlateau" and not has_validation:
        raise ConfigError("lr_scheduler ReduceLROnPlateau follows the validation loss: give validation_shards")
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    LRSchedule(name, torch.optim.SGD([param], lr=1.0), warmup_steps=warmup_steps, total_steps=total_steps or 1,
               kwargs=kwargs)
