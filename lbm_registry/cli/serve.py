"""``lbm-reg serve``: one warm base, many LoRAs per request, over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import typer

from lbm_registry.cli._common import console, fail, settings


def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port; 0 picks a free one (printed)"),
    base: str | None = typer.Option(None, "--base", help="The base REF this server holds [default: the base of "
                                    "the first --preload, else the registry's only base]."),
    preload: list[str] = typer.Option([], "--preload", metavar="REF", help="LoRA REF to load at start; repeatable."),
    pin: bool = typer.Option(False, "--pin", help="Pin the preloaded LoRAs (never evicted)."),
    max_loras: int = typer.Option(8, "--max-loras", min=1, help="LoRAs kept on the device (LRU)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Samples per forward pass."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="How long a batch waits to fill."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests waiting before 503."),
    max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", min=1, help="Larger input images get 413."),
    max_stack: int = typer.Option(4, "--max-stack", min=1, max=64,
                                  help="LoRAs one request may stack (lora plus loras); more get 400."),
    max_steps: int = typer.Option(50, "--max-steps", min=1, max=1000, help="Sampling steps a request may ask for."),
    body_timeout: float = typer.Option(60.0, "--body-timeout", min=0.1,
                                       help="Seconds a client has to send a request body; slower gets 408."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    sample_latent: bool = typer.Option(True, "--sample-latent/--mean-latent", help="Encode with a seeded sample "
                                       "of the VAE posterior, as upstream LBM (default), or with its mean."),
    tiled_decode: bool = typer.Option(True, "--tiled-decode/--whole-decode", help="Decode latents over 128 on a "
                                      "side in upstream's overlapping tiles (default), or whole."),
    token_env: str | None = typer.Option(None, "--token-env", help="Environment variable holding a bearer "
                                         "token every route but /healthz requires."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve images over HTTP: POST /v1/images, /v1/loras, /healthz, /metrics, docs at /docs."""
    import os

    from lbm_registry.api.serve import check_device, check_dtype

    check_device(device)  # a missing GPU or a typo is one line, before any model loads
    check_dtype(dtype)
    token = None
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            fail(f"--token-env {token_env}: the environment variable is not set or empty")
    # a taken port is a usage error, found before seconds of model loading; port 0 picks a free one
    from lbm_registry.net import listening_socket

    sock = listening_socket(host, port)
    port = sock.getsockname()[1]

    import uvicorn

    from lbm_registry.api.serve import Server, create_app

    err = console(stderr=True)
    with err.status("loading the base model"):
        server = Server(base, preload=preload, pin_preload=pin, device=device, dtype=dtype, settings=settings(ctx),
                        max_loras=max_loras, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                        max_pixels=max_pixels, max_stack=max_stack, max_steps=max_steps,
                        sample_latent=sample_latent, tiled_decode=tiled_decode)
    app = create_app(server, token=token, body_timeout_s=body_timeout)
    h = server.health()
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving base {h['base']} on {h['device']}/{h['dtype']} at http://{shown}:{port} "
              f"({len(server.loras())} LoRA(s) preloaded{', token required' if token else ''}); Ctrl-C or SIGTERM "
              f"drains and stops")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=300,
                            access_log=log_level in ("info", "debug", "trace"))
    _draining_server_class()(config).run(sockets=[sock])
    server.close()
    err.print("stopped")


def _draining_server_class():
    import contextlib

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT that was drained gracefully ends the
        process normally (exit 0) instead of being re-raised at exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()

    return DrainingServer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
