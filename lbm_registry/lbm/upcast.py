"""Compute in float32 from weights kept in their 16-bit storage dtype, one module at a time.

Why: running a bf16 checkpoint in fp32 on a CPU (what ``extract --calibrate`` does there) used
to convert every weight up front: the full-size denoiser then holds 9.7 GB of fp32 copies of
4.85 GB of bf16 file pages, a 16-17 GB peak on a 23 GB machine that spent 40-60 s of system time
in page faults and reclaim and pushed the input files out of the page cache, so the extraction
after it read them again from disk. Widening bf16/fp16 to fp32 is exact, so converting each
module's own weights just before its forward and dropping the copy right after computes the same
numbers bit for bit, while the model stays in its (memory-mapped) storage dtype.

A module whose weights its parent reads without calling it would see the storage dtype and fail
loudly on the dtype mismatch, never silently; diffusers' UNet and VAE call every weight's module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _own_params(module: nn.Module, dtype: torch.dtype) -> list[str]:
    return [n for n, p in module._parameters.items()
            if p is not None and p.is_floating_point() and p.dtype != dtype]


@contextmanager
def compute_in(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Within the block, each module of ``model`` with weights in another floating dtype runs its
    forward with ``dtype`` copies of them (made by a pre-hook, dropped by a post-hook); floating
    buffers are converted once. The model's own parameters are never changed."""
    handles = []
    saved: dict[int, tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    # Copies go into reused buffers, one free list per (size, device): a fresh allocation per
    # module per call would page-fault ~10 GB of new memory per forward pass of the full model
    # (measured: 6.4 M faults, 40 s of system time for 3 passes); the pool holds one buffer of
    # each distinct weight size.
    pool: dict[tuple[int, torch.device], list[torch.Tensor]] = {}

    def before(module: nn.Module, args: object) -> None:
        copies = {}
        for n in _own_params(module, dtype):
            p = module._parameters[n]
            free = pool.get((p.numel(), p.device))
            buf = free.pop() if free else torch.empty(p.numel(), dtype=dtype, device=p.device)
            buf.copy_(p.reshape(-1))
            copies[n] = (p, buf)
            module._parameters[n] = buf.view(p.shape)   # a plain tensor: no autograd here
        saved[id(module)] = (module, copies)

    def after(module: nn.Module, args: object, output: object) -> None:
        for n, (p, buf) in saved.pop(id(module), (module, {}))[1].items():
            module._parameters[n] = p
            pool.setdefault((p.numel(), p.device), []).append(buf)

    buffers = []
    for module in model.modules():
        for n, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                buffers.append((module, n, b))
                module._buffers[n] = b.to(dtype)
        if _own_params(module, dtype):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for module, n, b in buffers:
            module._buffers[n] = b
        for module, copies in saved.values():   # a forward that raised: put the originals back
            for n, (p, _) in copies.items():
                module._parameters[n] = p
        saved.clear()
        pool.clear()
