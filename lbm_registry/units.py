"""Human-readable sizes, shared by the CLI and the LoRA code (torch-free: the CLI's fast paths
import it)."""

from __future__ import annotations


def format_size(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as disk and download sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
