"""Exception types. Every user-facing failure is an :class:`LBMError` with a one-line message.

The CLI prints ``error: <message>`` and exits non-zero for these; anything else is a bug and
keeps its traceback. A message that must name a way out says it per surface: ``str(exc)`` is
worded for Python callers (``force=True``), ``exc.cli_message`` for the command line
(``--force``).
"""

from __future__ import annotations

#: Words longer than this are shortened in every message (a 5000-character reference is
#: echoed as its start, its end and its length): a message stays one readable line.
LONGEST_WORD = 200


def abbreviate(text: str, limit: int = 60) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and end with its length:
    ``'aaaa...aaaa' (5000 characters)`` (what messages show of a user's overlong input)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = max(1, limit * 2 // 3)
    tail = max(1, limit - head - 3)
    return f"{text[:head]}...{text[-tail:]} ({len(text)} characters)"


class LBMError(Exception):
    """Base class for expected, user-facing errors (bad input, unknown reference...)."""

    exit_code = 2

    def __init__(self, *args: object, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli = cli

    def __str__(self) -> str:  # one line, always, and no word longer than LONGEST_WORD
        return " ".join(abbreviate(w, LONGEST_WORD) for w in super().__str__().split())

    @property
    def cli_message(self) -> str:
        """The message as the CLI shows it (its own wording where the fix is a flag)."""
        return " ".join(abbreviate(w, LONGEST_WORD) for w in self.cli.split()) if self.cli else str(self)


class ConfigError(LBMError):
    """A YAML config is missing, malformed, or has unknown/wrong fields."""


class CheckpointError(LBMError):
    """A weight file is missing, truncated, not safetensors, a pickle, or has NaN/Inf."""


class ArchitectureError(LBMError):
    """A checkpoint does not match the expected LBM architecture (keys or shapes)."""


class LoRAError(LBMError):
    """A LoRA file is malformed, targets unknown layers, or was made for another base."""


class RefError(LBMError):
    """An asset reference (name, version, alias, hash) cannot be resolved."""


class RegistryError(LBMError):
    """The catalog, MLflow or the blob store refused an operation."""


class StorageError(LBMError):
    """The machine refused a write: the disk is full, the folder is read-only, no permission.
    The message names the path; exit code 1 (a refusal of the machine, not bad input)."""

    exit_code = 1


class DataError(LBMError):
    """A dataset shard or image cannot be read."""


class TrainingError(LBMError):
    """Training cannot start or continue (nothing to train, non-finite loss, no checkpoint to resume)."""


class RangeError(LBMError):
    """A number is outside its range, not finite, or not a number (scale, steps, seed, merge
    weights, sizes: see :mod:`lbm_registry.ranges`). HTTP 400."""


class ImageTooLargeError(DataError):
    """An image has more pixels than the limit (``lbm-reg serve --max-pixels``)."""


class BaseMismatchError(LoRAError):
    """A LoRA was made for another base than the one in use (a served base: HTTP 409)."""


class OverloadedError(LBMError):
    """The server's queue is full; retry later (HTTP 503)."""
