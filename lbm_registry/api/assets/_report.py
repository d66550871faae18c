"""What the reports of commands that write a LoRA (extract, resize, merge) have in common."""

from __future__ import annotations

from typing import Any


class WrittenLoRAReport:
    """Mixin for dataclasses with ``result`` (having ``path`` and ``to_dict(layers=)``), ``ref``,
    ``registered_path`` and ``timings``: where the file ended up, and the JSON shape."""

    result: Any
    ref: str | None
    registered_path: str | None
    timings: dict[str, float]

    @property
    def path(self) -> str:
        """The registered blob when the result was registered, else the file written."""
        return self.registered_path or str(self.result.path)

    def _to_dict(self, layers: bool, **extra: Any) -> dict[str, Any]:
        d = self.result.to_dict(layers=layers)
        d.update(extra, ref=self.ref, path=self.path, timings=self.timings)
        return d
