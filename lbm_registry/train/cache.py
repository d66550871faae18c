"""Cached VAE latents (``cache_latents``): encode each training pair once.

The VAE is frozen, so the posterior of a pair (its mean and standard deviation) never changes
during a run: re-encoding it every epoch is wasted work (on the tiny twin, most of a step). The
cache keeps the posterior, not a latent: with ``latent_sample: sample`` (upstream's behaviour)
each step draws a fresh posterior sample ``mean + std * noise`` from the training sample's own
seed, exactly as it would after encoding, so a cached run gives the same LoRA as an uncached
one, in every process layout and across ``--resume``. With ``latent_sample: mean`` only the mean
is kept. ``memory`` keeps them in RAM for the run; ``disk`` writes one small safetensors file
per pair under ``<run>/latent_cache/``, keyed by the base's VAE, the shard's sha256 and the image
size, so a resumed or repeated run with the same data reuses them. Files are written to a
temporary name and renamed, so a crash never leaves a half file that would be read back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from lbm_registry.train.data import RawSample

Posterior = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]
"""``(source mean, source std, target mean, target std)``, scaled latents; std None = not kept."""


class LatentCache:
    """The posterior of each sample's source and target, in fp32 on the CPU.

    ``size_tag`` names the image size(s) the latents were made at (``64px``, ``480x640``, or a
    bucket list's tag); ``with_std`` keeps the standard deviations too (posterior sampling)."""

    def __init__(self, mode: str, size_tag: str | int, *, root: Path | None = None, vae_tag: str = "",
                 with_std: bool = True) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"unknown cache mode {mode!r}")
        self.mode = mode
        self.size_tag = f"{size_tag}px" if isinstance(size_tag, int) else size_tag
        self.root = root
        self.vae_tag = vae_tag[:32] or "vae"
        self.with_std = with_std
        self._memory: dict[tuple[str, str], Posterior] = {}
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
        return self.root / self.vae_tag / self.size_tag / sha[:16] / f"{safe}.safetensors"

    def get(self, raw: RawSample) -> Posterior | None:
        """The cached posterior, or None (a miss: never cached, damaged, or cached without the
        standard deviations this run needs)."""
        sha = self.shard_sha256(raw.shard)
        found = self._memory.get((sha, raw.key))
        if found is None and self.mode == "disk":
            path = self._file(sha, raw.key)
            if path.is_file():
                from safetensors.torch import load_file

                try:
                    data = load_file(str(path))
                    found = (data["source"], data.get("source_std"), data["target"], data.get("target_std"))
                except Exception:  # a damaged cache file is re-encoded, never trusted
                    found = None
        if found is not None and self.with_std and (found[1] is None or found[3] is None):
            found = None  # written by a run that took the mean: no std to sample with
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, raw: RawSample, posterior: Posterior) -> None:
        sha = self.shard_sha256(raw.shard)
        m_src, s_src, m_tgt, s_tgt = (None if t is None else t.detach().float().cpu().contiguous()
                                      for t in posterior)
        if not self.with_std:
            s_src = s_tgt = None
        assert m_src is not None and m_tgt is not None
        entry: Posterior = (m_src, s_src, m_tgt, s_tgt)
        if self.mode == "memory":
            self._memory[(sha, raw.key)] = entry
            return
        from safetensors.torch import save_file

        names = ("source", "source_std", "target", "target_std")
        tensors = {n: t for n, t in zip(names, entry, strict=True) if t is not None}
        path = self._file(sha, raw.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
