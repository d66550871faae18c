"""The HTTP API (DESIGN.md "Serving") over an :class:`~lbm_registry.serve.engine.Engine`.

Errors are JSON ``{"error": "one line"}``: bad input 400, missing/wrong token 401, unknown
reference 404, LoRA for another base 409, too large 413, queue full or shutting down 503,
anything unexpected 500 (logged with its traceback here, never shown to the client). One
request's failure never stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from lbm_registry.errors import (
    LONGEST_WORD,
    BaseMismatchError,
    DataError,
    ImageTooLargeError,
    LBMError,
    LoRAError,
    OverloadedError,
    RangeError,
    RefError,
    abbreviate,
)
from lbm_registry.serve.metrics import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lbm_registry.serve.engine import Engine, ImageResult

log = logging.getLogger(__name__)


#: A JSON number, as JSON has it (true and "1.5" are not numbers here: the Python API refuses
#: them too); its range is checked by the engine (lbm_registry.ranges), the same for every surface.
Number = StrictInt | StrictFloat


class LoRASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    scale: Number = 1.0


class ImageRequest(BaseModel):
    """``POST /v1/images``. ``scale`` multiplies every LoRA, as ``lbm-reg infer --scale``."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 bytes of any PIL-readable image (a data: URL is accepted too)")
    lora: str | None = Field(None, description="LoRA reference, e.g. relight@prod")
    scale: Number = Field(1.0, description="0.0-2.0")
    loras: list[LoRASpec] = Field(default_factory=list, description="stacked LoRAs, each with its own scale")
    steps: Number = Field(1, description="1 to the server's --max-steps (an integer)")
    seed: Number = Field(0, description="0 to 2**63-1 (an integer)")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    pin: StrictBool | None = Field(None, description="true pins, false unpins, absent leaves it as it is")


#: HTTP status of each error class, most specific first (subclasses before their bases).
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ImageTooLargeError, 413), (BaseMismatchError, 409), (RefError, 404), (OverloadedError, 503),
    (DataError, 400), (RangeError, 400), (LoRAError, 409),
)


def status_of(exc: BaseException) -> int:
    return next((code for cls, code in ERROR_STATUS if isinstance(exc, cls)), 500)


def decode_image_field(text: str) -> bytes:
    """base64 (standard or URL-safe, with or without a ``data:...;base64,`` prefix) -> bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise DataError("image is not valid base64") from None


def encode_png(result: ImageResult) -> str:
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def answer_image(engine: Engine, req: ImageRequest, *, lora: str | None = None) -> dict[str, Any]:
    """Run one image request on ``engine`` off the event loop; the JSON answer of ``/v1/images``.

    ``lora`` overrides ``req.lora`` (Ray Serve passes the multiplexed model id)."""
    from starlette.concurrency import run_in_threadpool

    data = decode_image_field(req.image)
    fut = await run_in_threadpool(engine.submit, data, lora=lora or req.lora, scale=req.scale,
                                  loras=[(s.ref, s.scale) for s in req.loras], steps=req.steps, seed=req.seed)
    result = await asyncio.wrap_future(fut)
    png = await run_in_threadpool(encode_png, result)
    first = result.loras[0] if result.loras else None
    return {"image": png, "lora": first["ref"] if first else None, "sha256": first["sha256"] if first else None,
            "loras": result.loras, "width": result.width, "height": result.height,
            "ms": round(result.ms, 1), "batch_size": result.batch_size, **engine.sampling()}


#: Seconds a client has to send a request's whole body (``lbm-reg serve --body-timeout``).
BODY_TIMEOUT_S = 60.0
#: The docs pages' script, style sheet and icon, served by this server (never from a CDN).
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}


def docs_asset(name: str) -> bytes | None:
    """The bytes of a docs asset, from the installed ``fastapi-offline`` package (which ships
    Swagger UI and ReDoc builds), or None when that package is not installed."""
    from importlib import resources

    try:
        return (resources.files("fastapi_offline") / "static" / name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return None


def create_app(engine: Engine, *, token: str | None = None, max_body_bytes: int | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S, close_engine: bool = True) -> FastAPI:
    """The FastAPI app. ``token``: every route but ``/healthz`` (and the docs pages' static
    assets) needs ``Authorization: Bearer TOKEN``. ``max_body_bytes`` / ``body_timeout_s``: every
    request body is read whole within these, else 413 / 408 (see :mod:`lbm_registry.serve.body`).
    ``close_engine``: drain and stop the engine when the app shuts down (uvicorn does that on
    SIGTERM/SIGINT after in-flight requests are answered)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lbm_registry.serve.body import BodyGuard
    from lbm_registry.version import __version__

    limit = max_body_bytes if max_body_bytes is not None else max(32 << 20, engine.options.max_pixels * 6)
    metrics = engine.metrics
    metrics.counter("http_requests_total", "HTTP requests by route and status code.")
    metrics.histogram("http_request_seconds", "HTTP request latency by route.", LATENCY_BUCKETS_S)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="lbm-registry serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="One warm LBM base, many LoRAs per request, mixed-LoRA batches in one forward pass.")
    # inner to the guard below: the token is checked before a body is read
    app.add_middleware(BodyGuard, limit=limit, timeout_s=body_timeout_s)

    def error(status: int, message: str) -> JSONResponse:
        # one line; a client's overlong input (a 5000-character reference or key) is never echoed whole
        return JSONResponse({"error": " ".join(abbreviate(w, LONGEST_WORD) for w in str(message).split())},
                            status_code=status)

    @app.exception_handler(LBMError)
    async def _lbm_error(request: Request, exc: LBMError) -> JSONResponse:
        return error(status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if errs:
            e = errs[0]
            if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
                why = (e.get("ctx") or {}).get("error")
                return error(400, "body: not valid JSON" + (f" ({why})" if why else "")
                             + ': send one JSON object, e.g. {"image": "<base64>", "lora": "NAME@VERSION"}')
            # union members (a Number is int | float) add their tag to the location: not a field
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "int", "float")) or "body"
            if where == "body" and e.get("type") in ("model_attributes_type", "dict_type"):
                return error(400, 'body: expected a JSON object, e.g. {"image": "<base64>", "lora": "NAME@VERSION"}')
            if e.get("type") in ("int_type", "float_type"):
                got = {bool: "true/false", str: "a string", type(None): "null", dict: "an object",
                       list: "an array"}.get(type(e.get("input")), type(e.get("input")).__name__)
                return error(400, f"{where}: must be a JSON number, got {got}")
            return error(400, f"{where}: {e.get('msg', 'invalid')}")
        return error(400, "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any):
        t0 = time.perf_counter()
        route = request.url.path
        if token is not None and route != "/healthz" and not route.startswith("/docs/assets/"):
            got = request.headers.get("authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                response = error(401, "missing or wrong bearer token")
                response.headers["WWW-Authenticate"] = "Bearer"
                return _count(route, response, t0)
        try:
            response = await call_next(request)
        except Exception as exc:  # errors raised past the exception handlers (middleware order)
            log.exception("unexpected error on %s", route)
            response = error(500, f"internal error: {type(exc).__name__}")
        return _count(route, response, t0)

    def _count(route: str, response: Any, t0: float) -> Any:
        known = route if route in ("/v1/images", "/v1/loras", "/healthz", "/metrics") else (
            "/v1/loras/{ref}" if route.startswith("/v1/loras/") else "other")
        metrics.inc("http_requests_total", route=known, code=str(response.status_code))
        metrics.observe("http_request_seconds", time.perf_counter() - t0, route=known)
        return response

    @app.post("/v1/images")
    async def images(req: ImageRequest) -> dict[str, Any]:
        """Translate one image with the given LoRA(s); requests arriving together share a forward pass."""
        return await answer_image(engine, req)

    @app.get("/v1/loras")
    async def list_loras() -> dict[str, Any]:
        """Cached LoRAs, least recently used first."""
        return {"loras": engine.loras(), "max_loras": engine.options.max_loras}

    @app.post("/v1/loras")
    async def load_lora(req: LoadRequest) -> dict[str, Any]:
        """Load (resolve, verify, copy to the device) a LoRA now; ``pin`` keeps it from eviction."""
        return await run_in_threadpool(engine.load_lora, req.ref, pin=req.pin)

    @app.delete("/v1/loras/{ref:path}")
    async def unload_lora(ref: str) -> dict[str, Any]:
        return await run_in_threadpool(engine.unload_lora, ref)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return engine.health()

    @app.get("/docs", include_in_schema=False, response_model=None)
    async def docs() -> HTMLResponse:
        """Swagger UI, its assets served from here: the page works offline."""
        if docs_asset("swagger-ui-bundle.js") is None:
            return HTMLResponse("<p>The docs assets (package fastapi-offline) are not installed; the OpenAPI "
                                "schema is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no online validator badge

    @app.get("/redoc", include_in_schema=False, response_model=None)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url="/docs/assets/redoc.standalone.js",
                              redoc_favicon_url="/docs/assets/favicon.png", with_google_fonts=False)

    @app.get("/docs/assets/{name}", include_in_schema=False, response_model=None)
    async def docs_assets(name: str) -> Response:
        data = docs_asset(name) if name in DOCS_ASSETS else None
        if data is None:
            return error(404, f"no docs asset {name[:60]!r}")
        return Response(data, media_type=DOCS_ASSETS[name], headers={"Cache-Control": "max-age=86400"})

    # response_model=None: the return annotation names a class imported here, which the OpenAPI
    # schema builder cannot resolve (/openapi.json was a 500, and so /docs blank)
    @app.get("/metrics", response_class=PlainTextResponse, response_model=None)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
