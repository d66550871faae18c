"""Shared fixtures: tiny LBM twins built in seconds, and temp workspaces.

Area-specific fixtures live in ``tests/fixtures/<area>.py``; every module there is loaded as a
pytest plugin automatically.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Registrations draw their probe picture in process (``wait``), not in background processes that
# would outlive the test that started them; a test of the background mode asks for it (--probe
# auto) and waits for its picture. An explicit LBM_REG_PROBE=0 (faster runs) is respected.
if os.environ.get("LBM_REG_PROBE", "").strip().lower() in ("", "1", "on", "true", "yes", "auto"):
    os.environ["LBM_REG_PROBE"] = "wait"

pytest_plugins = sorted(
    f"fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if not p.stem.startswith("_")
)

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "relight_sample"


@pytest.fixture(scope="session")
def tiny_config():
    from lbm_registry.lbm.config import load_config

    return load_config("configs/lbm-tiny.yaml")


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "lbm-tiny.yaml"


@pytest.fixture(scope="session")
def tiny_base_path(tmp_path_factory, tiny_config) -> Path:
    """A seeded tiny LBM base checkpoint (fp32 safetensors)."""
    from lbm_registry.lbm.loading import save_lbm
    from lbm_registry.lbm.model import build_model

    path = tmp_path_factory.mktemp("tiny") / "base.safetensors"
    return save_lbm(build_model(tiny_config, seed=0), path)


@pytest.fixture(scope="session")
def make_tuned(tmp_path_factory, tiny_base_path):
    """Factory: a tuned checkpoint = base + a known delta of ``rank`` per layer (+ optional noise).

    Deltas use a decaying spectrum (singular values 1, 1/2, 1/4, ...) times ``scale`` so tests
    know the exact truncation error. Returns the path; ``layers`` restricts which modules change.
    """
    import torch

    from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors
    from lbm_registry.lbm.model import DENOISER_PREFIX

    cache: dict[tuple, Path] = {}

    def _make(rank: int = 4, seed: int = 1, scale: float = 0.05, noise: float = 0.0,
              layers: tuple[str, ...] | None = None) -> Path:
        key = (rank, seed, scale, noise, layers)
        if key in cache:
            return cache[key]
        g = torch.Generator().manual_seed(seed)
        reader = CheckpointReader(tiny_base_path)
        out = {}
        for k, w in reader.items():
            w = w.clone()
            name = k[len(DENOISER_PREFIX):-len(".weight")] if k.startswith(DENOISER_PREFIX) else None
            if name and k.endswith(".weight") and w.ndim >= 2 and (layers is None or name in layers):
                m, n = w.shape[0], w[0].numel()
                r = min(rank, m, n)
                u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
                v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
                s = scale * torch.tensor([0.5**i for i in range(r)])
                delta = (u * s) @ v.T
                if noise:
                    delta += noise * torch.randn(m, n, generator=g) / (m * n) ** 0.5
                w += delta.reshape(w.shape)
            out[k] = w
        path = tmp_path_factory.mktemp("tuned") / f"tuned_r{rank}_s{seed}.safetensors"
        save_safetensors(out, path, reader.metadata)
        cache[key] = path
        return path

    return _make


@pytest.fixture
def workspace(tmp_path):
    """Settings for a fresh registry in a temp folder (nothing created until used)."""
    from lbm_registry.settings import WorkspaceSettings

    return WorkspaceSettings.resolve(home=tmp_path / "home")


@pytest.fixture(scope="session")
def shared_sample() -> Path | None:
    """The real one-pair relighting shard from ../shared, when present (never required)."""
    return SHARED_SAMPLE if (SHARED_SAMPLE / "train_single.tar").is_file() else None
