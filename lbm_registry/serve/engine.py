"""The serving engine: one warm base, a LoRA cache, a batcher, mixed-LoRA forward passes.

It knows no registry: LoRA references are turned into :class:`LoRASource` by a resolver
callable (``lbm_registry.api.serve`` passes one that resolves through the registry and checks the
base; the blob's sha256 is verified as the loader reads it). Everything a request needs that can
fail on bad input (decoding the image, the pixel limit, resolving references, loading a LoRA) is
done before :meth:`Engine.submit` returns, so errors reach the caller at once and the batch
worker only ever runs validated requests. A new LoRA loads on the loader thread
(:mod:`lbm_registry.serve.loader`) while the requesting thread waits: warm requests and the batch
worker carry on meanwhile.

The pixels are those of ``lbm-reg infer``: the same :func:`prepare_image` / :func:`translate` /
:func:`finish_image` code, with each sample's own seeded generator. What differs is how LoRAs
are applied: infer merges ``W + s * delta`` into the weights; here ``W x + s * up(down(x))`` is
computed per sample (see :mod:`lbm_registry.serve.multilora`); in fp32 the two agree to ~1e-6.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lbm_registry.errors import LoRAError, RangeError, RefError, abbreviate
from lbm_registry.ranges import check_scale, check_seed, check_steps
from lbm_registry.serve.batcher import Batcher
from lbm_registry.serve.cache import LoRACache
from lbm_registry.serve.loader import LoRALoader, LoRASource
from lbm_registry.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, Metrics
from lbm_registry.serve.multilora import LoRAFactors, MultiLoRA, plan_batch

if TYPE_CHECKING:
    from PIL import Image

    from lbm_registry.lbm.model import LBMModel
    from lbm_registry.lora.format import LoRAFile

log = logging.getLogger(__name__)


__all__ = ["Engine", "ImageResult", "LoRASource", "Resolver", "ServeOptions", "check_scale"]

Resolver = Callable[[str], LoRASource]
"""Reference -> LoRASource. Raises RefError (unknown), BaseMismatchError (another base), LBMError."""


@dataclass
class ServeOptions:
    max_loras: int = 8
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_pixels: int = 4096 * 4096
    max_steps: int = 50
    max_stack: int = 4     # LoRAs one request may apply (``lora`` plus ``loras``)
    sample_latent: bool = True    # upstream's posterior sample (False: the posterior's mean)
    tiled_decode: bool = True     # upstream's tiled VAE decode over 128 latents (False: whole)
    loader_threads: int = 1       # 0: load a new LoRA in the requesting thread (the old way)
    mixed_lora: str = "auto"      # auto | loop | batched (serve.multilora)


@dataclass
class ImageResult:
    image: Image.Image
    loras: list[dict[str, Any]]       # [{"ref", "sha256", "scale"}] as applied (effective scales)
    width: int
    height: int
    ms: float
    batch_size: int


@dataclass
class _Item:
    x: torch.Tensor                   # (1, 3, h, w) float32 on CPU
    size: tuple[int, int]             # the input's (H, W)
    steps: int
    seed: int
    loras: list[tuple[LoRAFactors, float, LoRASource]]
    t0: float = field(default_factory=time.perf_counter)


class Engine:
    """Serve one base with many LoRAs. Thread-safe; use from any number of threads.

    ``submit(image, lora=..., scale=..., loras=[(ref, s)], steps=, seed=)`` returns a Future
    of :class:`ImageResult`; ``run(...)`` waits for it. ``scale`` multiplies every LoRA (as
    ``lbm-reg infer --scale``): ``lora`` at 1.0, each entry of ``loras`` at its own scale.
    """

    def __init__(self, model: LBMModel, resolver: Resolver, *, device: torch.device, dtype: torch.dtype,
                 options: ServeOptions | None = None, base: dict[str, Any] | None = None) -> None:
        self.model = model
        self.resolver = resolver
        self.device = device
        self.dtype = dtype
        self.options = options or ServeOptions()
        self.base = dict(base or {})
        self.metrics = self._make_metrics()
        self.multi = MultiLoRA(model.denoiser, mode=self.options.mixed_lora)  # type: ignore[arg-type]
        self.loader = LoRALoader(device, dtype, self._check, threads=self.options.loader_threads)
        self.cache = LoRACache(self.options.max_loras, on_event=self._cache_event)
        self.batcher: Batcher[_Item] = Batcher(self._run_batch, max_batch=self.options.max_batch,
                                               max_wait_ms=self.options.max_wait_ms,
                                               max_queue=self.options.max_queue,
                                               on_batch=lambda n: self.metrics.observe("batch_size", n))
        self.started = time.time()

    # -- metrics -------------------------------------------------------------------------
    def _make_metrics(self) -> Metrics:
        m = Metrics()
        m.counter("requests_total", "Image requests by outcome (ok, or the error class).")
        m.histogram("request_seconds", "Time from submission to result, per successful image request.",
                    LATENCY_BUCKETS_S)
        m.histogram("batch_size", "Samples per denoiser forward pass.", BATCH_BUCKETS)
        m.counter("forward_passes_total", "Denoiser forward passes (one per batch and sampling step).")
        m.counter("lora_cache_hits_total", "LoRA cache hits.")
        m.counter("lora_cache_misses_total", "LoRA cache misses (loads: read, sha256 check, copy to device).")
        m.counter("lora_cache_evictions_total", "LoRAs evicted (least recently used first).")
        m.gauge("lora_cache_entries", "LoRAs in the cache.", lambda: len(self.cache))
        m.gauge("lora_cache_bytes", "Bytes of LoRA factors held on the device.", lambda: self.cache.nbytes())
        m.gauge("queue_depth", "Requests waiting or running.", lambda: self.batcher.depth)
        return m

    def _cache_event(self, name: str) -> None:
        self.metrics.inc({"hit": "lora_cache_hits_total", "miss": "lora_cache_misses_total",
                          "eviction": "lora_cache_evictions_total"}[name])

    # -- LoRAs ---------------------------------------------------------------------------
    def _check(self, lora: LoRAFile, src: LoRASource) -> None:
        try:
            self.multi.check(lora)
        except LoRAError as exc:
            from lbm_registry.errors import BaseMismatchError

            raise BaseMismatchError(f"{src.ref}: {exc}") from None

    def factors(self, src: LoRASource, *, pin: bool | None = None) -> LoRAFactors:
        """The cached factors of ``src``; a miss is loaded on the loader thread while this one
        waits (warm requests and the batch worker go on meanwhile)."""
        return self.cache.get(src.sha256, lambda: self.loader.load(src), ref=src.ref, size=src.size, pin=pin)

    def load_lora(self, ref: str, *, pin: bool | None = None) -> dict[str, Any]:
        """Resolve and cache ``ref``; ``pin`` True keeps it from eviction, False unpins, None
        leaves it as it is. Returns its cache entry."""
        src = self.resolver(ref)
        self.factors(src, pin=pin)
        return next(e for e in self.cache.entries() if e["sha256"] == src.sha256)

    def unload_lora(self, ref: str) -> dict[str, Any]:
        """Drop ``ref`` from the cache (by a reference it served, a sha256 prefix, or re-resolved)."""
        key = self.cache.find(ref)
        if key is None:
            try:
                key = self.resolver(ref).sha256
            except RefError:
                key = None
        if key is None or not self.cache.unload(key):
            raise RefError(f"{ref} is not loaded")
        return {"unloaded": ref, "sha256": key}

    def loras(self) -> list[dict[str, Any]]:
        return self.cache.entries()

    # -- requests ------------------------------------------------------------------------
    def submit(self, image: bytes | Image.Image, *, lora: str | None = None, scale: float = 1.0,
               loras: Sequence[tuple[str, float]] = (), steps: int = 1, seed: int = 0) -> Future:
        """Validate, resolve and enqueue one request; the Future gives an :class:`ImageResult`."""
        try:
            fut = self._submit(image, lora=lora, scale=scale, loras=loras, steps=steps, seed=seed)
        except Exception as exc:
            self.metrics.inc("requests_total", outcome=type(exc).__name__)
            raise
        fut.add_done_callback(self._record)
        return fut

    def _record(self, fut: Future) -> None:
        exc = fut.exception()
        self.metrics.inc("requests_total", outcome="ok" if exc is None else type(exc).__name__)
        if exc is None:
            self.metrics.observe("request_seconds", fut.result().ms / 1000)

    def _submit(self, image: bytes | Image.Image, *, lora: str | None, scale: float,
                loras: Sequence[tuple[str, float]], steps: int, seed: int) -> Future:
        from lbm_registry.lbm.imaging import open_image
        from lbm_registry.lbm.pipeline import prepare_image

        t0 = time.perf_counter()
        scale = check_scale(scale)
        steps = check_steps(steps, limit=self.options.max_steps)
        seed = check_seed(seed)
        stacked = (1 if lora else 0) + len(loras)
        if stacked > self.options.max_stack:  # each one is a low-rank pass per layer for the whole batch
            raise RangeError(f"{stacked} LoRAs in one request: at most {self.options.max_stack} may be stacked "
                             f"(the server's max_stack)")
        specs = ([(lora, 1.0)] if lora else []) + [(r, check_scale(s, f"scale of {abbreviate(str(r))}"))
                                                   for r, s in loras]
        if isinstance(image, bytes | bytearray):
            img = open_image(bytes(image), max_pixels=self.options.max_pixels)
        else:
            if image.width * image.height > self.options.max_pixels:
                from lbm_registry.errors import ImageTooLargeError

                raise ImageTooLargeError(f"image is {image.width}x{image.height}, over the limit of "
                                         f"{self.options.max_pixels} pixels")
            img = image
        applied = []
        for ref, s in specs:
            src = self.resolver(ref)
            applied.append((self.factors(src), s * scale, src))
        x, size = prepare_image(img, self.model.config)
        item = _Item(x, size, steps, seed, applied, t0)
        return self.batcher.submit(item, key=(tuple(x.shape[-2:]), steps))

    def run(self, image: bytes | Image.Image, **kwargs: Any) -> ImageResult:
        """:meth:`submit` and wait."""
        return self.submit(image, **kwargs).result()

    # -- the worker ----------------------------------------------------------------------
    @torch.no_grad()
    def _run_batch(self, items: Sequence[_Item]) -> list[ImageResult]:
        """One forward pass per step for ``items`` (same bucket and steps), LoRAs mixed."""
        from lbm_registry.lbm.pipeline import finish_image, translate

        # Samples sharing LoRAs adjacent: each LoRA group is then a slice of the batch.
        order = sorted(range(len(items)), key=lambda i: tuple((f.key, s) for f, s, _ in items[i].loras))
        batch = [items[i] for i in order]
        x = torch.cat([it.x for it in batch]).to(self.device, self.dtype)
        gens = [torch.Generator(device=self.device).manual_seed(it.seed) for it in batch]
        plan = plan_batch([[(f, s) for f, s, _ in it.loras] for it in batch], device=self.device)
        passes = self.multi.forward_passes
        with self.multi.apply(plan):
            out = translate(self.model, x, steps=batch[0].steps, generators=gens,
                            sample_latent=self.options.sample_latent, tiled_decode=self.options.tiled_decode)
        self.metrics.inc("forward_passes_total", self.multi.forward_passes - passes)
        results: list[ImageResult | None] = [None] * len(items)
        for k, i in enumerate(order):
            it = items[i]
            img = finish_image(out[k], it.size)
            results[i] = ImageResult(
                image=img, loras=[{"ref": src.ref, "sha256": src.sha256, "scale": s} for _, s, src in it.loras],
                width=img.width, height=img.height, ms=(time.perf_counter() - it.t0) * 1000,
                batch_size=len(items))
        return results  # type: ignore[return-value]

    # -- lifecycle -----------------------------------------------------------------------
    def sampling(self) -> dict[str, str]:
        """How this server makes pixels (``latent``: sample|mean, ``decode``: tiled|whole)."""
        from lbm_registry.lbm.pipeline import sampling_params

        return sampling_params(self.options.sample_latent, self.options.tiled_decode)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "base": self.base.get("ref"), "base_sha256": self.base.get("sha256"),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), **self.sampling(),
                "queue": self.batcher.depth, "loras": len(self.cache),
                "uptime_s": round(time.time() - self.started, 1)}

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued request, then stop (new requests get OverloadedError)."""
        self.batcher.close(timeout)
        self.loader.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

