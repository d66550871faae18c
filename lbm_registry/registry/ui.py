"""``lbm-reg ui``: MLflow's own UI on a workspace, in one process, opening on the model registry.

Why not ``mlflow server``: in MLflow 3.17 it starts a uvicorn supervisor with 4 worker processes
and a job executor (huey) with about 7 consumer processes of ~280 MB each. On 2 cores that is
about a minute before the first page, and a killed ``mlflow server`` can leave its children
running. The UI needs none of it: this module serves the same application
(``mlflow.server.fastapi_app``: the REST API, the artifact routes and the React app) with one
uvicorn server in this very process. No workers, no job executor, no child process at all, so
Ctrl-C or SIGTERM stops everything there is.

The first load: MLflow 3.17's UI starts in *GenAI* mode (no model registry in the sidebar, the
assistant panel opening itself, a promo modal on the registry, experiments opening on traces).
It has no server-side setting for that: the mode comes from the page URL
(``?workflowType=machine_learning``), else from the browser's localStorage
(``mlflow.workflowType_v1``), else GenAI. So the index page served here carries a small script
that stores the machine-learning mode, and marks the assistant's first-load auto-open as done
and the registry promo as dismissed, **only where this browser has stored nothing yet**: a user
who switches the mode in the sidebar keeps that choice. :func:`landing_url` is also correct
for a plain ``mlflow server`` (the URL parameter alone decides the first page there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: localStorage entries (MLflow's ``<key>_v<version>`` naming, JSON values) set when absent.
UI_DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "_mlflow_model_registry_promo_modal_dismissed_v1": True,
}
WORKFLOW_PARAM = "workflowType=machine_learning"
_MARK = b"<head>"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def landing_url(host: str, port: int, path: str = "/models") -> str:
    """The URL that opens ``path`` (a UI route) in machine-learning mode on any MLflow 3 server."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/#{path}?{WORKFLOW_PARAM}"


def defaults_script() -> bytes:
    """The ``<script>`` that stores :data:`UI_DEFAULTS` where nothing is stored yet."""
    body = (f"(function(){{var d={json.dumps({k: json.dumps(v) for k, v in UI_DEFAULTS.items()}, sort_keys=True)};"
            "try{for(var k in d){if(window.localStorage.getItem(k)===null){window.localStorage.setItem(k,d[k]);}}}"
            "catch(e){}})();")
    return f"<script>{body}</script>".encode()


def with_ui_defaults(html: bytes) -> bytes:
    """``index.html`` with :func:`defaults_script` as the first thing in ``<head>`` (it must run
    before MLflow's own bundle reads localStorage)."""
    if _MARK not in html or defaults_script() in html:
        return html
    return html.replace(_MARK, _MARK + defaults_script(), 1)


class UIDefaults:
    """ASGI middleware: the index page (``GET /``) gets :func:`with_ui_defaults`; every other
    request and every header (MLflow's security headers included) passes through unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope.get("type") != "http" or scope.get("method") != "GET" or scope.get("path") != "/":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            assert start is not None
            body = b"".join(chunks)
            headers = list(start.get("headers") or [])
            if start.get("status") == 200 and any(k.lower() == b"content-type" and v.startswith(b"text/html")
                                                 for k, v in headers):
                body = with_ui_defaults(body)
                headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"etag")]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


def build_app(backend_store_uri: str, artifact_root: str) -> ASGIApp:
    """MLflow's tracking-server application on this store, wrapped in :class:`UIDefaults`.

    Configured the way ``mlflow server`` configures its workers (the store URIs through the
    environment variables its handlers read), minus the job executor."""
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import uvicorn  # noqa: F401  (imported first: MLflow then turns its server-side security on)
    from mlflow.server import constants

    os.environ[constants.BACKEND_STORE_URI_ENV_VAR] = backend_store_uri
    os.environ[constants.REGISTRY_STORE_URI_ENV_VAR] = backend_store_uri
    os.environ[constants.ARTIFACT_ROOT_ENV_VAR] = artifact_root
    os.environ["_MLFLOW_SGI_NAME"] = "uvicorn"
    import warnings

    # MLflow's own import of Starlette's WSGI bridge warns on every start: not the user's concern
    warnings.filterwarnings("ignore", message=r"starlette\.middleware\.wsgi is deprecated")
    from mlflow.server.handlers import initialize_backend_stores

    initialize_backend_stores(backend_store_uri, backend_store_uri, artifact_root)
    from mlflow.server.fastapi_app import app

    return UIDefaults(app)


def serve(backend_store_uri: str, artifact_root: str, host: str, port: int, *,
          open_url: str | None = None) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn's own handlers: open requests get 5 s to finish; then
    the process ends as the signal says: 130 after Ctrl-C, killed by SIGTERM after SIGTERM).
    ``open_url``: opened in the user's browser once the server accepts connections."""
    import uvicorn

    app = build_app(backend_store_uri, artifact_root)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5, lifespan="on"))
    if open_url:
        def opener() -> None:
            import time
            import webbrowser

            while not server.started and not server.should_exit:
                time.sleep(0.1)
            if server.started:
                webbrowser.open(open_url)

        threading.Thread(target=opener, name="open-browser", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: no traceback
        sys.exit(130)
    if not server.started:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lbm_registry.registry.ui", description=__doc__.splitlines()[0])
    p.add_argument("--backend-store-uri", required=True)
    p.add_argument("--default-artifact-root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--open", dest="open_url", default=None, help="a URL to open in the browser once serving")
    args = p.parse_args(argv)
    serve(args.backend_store_uri, args.default_artifact_root, args.host, args.port, open_url=args.open_url)


if __name__ == "__main__":
    main()
