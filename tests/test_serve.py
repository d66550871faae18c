"""Serving: mixed-LoRA batches in one forward pass equal ``lbm-reg infer``; cache; errors; HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from lbm_registry.errors import (
    BaseMismatchError,
    DataError,
    ImageTooLargeError,
    OverloadedError,
    RangeError,
    RefError,
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"wide": _png((rng.random((70, 90, 3)) * 255).astype("uint8")),
            "wide2": _png((rng.random((60, 80, 3)) * 255).astype("uint8")),
            "tall": _png((rng.random((100, 50, 3)) * 255).astype("uint8"))}


@pytest.fixture(scope="module")
def infer_ref(serve_registry):
    """``infer_ref(image_bytes, lora, loras=(), scale, steps, seed)`` -> uint8 array from ``lbm-reg infer``'s
    code path (api.infer.load: LoRAs merged into the weights), pipelines cached per LoRA set."""
    from lbm_registry.api.run.infer import load

    pipes: dict = {}

    def _run(image: bytes, lora: str | None = None, loras: tuple = (), scale: float = 1.0, steps: int = 1,
             seed: int = 0) -> np.ndarray:
        key = (lora, loras)
        if key not in pipes:
            specs = [f"{r}:{s}" for r, s in loras]
            pipes[key] = load(lora or "sv-base@1", loras=specs, scale=scale, device="cpu", dtype="fp32",
                              settings=serve_registry)
        return np.asarray(pipes[key](image, scale=scale, steps=steps, seed=seed), dtype=np.int16)

    return _run


@pytest.fixture(scope="module")
def server(serve_registry):
    from lbm_registry.api.serve import Server

    with Server("sv-base@1", settings=serve_registry, device="cpu", dtype="fp32", max_batch=8,
                max_wait_ms=50, max_loras=4) as srv:
        yield srv


@contextlib.contextmanager
def one_batch(server, refs=("sv-a@1", "sv-a@2", "sv-b@1", "sv-c@1")):
    """LoRAs loaded and a long batching window, so 8 concurrent requests surely meet in one
    batch even on a loaded machine (the batch starts as soon as the 8th arrives)."""
    for ref in refs:
        server.load_lora(ref)
    old, server.batcher.max_wait_s = server.batcher.max_wait_s, 120.0
    try:
        yield
    finally:
        server.batcher.max_wait_s = old


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# -- the low-rank path itself --------------------------------------------------------------
def test_mixed_batch_is_one_pass_and_equals_merging_each(tiny_config, torch_single_thread):
    """Every layer: W x once for the batch, plus each sample's own LoRAs (stacked, different
    scales, non-adjacent samples, one without); equals merging per sample."""
    from lbm_registry.lbm.model import build_model, weight_layers
    from lbm_registry.lora.apply import MergedLoRAs
    from lbm_registry.lora.format import LoRAFile, LoRALayer
    from lbm_registry.serve.multilora import MultiLoRA, factors_from_lora, plan_batch

    model = build_model(tiny_config, seed=0).eval()
    g = torch.Generator().manual_seed(0)

    def lora(rank: int) -> LoRAFile:
        layers = {}
        for n, m in weight_layers(model.denoiser).items():
            w = m.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * 0.05
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.05
            layers[n] = LoRALayer(n, down, up, float(rank))
        return LoRAFile(layers)

    a, b = lora(4), lora(2)
    fa = factors_from_lora(a, "a", device="cpu", dtype=torch.float32)
    fb = factors_from_lora(b, "b", device="cpu", dtype=torch.float32)
    samples = [[(fa, 1.0)], [], [(fb, 0.7), (fa, 0.3)], [(fa, 0.5)], [(fb, 1.5)]]
    plan = plan_batch(samples)
    assert len(plan.groups) == 2 and not isinstance(plan.groups[0].rows, slice)  # a: rows 0, 2, 3
    x = torch.randn(len(samples), 4, 16, 16, generator=g)
    sigma = torch.ones(len(samples))
    with MultiLoRA(model.denoiser) as multi, torch.no_grad():
        with multi.apply(plan):
            mixed = model.velocity(x, sigma)
        assert multi.forward_passes == 1
        plain = model.velocity(x, sigma)   # outside apply: the base, untouched
        for i, sample in enumerate(samples):
            files = [(a if f.key == "a" else b, s) for f, s in sample]
            with MergedLoRAs(model.denoiser, files):
                merged = model.velocity(x[i:i + 1], sigma[i:i + 1])
            assert torch.allclose(mixed[i:i + 1], merged, atol=2e-5), i
        assert torch.allclose(plain[1], mixed[1], atol=1e-5)
        assert not torch.allclose(plain[0], mixed[0], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_path_equals_the_loop(tiny_config, torch_single_thread, dtype):
    """The batched path (factors stacked per sample, one bmm / grouped conv down, one baddbmm
    up per layer) gives the loop's result within the dtype's rounding: stacked LoRAs, samples
    without one, convs (3x3 and 1x1), ranks padded (4, 2, 3), a LoRA on a subset of layers, and
    LoRAs with different alpha / r on the same layer. In bf16 both are compared with the fp32
    result: the batched path may be no further from it than the loop (plus a little)."""
    from lbm_registry.lbm.model import build_model, weight_layers
    from lbm_registry.lora.format import LoRAFile, LoRALayer
    from lbm_registry.serve.multilora import MultiLoRA, batched_is_faster, factors_from_lora, plan_batch

    model = build_model(tiny_config, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    layers = weight_layers(model.denoiser)
    assert {m.kernel_size for m in layers.values() if isinstance(m, torch.nn.Conv2d)} == {(3, 3), (1, 1)}

    def lora(rank: int, alpha: float | None = None, every: int = 1) -> LoRAFile:
        out = {}
        for i, (n, m) in enumerate(layers.items()):
            if i % every:
                continue
            w = m.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * 0.05
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.05
            out[n] = LoRALayer(n, down, up, float(alpha if alpha is not None else rank))
        return LoRAFile(out)

    files = {"a": lora(4), "b": lora(2, alpha=1.0), "c": lora(3, every=3)}
    x = torch.randn(6, 4, 16, 16, generator=g)
    sigma = torch.full((6,), 0.6)

    def run(mode: str, dt: torch.dtype) -> tuple[torch.Tensor, MultiLoRA]:
        f = {k: factors_from_lora(v, k, device="cpu", dtype=dt) for k, v in files.items()}
        samples = [[(f["a"], 1.0)], [], [(f["b"], 0.7), (f["a"], 0.3)], [(f["c"], 1.0)], [(f["a"], 0.5)],
                   [(f["b"], 1.5), (f["c"], 0.5)]]
        plan = plan_batch(samples)
        assert len(plan.levels) == 2 and plan.levels[1].slots.count(None) == 4
        with torch.no_grad(), MultiLoRA(model.denoiser.to(dt), mode=mode) as multi, multi.apply(plan):
            return model.velocity(x.to(dt), sigma.to(dt)).float(), multi

    loop, _ = run("loop", dtype)
    batched, multi = run("batched", dtype)
    assert multi.forward_passes == 1 and multi.batched_passes == 1
    with torch.no_grad():
        plain = model.velocity(x.to(dtype), sigma.to(dtype)).float()
    if dtype == torch.float32:
        assert float((batched - loop).abs().max()) <= 1e-5
        tol = rounding = 1e-5
    else:
        exact, _ = run("loop", torch.float32)
        rounding = float((loop - exact).abs().max())
        assert float((batched - exact).abs().max()) <= 1.5 * rounding + 1e-3
        tol = 2 * rounding
    assert float((plain - loop)[0].abs().max()) > 5 * rounding     # the LoRAs change the result beyond rounding
    assert float((plain - batched)[1].abs().max()) <= tol           # the sample without a LoRA
    f = factors_from_lora(files["a"], "a", device="cpu", dtype=torch.float32)
    with MultiLoRA(model.denoiser.float()) as auto:                  # the auto rule decides per batch
        many = plan_batch([[(factors_from_lora(files[k], k, device="cpu", dtype=torch.float32), 1.0)]
                           for k in files])
        assert auto.uses_batched(many) == batched_is_faster("cpu", 3)
        assert not auto.uses_batched(plan_batch([[(f, 1.0)], [(f, 1.0)]]))


def test_auto_rule_keeps_the_loop_on_cpu_and_batches_on_gpus():
    """The measured rule (README, "Mixed-LoRA path"): a CPU never takes the batched path (the two
    were within noise there and the loop copies nothing); a GPU takes it from 2 distinct LoRAs;
    a device without its own entry follows the GPU rule."""
    from lbm_registry.serve.multilora import batched_is_faster

    assert not any(batched_is_faster("cpu", n) for n in (1, 2, 4, 8, 64))
    assert [batched_is_faster("cuda", n) for n in (1, 2, 8)] == [False, True, True]
    assert [batched_is_faster("cuda:0", n) for n in (1, 2)] == [False, True]
    assert [batched_is_faster("mps", n) for n in (1, 2)] == [False, True]


def test_batcher_groups_by_key_and_a_failing_request_fails_alone():
    from lbm_registry.serve.batcher import Batcher

    seen: list[list] = []

    def run(items):
        seen.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [i.upper() for i in items]

    b = Batcher(run, max_batch=4, max_wait_ms=300, max_queue=16)
    futs = [b.submit(x, key=k) for x, k in [("a", 1), ("b", 1), ("c", 2), ("bad", 1), ("d", 1)]]
    b.close()
    assert [f.result() for f in futs if f is not futs[3]] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="bad item"):
        futs[3].result()
    assert all(len({type(i) for i in batch}) == 1 for batch in seen)
    assert ["a", "b", "bad", "d"] in seen      # key 1 together (then retried one by one)
    with pytest.raises(OverloadedError, match="shutting down"):
        b.submit("e", key=1)


# -- the in-process server (api.serve.Server) ----------------------------------------------
REQUESTS = [  # (image, lora, stacked loras, scale, seed, steps)
    ("wide", "sv-a@1", (), 1.0, 0, 1),
    ("wide", "sv-a@1", (), 0.5, 1, 1),
    ("wide2", "sv-b@1", (), 1.0, 2, 1),
    ("wide", "sv-c@1", (), 1.5, 3, 1),
    ("wide", None, (), 1.0, 4, 1),
    ("wide2", "sv-a@2", (("sv-b@1", 0.5),), 1.0, 5, 1),
    ("wide", "sv-b@1", (), 0.25, 6, 1),
    ("wide2", "sv-c@1", (), 1.0, 7, 1),
]


def test_concurrent_mixed_requests_are_one_pass_and_equal_infer(server, images, infer_ref):
    passes = server.multi.forward_passes
    with one_batch(server), ThreadPoolExecutor(len(REQUESTS)) as pool:
        futs = [pool.submit(server.run, images[im], lora=lora, loras=stack, scale=s, seed=seed, steps=steps)
                for im, lora, stack, s, seed, steps in REQUESTS]
        results = [f.result() for f in futs]
    assert server.multi.forward_passes - passes == 1     # 8 requests, 5 LoRA sets: one denoiser pass
    assert {r.batch_size for r in results} == {8}
    for (im, lora, stack, s, seed, steps), res in zip(REQUESTS, results, strict=True):
        ref = infer_ref(images[im], lora, stack, s, steps, seed)
        got = _arr(res.image)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1, (lora, stack, s)
    assert results[0].loras == [{"ref": "sv-a@1", "sha256": results[0].loras[0]["sha256"], "scale": 1.0}]
    assert [x["ref"] for x in results[5].loras] == ["sv-a@2", "sv-b@1"]
    assert results[4].loras == []
    assert not np.array_equal(_arr(results[0].image), _arr(results[4].image))


def test_buckets_run_in_separate_passes_and_steps_use_each_seed(server, images, infer_ref):
    passes = server.multi.forward_passes
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(server.run, images["tall"], lora="sv-a@1", seed=1)
        b = pool.submit(server.run, images["wide"], lora="sv-a@1", seed=2, steps=2)
        c = pool.submit(server.run, images["wide"], lora="sv-b@1", seed=3, steps=2)
        ra, rb, rc = a.result(), b.result(), c.result()
    assert server.multi.forward_passes - passes in (3, 5)   # tall: 1; the two 2-step ones: 2 (or 4 apart)
    assert np.abs(_arr(ra.image) - infer_ref(images["tall"], "sv-a@1", seed=1)).max() <= 1
    assert np.abs(_arr(rb.image) - infer_ref(images["wide"], "sv-a@1", steps=2, seed=2)).max() <= 1
    assert np.abs(_arr(rc.image) - infer_ref(images["wide"], "sv-b@1", steps=2, seed=3)).max() <= 1


def test_alias_moved_while_serving_is_followed(server, serve_registry, images, infer_ref):
    from lbm_registry.api.registry import set_alias

    first = server.run(images["wide"], lora="sv-a@prod", seed=9)
    assert first.loras[0]["ref"] == "sv-a@1"
    set_alias("sv-a@2", "prod", serve_registry)
    try:
        moved = server.run(images["wide"], lora="sv-a@prod", seed=9)
    finally:
        set_alias("sv-a@1", "prod", serve_registry)
    assert moved.loras[0]["ref"] == "sv-a@2"
    assert np.abs(_arr(moved.image) - infer_ref(images["wide"], "sv-a@2", seed=9)).max() <= 1
    assert not np.array_equal(_arr(moved.image), _arr(first.image))


def test_lru_eviction_and_pinning(serve_registry):
    from lbm_registry.api.serve import Server

    with Server(settings=serve_registry, preload=["sv-a@1"], pin_preload=True, device="cpu", max_loras=2) as srv:
        assert srv.health()["base"] == "sv-base@1"      # the preloaded LoRA's base
        srv.load_lora("sv-b@1")
        srv.load_lora("sv-c@1")                          # evicts sv-b (LRU, unpinned), not the pinned sv-a
        assert [(e["ref"], e["pinned"]) for e in srv.loras()] == [("sv-a@1", True), ("sv-c@1", False)]
        srv.load_lora("sv-a@prod")                       # same bytes: a hit, not a second entry
        srv.load_lora("sv-b@1", pin=True)                # evicts sv-c
        assert {e["ref"]: e["pinned"] for e in srv.loras()} == {"sv-a@1": True, "sv-b@1": True}
        with pytest.raises(Exception, match="pinned"):
            srv.load_lora("sv-c@1", pin=True)
        m = srv.metrics
        assert m.total("lora_cache_evictions_total") == 2
        assert m.total("lora_cache_misses_total") == 4 and m.total("lora_cache_hits_total") >= 1
        entry = next(e for e in srv.loras() if e["ref"] == "sv-a@1")
        assert entry["refs"] == ["sv-a@1"] and entry["bytes_on_device"] > 0   # canonical refs
        assert srv.unload_lora("sv-a@prod")["sha256"] == entry["sha256"]
        with pytest.raises(RefError, match="not loaded"):
            srv.unload_lora("sv-a@1")


def test_request_errors_in_process(server, images):
    big = _png(np.zeros((10, 10, 3), dtype="uint8"))
    with pytest.raises(RefError, match="did you mean sv-a"):
        server.run(images["wide"], lora="sv-aa@1")
    with pytest.raises(RefError, match="not a registered reference"):
        server.run(images["wide"], lora="/etc/passwd")
    with pytest.raises(RefError, match="nothing after '@' in 'sv-a@'"):  # the CLI's words, not a bare refusal
        server.run(images["wide"], lora="sv-a@")
    with pytest.raises(BaseMismatchError, match="another base|made for base"):
        server.run(images["wide"], lora="sv-other@1")
    with pytest.raises(DataError, match="not a LoRA"):
        server.run(images["wide"], lora="sv-base@1")
    with pytest.raises(DataError, match="unreadable image"):
        server.run(b"not an image", lora="sv-a@1")
    with pytest.raises(RangeError, match="outside"):
        server.run(images["wide"], lora="sv-a@1", scale=3.0)
    with pytest.raises(RangeError, match="steps"):
        server.run(images["wide"], steps=0)
    old = server.options.max_pixels
    server.options.max_pixels = 99
    try:
        with pytest.raises(ImageTooLargeError, match="over the limit"):
            server.run(big)
    finally:
        server.options.max_pixels = old
    assert server.run(big).image.size == (10, 10)    # the server keeps serving


class _SlowLoRAs:
    """Test-only resolver: the registry's, except that ``slow`` names sv-b@1's bytes arriving
    through a FIFO (a real file whose reads block until the test writes), ``damaged`` names
    sv-b@1's blob under a wrong sha256 and ``misfit`` a LoRA file whose shapes fit no layer."""

    def __init__(self, inner, fifo, misfit) -> None:
        self.inner, self.fifo, self.misfit = inner, fifo, misfit

    def __call__(self, ref: str):
        from dataclasses import replace

        from lbm_registry.registry.blobs import sha256_file

        if ref == "slow":
            return replace(self.inner("sv-b@1"), ref="slow", path=self.fifo)
        if ref == "damaged":
            return replace(self.inner("sv-b@1"), ref="damaged", sha256="0" * 64)
        if ref == "misfit":
            return replace(self.inner("sv-b@1"), ref="misfit", sha256=sha256_file(self.misfit), path=self.misfit)
        return self.inner(ref)


def _open_writer(fifo, deadline_s: float = 60.0) -> int:
    """Open the FIFO for writing once its reader (the loader thread) has opened it."""
    import os

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:   # ENXIO: no reader yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.fixture
def slow_server(serve_registry, tiny_base_path, tmp_path):
    import os

    from lbm_registry.api.serve import Server
    from lbm_registry.lora.format import LoRAFile, LoRALayer, write_lora

    fifo = tmp_path / "slow.safetensors"
    os.mkfifo(fifo)
    misfit = write_lora(LoRAFile({"conv_in": LoRALayer("conv_in", torch.zeros(2, 5, 3, 3), torch.zeros(32, 2, 1, 1), 2.0)}),
                        tmp_path / "misfit.safetensors", dtype=torch.float32)
    with Server("sv-base@1", settings=serve_registry, device="cpu", dtype="fp32", preload=["sv-a@1"],
                max_wait_ms=0) as srv:
        srv.resolver = _SlowLoRAs(srv.resolver, fifo, misfit)
        yield srv, fifo


def test_warm_requests_run_while_a_new_lora_loads(slow_server, serve_registry, images, infer_ref):
    """A new LoRA's bytes arrive slowly (a FIFO): its request waits on the loader thread while a
    request for a warm LoRA completes; then the slow one completes with the right pixels, its
    bytes verified against the registered sha256 as they were read."""
    import os

    from lbm_registry.api.registry import resolve

    srv, fifo = slow_server
    blob = resolve("sv-b@1", serve_registry).path.read_bytes()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(srv.run, images["wide"], lora="slow", seed=4)
        fd = _open_writer(fifo)                    # the loader is reading the file now
        try:
            os.set_blocking(fd, True)
            os.write(fd, blob[: len(blob) // 2])
            warm = srv.run(images["wide"], lora="sv-a@1", seed=5)      # completes meanwhile
            assert not slow.done()                                        # still loading
            assert srv.cache.entries()[-1]["ref"] == "sv-a@1" and len(srv.loras()) == 1
            os.write(fd, blob[len(blob) // 2:])
        finally:
            os.close(fd)
        got = slow.result(timeout=120)
    assert np.abs(_arr(warm.image) - infer_ref(images["wide"], "sv-a@1", seed=5)).max() <= 1
    assert np.abs(_arr(got.image) - infer_ref(images["wide"], "sv-b@1", seed=4)).max() <= 1
    assert got.loras[0]["ref"] == "slow" and srv.metrics.total("lora_cache_misses_total") == 2


def test_http_errors_of_a_background_load(slow_server, images, http_server):
    """A load that fails on the loader thread answers its request with the error's HTTP code and
    one line: damaged bytes 500 (a server-side fault, naming doctor), a LoRA that does not fit the
    served model 409; the server keeps serving."""
    from lbm_registry.serve.app import create_app

    srv, _ = slow_server
    http = http_server(create_app(srv, close_engine=False))
    body = {"image": base64.b64encode(images["wide"]).decode()}
    status, js = http.request("POST", "/v1/images", {**body, "lora": "damaged"})
    assert status == 500 and "sha256" in js["error"] and "doctor" in js["error"]
    status, js = http.request("POST", "/v1/images", {**body, "lora": "misfit"})
    assert status == 409 and js["error"].startswith("misfit: ") and "conv_in" in js["error"]
    status, js = http.request("POST", "/v1/loras", {"ref": "misfit"})
    assert status == 409
    status, js = http.request("POST", "/v1/images", {**body, "lora": "sv-a@1"})
    assert status == 200 and js["lora"] == "sv-a@1"
    assert [e["ref"] for e in srv.loras()] == ["sv-a@1"]           # nothing half-loaded was cached


def test_full_queue_is_overloaded_and_others_still_succeed(serve_registry, images):
    from lbm_registry.api.serve import Server

    with Server("sv-base@1", settings=serve_registry, device="cpu", max_batch=1, max_queue=1, max_wait_ms=0) as srv:
        futs, refused = [], 0
        for seed in range(5):
            try:
                futs.append(srv.submit(images["wide"], lora="sv-a@1", seed=seed))
            except OverloadedError:
                refused += 1
        assert refused >= 1 and futs
        assert all(f.result().image.size == (90, 70) for f in futs)
        assert srv.metrics.value("requests_total", outcome="OverloadedError") == refused


# -- over HTTP -------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_http_concurrent_requests_equal_infer_and_metrics(server, images, infer_ref, http_server):
    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False))
    reqs = REQUESTS[:6] + [("wide", "sv-b@1", (), 2.0, 11, 1), ("wide2", None, (("sv-c@1", 0.5),), 0.5, 12, 1)]
    passes = server.multi.forward_passes

    def post(r):
        im, lora, stack, s, seed, steps = r
        return srv.request("POST", "/v1/images", {"image": _b64(images[im]), "lora": lora, "scale": s, "seed": seed,
                                                  "steps": steps, "loras": [{"ref": x, "scale": y} for x, y in stack]})

    with one_batch(server), ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(post, reqs))
    assert server.multi.forward_passes - passes == 1
    for r, (status, body) in zip(reqs, answers, strict=True):
        assert status == 200, body
        im, lora, stack, s, seed, steps = r
        assert (body["width"], body["height"]) == Image.open(io.BytesIO(images[im])).size
        assert body["lora"] == (lora or (stack[0][0] if stack else None))
        assert (body["latent"], body["decode"]) == ("sample", "tiled")
        assert np.abs(_decode(body["image"]) - infer_ref(images[im], lora, stack, s, steps, seed)).max() <= 1
    status, listing = srv.request("GET", "/v1/loras")
    assert status == 200 and {"sv-a@1", "sv-b@1", "sv-c@1"} <= {e["ref"] for e in listing["loras"]}
    status, text = srv.request("GET", "/metrics")
    assert status == 200
    for needle in ('lbm_serve_requests_total{outcome="ok"}', "lbm_serve_batch_size_bucket{le=\"8\"}",
                   "lbm_serve_lora_cache_hits_total", "lbm_serve_lora_cache_misses_total",
                   "lbm_serve_lora_cache_evictions_total", "lbm_serve_request_seconds_sum",
                   'lbm_serve_http_requests_total{code="200",route="/v1/images"} 8'):
        assert needle in text, needle
    status, health = srv.request("GET", "/healthz")
    assert status == 200 and health["base"] == "sv-base@1"


def test_http_errors_are_one_line_json(server, images, http_server):
    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False, max_body_bytes=200_000))
    img = _b64(images["wide"])
    cases = [
        ({"image": "%%% not base64 %%%"}, 400, "base64"),
        ({"image": _b64(b"GIF89a garbage")}, 400, "unreadable image"),
        ({"image": img, "lora": "sv-aa"}, 404, "did you mean sv-a"),
        ({"image": img, "lora": "sv-a@9"}, 404, "no version 9"),
        ({"image": img, "lora": "sv-other@1"}, 409, "made for base"),
        ({"image": img, "scale": "x"}, 400, "scale"),
        ({"image": img, "colour": 1}, 400, "colour"),
        ({"lora": "sv-a@1"}, 400, "image"),
        ({"image": _b64(_png(np.zeros((200, 200, 3), dtype="uint8")))}, 413, "pixels"),
    ]
    old = server.options.max_pixels
    server.options.max_pixels = 150 * 150
    try:
        for body, code, needle in cases:
            status, answer = srv.request("POST", "/v1/images", body)
            assert status == code, (body.keys(), answer)
            assert set(answer) == {"error"} and needle in answer["error"] and "\n" not in answer["error"], answer
        status, answer = srv.request("POST", "/v1/images", raw=b"{" + b" " * 300_000 + b"}")
        assert status == 413 and "over the limit" in answer["error"]
        status, answer = srv.request("POST", "/v1/images", raw=b"{not json")
        assert status == 400 and answer["error"].startswith("body: not valid JSON"), answer
        status, answer = srv.request("POST", "/v1/images", raw=b"[1, 2]")
        assert status == 400 and answer["error"].startswith("body: expected a JSON object"), answer
        assert srv.request("DELETE", "/v1/loras/sv-b@9")[0] == 404
        assert srv.request("GET", "/nope")[0] == 404
    finally:
        server.options.max_pixels = old
    status, body = srv.request("POST", "/v1/images", {"image": img})
    assert status == 200 and body["lora"] is None


def test_http_load_pin_unload_and_token(serve_registry, http_server, monkeypatch):
    from lbm_registry.api.serve import Server
    from lbm_registry.serve.app import create_app

    with Server("sv-base@1", settings=serve_registry, device="cpu", max_loras=2) as engine:
        srv = http_server(create_app(engine, token="s3cret", close_engine=False))
        assert srv.request("GET", "/healthz")[0] == 200                 # open without the token
        assert srv.request("GET", "/v1/loras")[0] == 401
        assert srv.request("GET", "/v1/loras", token="wrong")[0] == 401
        assert srv.request("GET", "/metrics")[0] == 401
        status, entry = srv.request("POST", "/v1/loras", {"ref": "sv-b@1", "pin": True}, token="s3cret")
        assert status == 200 and entry["pinned"] and entry["ref"] == "sv-b@1"
        assert srv.request("POST", "/v1/loras", {"ref": "sv-zz"}, token="s3cret")[0] == 404
        status, listing = srv.request("GET", "/v1/loras", token="s3cret")
        assert [e["ref"] for e in listing["loras"]] == ["sv-b@1"]
        status, gone = srv.request("DELETE", "/v1/loras/sv-b@1", token="s3cret")
        assert status == 200 and gone["sha256"] == entry["sha256"]
        assert srv.request("GET", "/v1/loras", token="s3cret")[1]["loras"] == []
        assert srv.request("GET", "/docs", token="s3cret")[0] == 200


def test_cli_serve_drains_on_sigterm(serve_registry, images, tmp_path):
    """``lbm-reg serve`` as a real process: requests in flight when SIGTERM arrives are answered,
    then it exits 0."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from fixtures.serve import http_request
    from fixtures.servers import _stop

    env = dict(os.environ, SERVE_TOKEN="tok", MLFLOW_DISABLE_TELEMETRY="true")
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "lbm_registry.cli.main", "--home", str(serve_registry.home),
                                 "serve", "--base", "sv-base@1", "--port", "0", "--device", "cpu",
                                 "--max-wait-ms", "1500", "--preload", "sv-a@1", "--token-env", "SERVE_TOKEN"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (found := re.search(r"at http://127\.0\.0\.1:(\d+) ", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        port = int(found.group(1))  # --port 0: the free port it holds, printed
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if http_request(url, "GET", "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        results: list = [None] * 4

        def post(i: int) -> None:
            results[i] = http_request(url, "POST", "/v1/images", {"image": _b64(images["wide"]), "lora": "sv-a@1",
                                                                  "seed": i}, token="tok")

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while True:   # all four queued (the batch waits 1.5 s to fill) before the signal
            text = http_request(url, "GET", "/metrics", token="tok")[1]
            if "lbm_serve_queue_depth 4" in text:
                break
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert [r[0] for r in results] == [200] * 4, results
        assert proc.wait(60) == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
    finally:
        _stop(proc, signal.SIGKILL)   # only if an assertion left it running


def test_cli_serve_usage_errors(cli, serve_registry, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    rc, _, err = cli("--home", serve_registry.home, "serve", "--token-env", "NO_SUCH_TOKEN_VAR")
    assert rc != 0 and "NO_SUCH_TOKEN_VAR" in err and "Traceback" not in err
    rc, _, err = cli("--home", serve_registry.home, "serve", "--base", "sv-nope", "--port", "0")
    assert rc != 0 and "unknown" in err and len(err.strip().splitlines()) == 1


# -- edges (issue 22) ------------------------------------------------------------------------
HUGE = "99999999999999999999999"   # > 2**63: the catalog driver overflowed on it


def test_in_process_ranges_stack_cap_and_huge_versions(server, images):
    for kw, needle in (({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"steps": 51}, "server's limit"),
                       ({"scale": float("nan")}, "finite"), ({"loras": [("sv-a@1", float("inf"))]}, "scale of sv-a@1")):
        with pytest.raises(RangeError, match=needle):
            server.run(images["wide"], **kw)
    with pytest.raises(RangeError, match="5 LoRAs in one request: at most 4"):
        server.run(images["wide"], lora="sv-a@1", loras=[("sv-b@1", 0.1)] * 4)
    for kw in ({"lora": f"sv-a@{HUGE}"}, {"loras": [(f"sv-a@v{HUGE}", 1.0)]}):
        with pytest.raises(RefError, match=f"sv-a has no version {HUGE}"):
            server.run(images["wide"], **kw)
    with pytest.raises(RefError, match=f"sv-a has no version {HUGE}"):
        server.load_lora(f"sv-a@{HUGE}")


def test_http_edges_huge_versions_stacks_and_long_refs(server, images, http_server):
    """Versions over 2**63 were HTTP 500; 20,000 stacked entries held the batch worker; a
    5000-character reference was echoed whole."""
    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False))
    img = _b64(images["wide"])
    for body in ({"image": img, "lora": f"sv-a@{HUGE}"}, {"image": img, "loras": [{"ref": f"sv-a@{HUGE}"}]}):
        status, answer = srv.request("POST", "/v1/images", body)
        assert status == 404 and f"no version {HUGE}" in answer["error"], answer
    status, answer = srv.request("POST", "/v1/loras", {"ref": f"sv-a@{HUGE}"})
    assert status == 404 and f"no version {HUGE}" in answer["error"], answer
    assert srv.request("DELETE", f"/v1/loras/sv-a@{HUGE}")[0] == 404
    passes = server.multi.forward_passes
    status, answer = srv.request("POST", "/v1/images", {"image": img, "loras": [{"ref": "sv-a@1"}] * 20_000})
    assert status == 400 and "20000 LoRAs in one request: at most 4" in answer["error"], answer
    assert server.multi.forward_passes == passes
    long_ref = "a" * 5000
    for body in ({"image": img, "lora": long_ref}, {"image": img, "lora": "sv-a@" + long_ref}):
        status, answer = srv.request("POST", "/v1/images", body)
        assert status == 404 and "characters)" in answer["error"] and len(answer["error"]) < 400, answer
    status, answer = srv.request("POST", "/v1/images", {"image": img, long_ref: 1})
    assert status == 400 and len(answer["error"]) < 400, answer
    for field, value in (("steps", True), ("scale", "1.5"), ("seed", "3")):   # numbers as JSON has them
        status, answer = srv.request("POST", "/v1/images", {"image": img, field: value})
        assert status == 400 and answer["error"].startswith(f"{field}: must be a JSON number"), answer
    assert srv.request("POST", "/v1/images", {"image": img, "lora": "sv-a@1"})[0] == 200   # still serving


def test_http_body_limits_hold_while_reading(server, http_server):
    """413 was decided from Content-Length alone: a chunked body was read (and decoded) whole.
    A client sending a byte a second held its connection for ever: 408 after the body timeout."""
    from fixtures.serve import raw_exchange

    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False, max_body_bytes=200_000, body_timeout_s=1.0))
    head = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chunk = b"1000\r\n" + b" " * 0x1000 + b"\r\n"   # 4 KiB chunks of JSON whitespace, endlessly
    status, answer, sent = raw_exchange(srv.port, head + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
                                        (chunk for _ in range(100_000)))
    assert status == 413 and "over the limit of 200000 bytes" in answer["error"], answer
    assert sent < 100_000_000        # refused while it arrived (a few MB sit in socket buffers), not after 400 MB
    status, answer, _ = raw_exchange(srv.port, head + b"Content-Length: 100000\r\n\r\n{",
                                     (b" " for _ in range(100_000)), pause=0.25)
    assert status == 408 and "did not arrive within 1 s" in answer["error"], answer
    for path in ("/v1/loras", "/v1/images", "/nope"):   # every route
        status, answer, _ = raw_exchange(srv.port, head.replace(b"/v1/images", path.encode())
                                         + b"Content-Length: 300000\r\n\r\n")
        assert status == 413, (path, answer)
    assert srv.request("GET", "/healthz")[0] == 200


def test_http_takes_json_whatever_the_declared_type(server, images, http_server):
    """``curl -d '{...}'`` declares application/x-www-form-urlencoded: that was a 400."""
    from fixtures.serve import raw_exchange

    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False))
    body = json.dumps({"image": _b64(images["wide"]), "seed": 1}).encode()
    for ctype in (b"application/x-www-form-urlencoded", b"text/plain", None):
        head = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
        head += (b"Content-Type: " + ctype + b"\r\n" if ctype else b"") + b"\r\n"
        status, answer, _ = raw_exchange(srv.port, head, [body])
        assert status == 200 and answer["width"] == 90, (ctype, answer)
    head = b"POST /v1/loras HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nContent-Type: multipart/form-data\r\n\r\n"
    status, answer, _ = raw_exchange(srv.port, head, [b"ref=sv-a1"])
    assert status == 400 and answer["error"].startswith("body: not valid JSON") and "JSON object" in answer["error"]


def test_docs_are_served_offline(server, http_server):
    """/docs loaded Swagger UI from a CDN: a blank page offline. Every asset is served here."""
    import re

    from lbm_registry.serve.app import create_app

    srv = http_server(create_app(server, close_engine=False, token="tok"))
    for page in ("/docs", "/redoc"):
        status, html = srv.request("GET", page, token="tok")
        assert status == 200 and isinstance(html, str), html
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert urls and not [u for u in urls if "//" in u], urls       # nothing from another host
        for url in urls:
            if url.startswith("/docs/assets/"):
                status, _ = srv.request("GET", url)                   # the browser sends no token
                assert status == 200, url
    status, schema = srv.request("GET", "/openapi.json", token="tok")
    assert status == 200 and "/v1/images" in schema["paths"]
