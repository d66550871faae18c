"""Cached VAE latents (``cache_latents``): encode each training pair once.

The VAE is frozen and encodes the latent *mean* (deterministic), so the latents of a pair never
change during a run: re-encoding them every epoch is wasted work (on the tiny twin, most of a
step). ``memory`` keeps them in RAM for the run; ``disk`` writes one small safetensors file per
pair under ``<run>/latent_cache/``, keyed by the base's VAE, the shard's sha256 and the
resolution, so a resumed or repeated run with the same data reuses them. Files are written to a
temporary name and renamed, so a crash never leaves a half file that would be read back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from lbm_registry.train.data import RawSample


class LatentCache:
    """``(z_source, z_target)`` per sample, in fp32 on the CPU."""

    def __init__(self, mode: str, resolution: int, *, root: Path | None = None, vae_tag: str = "") -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"unknown cache mode {mode!r}")
        self.mode = mode
        self.resolution = resolution
        self.root = root
        self.vae_tag = vae_tag[:32] or "vae"
        self._memory: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._shard_sha: dict[Path, str] = {}
        self.hits = 0
        self.misses = 0

    def shard_sha256(self, shard: Path) -> str:
        sha = self._shard_sha.get(shard)
        if sha is None:
            h = hashlib.sha256()
            with open(shard, "rb") as fh:
                while chunk := fh.read(8 * 1024 * 1024):
                    h.update(chunk)
            sha = self._shard_sha[shard] = h.hexdigest()
        return sha

    def _file(self, sha: str, key: str) -> Path:
        assert self.root is not None
        safe = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.root / self.vae_tag / f"{self.resolution}px" / sha[:16] / f"{safe}.safetensors"

    def get(self, raw: RawSample) -> tuple[torch.Tensor, torch.Tensor] | None:
        sha = self.shard_sha256(raw.shard)
        found = self._memory.get((sha, raw.key))
        if found is None and self.mode == "disk":
            path = self._file(sha, raw.key)
            if path.is_file():
                from safetensors.torch import load_file

                try:
                    data = load_file(str(path))
                    found = (data["source"], data["target"])
                except Exception:  # a damaged cache file is re-encoded, never trusted
                    found = None
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, raw: RawSample, z_source: torch.Tensor, z_target: torch.Tensor) -> None:
        sha = self.shard_sha256(raw.shard)
        pair = (z_source.detach().float().cpu().contiguous(), z_target.detach().float().cpu().contiguous())
        if self.mode == "memory":
            self._memory[(sha, raw.key)] = pair
            return
        from safetensors.torch import save_file

        path = self._file(sha, raw.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file({"source": pair[0], "target": pair[1]}, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
