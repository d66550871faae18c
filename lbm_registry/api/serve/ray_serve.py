"""Scale-out on Ray Serve: replicas of :class:`~lbm_registry.api.serve.Server`, LoRAs multiplexed.

Each replica holds one warm base and its own LoRA cache. Ray Serve's model multiplexing
(``serve.multiplexed``) routes a request whose ``serve_multiplexed_model_id`` header names a
LoRA reference to a replica that already holds that LoRA (else it loads it on one, evicting that
replica's least recently used LoRA). Within a replica, requests that arrive together, for any
LoRAs, still share one forward pass. Every replica reads the same registry (catalog URL and
tracking server, or a shared home), read-only.

    from ray import serve
    from lbm_registry.api.serve.ray_serve import deployment
    serve.run(deployment(base="lbm-base@1", home="/srv/registry", num_replicas=4), route_prefix="/")

    curl -H 'serve_multiplexed_model_id: relight@prod' -d '{"image": "..."}' http://HOST:8000/v1/images

The request body is that of ``POST /v1/images``; its ``lora`` may be left out (the header
names it). Needs the ``ray`` extra: ``pip install 'lbm-registry[ray]'``.
"""

from __future__ import annotations

from typing import Any


class _ReplicaLoRA:
    """What ``serve.multiplexed`` holds per LoRA: a pin in the replica's cache, dropped on eviction."""

    def __init__(self, server: Any, ref: str) -> None:
        self.server, self.ref = server, ref

    def __del__(self) -> None:
        try:
            self.server.unload_lora(self.ref)
        except Exception:  # noqa: BLE001  (already evicted or unloaded: nothing to release)
            pass


def deployment(base: str | None = None, *, home: str | None = None, catalog_url: str | None = None,
               tracking_uri: str | None = None, num_replicas: int = 1, max_loras_per_replica: int = 4,
               device: str = "auto", dtype: str = "auto", ray_actor_options: dict[str, Any] | None = None,
               **server_options: Any) -> Any:
    """A Ray Serve application (pass it to ``serve.run``) serving ``base`` with multiplexed LoRAs."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1})
    class LBMLoRADeployment:
        def __init__(self) -> None:
            from lbm_registry.api.serve import Server
            from lbm_registry.settings import WorkspaceSettings

            settings = WorkspaceSettings.resolve(home, catalog_url, tracking_uri)
            self.server = Server(base, settings=settings, device=device, dtype=dtype,
                                 max_loras=max_loras_per_replica + 1, **server_options)

        @serve.multiplexed(max_num_models_per_replica=max_loras_per_replica)
        async def get_lora(self, ref: str) -> _ReplicaLoRA:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self.server.load_lora, ref, pin=True)
            return _ReplicaLoRA(self.server, ref)

        async def __call__(self, request: Request) -> JSONResponse:
            from pydantic import ValidationError

            from lbm_registry.errors import LBMError
            from lbm_registry.serve.app import ImageRequest, answer_image, status_of

            if request.url.path.rstrip("/").endswith("/healthz"):
                return JSONResponse(self.server.health())
            try:
                req = ImageRequest.model_validate(await request.json())
                ref = serve.get_multiplexed_model_id() or None
                if ref:
                    await self.get_lora(ref)
                return JSONResponse(await answer_image(self.server, req, lora=ref))
            except LBMError as exc:
                return JSONResponse({"error": str(exc)}, status_code=status_of(exc))
            except (ValidationError, ValueError) as exc:
                return JSONResponse({"error": " ".join(str(exc).split())[:300]}, status_code=400)

    return LBMLoRADeployment.bind()
