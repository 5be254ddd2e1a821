"""`kefu-triage serve`: the artifact behind HTTP (FastAPI + uvicorn, torch-free; ``pip install 'kefu-triage[serve]'``).

    POST /v1/triage     {"messages": [{"text": ..., "context": [{"role", "text"}, ...]}, ...]}
    POST /model/parse   Rasa NLU-compatible: {"text", "message_id"} -> {"intent", "intent_ranking", "entities", ...}
    GET  /healthz       the process is up            GET /readyz   the model is loaded and warmed
    GET  /metrics       Prometheus text              GET /docs     OpenAPI (Swagger UI), /openapi.json

Concurrent requests share model calls through the micro-batcher (runtime/batching.py). Every option is
also an environment variable (KEFU_ARTIFACT, KEFU_PORT, ...; see ``ServeSettings``) so a container needs
one command and no wrapper. SIGTERM: uvicorn stops accepting and finishes in-flight requests, then the
batcher drains and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from pydantic import BaseModel, Field, StrictInt, StrictStr
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # the base install is the runtime only
    raise ImportError(
        f"`kefu-triage serve` needs the 'serve' extra: pip install 'kefu-triage[serve]' ({exc})"
    ) from None

from kefu_triage.core.artifact import MODEL_FILES
from kefu_triage.runtime.batching import MicroBatcher, QueueFullError, ShuttingDownError
from kefu_triage.runtime.model import TriageModel

log = logging.getLogger("kefu_triage.server")
ENV_PREFIX = "KEFU_"


@dataclass
class ServeSettings:
    """Server options. Each is a CLI flag (``--max-batch``) and an environment variable (``KEFU_MAX_BATCH``);
    the flag wins over the variable, the variable over the default."""

    artifact: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    precision: str = "int8"
    max_batch: int = 32  # messages per model call
    # how long the oldest queued request may wait for others to join its batch (default: 0 for int8, whose
    # calls score one message each so a fuller batch saves nothing, 5 for fp32)
    max_wait_ms: float | None = None
    workers: int | None = None  # batches scored at once (default: one per core for int8, 1 for fp32)
    threads: int | None = None  # onnxruntime intra-op threads per worker (default: cores / workers)
    max_queue: int = 1024  # messages waiting for the model; beyond that -> 503 + Retry-After
    max_body_bytes: int = 1 << 20
    max_messages: int = 64  # messages per /v1/triage request
    max_text_chars: int = 4096  # per message and per context turn (the model reads at most 512 anyway)
    max_context_turns: int = 20  # per message (the model reads only the last few)
    graceful_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    log_level: str = "info"
    access_log: bool = False

    @classmethod
    def resolve(
        cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
    ) -> ServeSettings:
        environ = os.environ if environ is None else environ
        overrides = overrides or {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif (raw := environ.get(ENV_PREFIX + f.name.upper())) not in (None, ""):
                values[f.name] = _parse_env(ENV_PREFIX + f.name.upper(), raw, f.default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.artifact:
            raise ValueError("no artifact: pass --artifact DIR or set KEFU_ARTIFACT")
        if self.precision not in MODEL_FILES:
            raise ValueError(
                f"precision (--precision / KEFU_PRECISION) must be one of {list(MODEL_FILES)}, "
                f"got {self.precision!r}"
            )
        for name in ("port", "max_batch", "max_queue", "max_body_bytes", "max_messages", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (KEFU_{name.upper()}) must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_context_turns", "graceful_timeout"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} (KEFU_{name.upper()}) must be >= 0, got {getattr(self, name)}")
        for name in ("workers", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} (KEFU_{name.upper()}) must be >= 1, got {getattr(self, name)}")

    def plan_cpu(self) -> ServeSettings:
        """These settings with ``workers`` and ``threads`` filled in for this machine's cores.

        int8 scores one message per onnxruntime call (batch-independent, see TriageModel.load): such small
        calls spread over intra-op threads spend much of their CPU synchronising them, so by default each
        core gets a worker with one intra-op thread and whole batches run side by side. fp32 batches are
        real matrix products that parallelise well inside one call: one worker using every core. An explicit
        ``threads`` alone keeps its old meaning for int8 too: workers fill the cores with that many threads each."""
        cores = available_cores()
        if self.workers:
            workers = self.workers
        elif self.precision == "int8":
            workers = max(1, cores // (self.threads or 1))
        else:
            workers = 1
        threads = self.threads or (max(1, cores // workers) if workers > 1 else None)
        # int8 batches gain nothing from waiting (measured with `make load-test`, docs/serving.md)
        max_wait_ms = self.max_wait_ms
        if max_wait_ms is None:
            max_wait_ms = 0.0 if self.precision == "int8" else 5.0
        return replace(self, workers=workers, threads=threads, max_wait_ms=max_wait_ms)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# settings whose default is None (filled in by plan_cpu) and the type of their value
_UNSET_DEFAULT_TYPES = {"KEFU_THREADS": int, "KEFU_WORKERS": int, "KEFU_MAX_WAIT_MS": float}


def _parse_env(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        kind = _UNSET_DEFAULT_TYPES.get(name, type(default))
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: not a valid {kind.__name__}") from None
    return raw


# ---- request / response schemas (they also make the OpenAPI docs) --------------------------------------
class Turn(BaseModel):
    role: Literal["customer", "agent"]
    text: StrictStr


class Message(BaseModel):
    text: StrictStr = Field(description="the customer's current message")
    context: list[Turn] | None = Field(None, description="previous turns, oldest first")


class TriageRequest(BaseModel):
    messages: list[Message]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "messages": [
                        {"text": "快递三天没动了，急用！"},
                        {
                            "text": "那退款吧",
                            "context": [
                                {"role": "customer", "text": "鞋子尺码不对"},
                                {"role": "agent", "text": "可以换货哦"},
                            ],
                        },
                    ]
                }
            ]
        }
    }


class TopIntent(BaseModel):
    intent: str
    prob: float


class TriageResult(BaseModel):
    intent: str
    intent_prob: float
    top_intents: list[TopIntent]
    urgent_prob: float
    refund_recoverable_prob: float | None
    route: str
    reason: str


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    precision: str


class TriageResponse(BaseModel):
    results: list[TriageResult]
    model: ModelInfo


class ParseRequest(BaseModel):
    text: StrictStr
    message_id: StrictStr | StrictInt | None = None

    model_config = {"json_schema_extra": {"examples": [{"text": "我要退货", "message_id": "m-1"}]}}


class RankedIntent(BaseModel):
    name: str
    confidence: float


class Urgency(BaseModel):
    is_urgent: bool
    confidence: float


class ParseResponse(BaseModel):
    text: str
    message_id: str | int | None
    intent: RankedIntent
    intent_ranking: list[RankedIntent]
    entities: list[dict]
    urgent: Urgency
    refund_recoverable: float | None
    route: str
    reason: str


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field


def _error(
    status: int, type_: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message, "field": field}}, status, headers=headers
    )


# ---- metrics ------------------------------------------------------------------------------------------
class Metrics:
    """One registry per app, so several apps (tests) in one process do not clash."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "kefu_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "kefu_http_request_duration_seconds",
            "request latency",
            ["endpoint"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_size = Histogram(
            "kefu_batch_size",
            "messages per model call",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_seconds = Histogram(
            "kefu_batch_duration_seconds",
            "model call time per batch",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.queue_depth = Gauge("kefu_queue_depth", "messages waiting for the model", registry=r)
        self.routes = Counter(
            "kefu_routes", "triage decisions by route and reason", ["route", "reason"], registry=r
        )
        self.info = Gauge(
            "kefu_model_info", "the served artifact", ["name", "version", "sha256", "precision"], registry=r
        )


class _Limits:
    """Pure-ASGI middleware: request metrics for every response (including the ones it makes itself) and the
    body-size limit, enforced on the bytes received (Content-Length can be absent or wrong)."""

    def __init__(self, app, metrics: Metrics, max_body: int, endpoints: set[str]):
        self.app, self.metrics, self.max_body, self.endpoints = app, metrics, max_body, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    status["code"] = 413
                    await _error(
                        413, "body_too_large", f"request body larger than {self.max_body} bytes", "body"
                    )(scope, receive, send)
                    return
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _read_body(self, scope, receive) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


# ---- the app ------------------------------------------------------------------------------------------
def model_info(model: TriageModel, precision: str) -> dict[str, str]:
    files = model.manifest.get("files") or {}
    return {
        "name": f"kefu-triage/{model.artifact_dir.name}:{(model.manifest.get('encoder') or {}).get('name', '?')}",
        "version": str(model.manifest.get("kefu_triage_version", "?")),
        "sha256": (files.get(MODEL_FILES[precision]) or {}).get("sha256", "?"),
        "precision": precision,
    }


WARMUP = [
    ("在吗", None),
    (
        "我买的鞋子尺码不对，想换一双大一码的，快递已经到了，怎么操作？",
        [{"role": "agent", "text": "您好，请问有什么可以帮您？"}],
    ),
]


def create_app(model: TriageModel, settings: ServeSettings) -> FastAPI:
    """The ASGI app serving ``model`` (already loaded); the batcher starts and the model is warmed in the
    lifespan, and /readyz turns 200 only after that."""
    metrics = Metrics()
    info = model_info(model, settings.precision)
    metrics.info.labels(**info).set(1)
    batcher = MicroBatcher(
        model.predict,
        settings.max_batch,
        settings.plan_cpu().max_wait_ms,  # unplanned settings (tests, embedding apps) get the default too
        settings.max_queue,
        on_batch=lambda n, s: (metrics.batch_size.observe(n), metrics.batch_seconds.observe(s)),
        on_queue=metrics.queue_depth.set,
        workers=settings.workers or 1,
    )
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        await batcher.run_in_worker(model.predict, [t for t, _ in WARMUP], [c for _, c in WARMUP])
        state["ready"] = True
        log.info(
            "kefu-triage ready: %s (%s), max_batch=%d, max_wait_ms=%g, workers=%d, threads=%s",
            settings.artifact,
            info["sha256"][:12],
            settings.max_batch,
            settings.max_wait_ms,
            batcher.workers,
            settings.threads or "all cores",
        )
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()  # uvicorn has finished the in-flight requests; this scores what is left
            log.info("kefu-triage stopped: queue drained")

    app = FastAPI(
        title="kefu-triage",
        version=info["version"],
        lifespan=lifespan,
        description="Triage e-commerce customer-service messages between bot and human (torch-free ONNX).",
    )
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    errors = {
        422: {"model": ErrorResponse},
        400: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    }

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(
                400,
                "invalid_json",
                f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                "body",
            )
        field = ".".join(loc) or "body"
        return _error(422, "invalid_field", f"{field}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return _error(exc.status, exc.type, exc.message, exc.field)

    @app.exception_handler(QueueFullError)
    async def _full(_request: Request, exc: QueueFullError):
        return _error(503, "overloaded", str(exc), headers={"Retry-After": str(int(exc.retry_after))})

    @app.exception_handler(ShuttingDownError)
    async def _closing(_request: Request, exc: ShuttingDownError):
        return _error(503, "shutting_down", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    def check_text(text: str, field: str) -> None:
        if len(text) > settings.max_text_chars:
            raise RequestError(
                422,
                "too_long",
                f"{field}: {len(text)} characters, the limit is {settings.max_text_chars}",
                field,
            )

    async def score(texts: list[str], contexts: list[Any]) -> list[dict[str, Any]]:
        try:
            results = await batcher.submit(texts, contexts)
        except ValueError as exc:  # the runtime refused an input the schema let through
            raise RequestError(422, "invalid_input", str(exc), "messages") from None
        for r in results:
            metrics.routes.labels(r["route"], r["reason"]).inc()
        return results

    @app.post("/v1/triage", response_model=TriageResponse, responses=errors, tags=["triage"])
    async def triage(body: TriageRequest):
        """Triage one or more messages; the results are in the order of ``messages``."""
        if not body.messages:
            raise RequestError(
                422, "empty", "messages: the list is empty; send at least one message", "messages"
            )
        if len(body.messages) > settings.max_messages:
            raise RequestError(
                413,
                "too_many_messages",
                f"messages: {len(body.messages)} messages, the limit per request is {settings.max_messages}",
                "messages",
            )
        contexts = []
        for i, m in enumerate(body.messages):
            check_text(m.text, f"messages.{i}.text")
            if m.context is not None:
                if len(m.context) > settings.max_context_turns:
                    raise RequestError(
                        422,
                        "too_many_turns",
                        f"messages.{i}.context: {len(m.context)} turns, the "
                        f"limit is {settings.max_context_turns}",
                        f"messages.{i}.context",
                    )
                for j, turn in enumerate(m.context):
                    check_text(turn.text, f"messages.{i}.context.{j}.text")
            contexts.append([t.model_dump() for t in m.context] if m.context else None)
        results = await score([m.text for m in body.messages], contexts)
        return JSONResponse({"results": results, "model": info})

    @app.post("/model/parse", response_model=ParseResponse, responses=errors, tags=["rasa"])
    async def parse(body: ParseRequest):
        """Rasa NLU-compatible parse (drop-in for a Rasa server's ``/model/parse``), plus urgency and route."""
        check_text(body.text, "text")
        r = (await score([body.text], [None]))[0]
        return JSONResponse(
            {
                "text": body.text,
                "message_id": body.message_id,
                "intent": {"name": r["intent"], "confidence": r["intent_prob"]},
                "intent_ranking": [{"name": t["intent"], "confidence": t["prob"]} for t in r["top_intents"]],
                "entities": [],
                "urgent": {
                    "is_urgent": r["urgent_prob"] >= model.thresholds.urgent,
                    "confidence": r["urgent_prob"],
                },
                "refund_recoverable": r["refund_recoverable_prob"],
                "route": r["route"],
                "reason": r["reason"],
            }
        )

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "starting or draining"}})
    async def readyz():
        """The model is loaded and warmed (readiness): route traffic here only when 200."""
        if not state["ready"]:
            return JSONResponse({"status": "not_ready"}, 503)
        return {"status": "ready", "model": info, "queue": batcher.queued}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus():
        """Prometheus text exposition."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(_Limits, metrics=metrics, max_body=settings.max_body_bytes, endpoints=endpoints)
    return app


def run_serve(args: Any) -> int:
    import uvicorn
    from threadpoolctl import threadpool_limits

    settings = ServeSettings.resolve(
        {k: v for k, v in vars(args).items() if k in {f.name for f in fields(ServeSettings)}}
    ).plan_cpu()
    if not Path(settings.artifact).is_dir():
        raise FileNotFoundError(f"--artifact {settings.artifact}: directory not found")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # numpy's OpenBLAS pool (novelty's small matmuls, one per batch) would spin a second core after every batch
    threadpool_limits(1, user_api="blas")
    # the model's own batches are the micro-batches: one session call per length group of a gathered batch
    model = TriageModel.load(
        settings.artifact,
        precision=settings.precision,
        threads=settings.threads,
        batch_size=settings.max_batch,
        allow_spinning=False,
    )
    app = create_app(model, settings)
    log.info("settings: %s", asdict(settings))
    # uvicorn handles SIGTERM (stop accepting, finish in-flight requests, lifespan shutdown) and then re-raises
    # it; with this no-op as the handler it restores, a drained shutdown ends with exit code 0, not -15
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout or None,
    )
    return 0
