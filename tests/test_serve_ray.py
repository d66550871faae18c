"""Scale-out: a local one-node Ray cluster on 127.0.0.1 serves two LoRAs through Ray Serve's
model multiplexing (requests routed by the ``serve_multiplexed_model_id`` header), each result
equal to ``lbm-reg infer``. Skips when the ``ray`` extra is not installed."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is the 'ray' extra: pip install -e '.[ray]'")


def test_ray_serve_multiplexes_two_loras(serve_registry, monkeypatch):
    import ray
    from fixtures.serve import http_request
    from fixtures.servers import free_port
    from PIL import Image
    from ray import serve

    from lbm_registry.api.run.infer import load
    from lbm_registry.api.serve.ray_serve import deployment

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    png = buf.getvalue()
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="lbm-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             _temp_dir=ray_tmp)   # short: Ray's AF_UNIX socket paths must stay under 108 bytes
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment("sv-base@1", home=str(serve_registry.home), device="cpu", dtype="fp32",
                             max_loras_per_replica=2, max_wait_ms=5), route_prefix="/", name="lbm")
        url = f"http://127.0.0.1:{port}"
        for ref, seed in (("sv-a@1", 1), ("sv-b@1", 2), ("sv-a@1", 3)):
            body = {"image": base64.b64encode(png).decode(), "seed": seed}
            r = urllib.request.Request(url + "/v1/images", data=json.dumps(body).encode(), method="POST",
                                       headers={"Content-Type": "application/json", "serve_multiplexed_model_id": ref})
            with urllib.request.urlopen(r, timeout=300) as resp:
                answer = json.loads(resp.read())
            assert answer["lora"] == ref
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))), dtype=np.int16)
            want = np.asarray(load(ref, device="cpu", dtype="fp32", settings=serve_registry)(png, seed=seed),
                              dtype=np.int16)
            assert np.abs(got - want).max() <= 1, ref
        status, health = http_request(url, "GET", "/healthz")
        assert status == 200 and health["base"] == "sv-base@1"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
