"""The FastAPI application: native, OpenRLHF and KServe v2 / Triton endpoints over one batcher.

    app = create_app(rewardforge.load("runs/quickstart/model"), ServeConfig())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every error is answered as ``{"error": "message"}`` (the shape tritonclient reads) with a 4xx for
the client's mistakes, 503 + ``Retry-After`` when the queue is full and 500 only for server faults,
whose details (exception, traceback, file names) go to the log, never to the client. A request joins
the batcher only once its whole body is in, and leaves the queue if its client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from starlette.requests import ClientDisconnect

from rewardforge import __version__
from rewardforge.serve.batcher import BatcherClosed, DynamicBatcher, QueueFull, ScoringFailed
from rewardforge.serve.config import ServeConfig
from rewardforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from rewardforge.serve.service import ScoringService, ServeError, unless_disconnected

log = logging.getLogger("rewardforge.serve")

# Paths that answer without an API key: liveness and readiness probes.
PUBLIC_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})


# ---------------------------------------------------------------- request / response models


class Message(BaseModel):
    """One chat message; extra keys (name, tool_calls...) are passed to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr


class ScoreItem(BaseModel):
    """One thing to score, in exactly one of four forms:

    * ``{"prompt", "response"}``: strings (one user / one assistant turn) or message lists;
    * ``{"messages"}``: a conversation whose last message is the assistant response scored;
    * ``{"text"}``: text already in the model's format, used verbatim;
    * ``{"input_ids"}``: token ids of the model's tokenizer, used verbatim (no special tokens added).
    """

    model_config = ConfigDict(extra="forbid")
    prompt: Optional[Union[StrictStr, list[Message]]] = None
    response: Optional[Union[StrictStr, list[Message]]] = None
    messages: Optional[list[Message]] = None
    text: Optional[StrictStr] = None
    input_ids: Optional[list[StrictInt]] = None

    @model_validator(mode="after")
    def _one_form(self) -> "ScoreItem":
        pr = (self.prompt is not None) + (self.response is not None)
        forms = (pr == 2) + (self.messages is not None) + (self.text is not None) + (self.input_ids is not None)
        if pr == 1:
            raise ValueError("give both prompt and response")
        if forms != 1:
            raise ValueError("give exactly one of: prompt+response, messages, text, input_ids")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem] = Field(description="the items to score; results come back in this order")
    return_text: bool = Field(False, description="add the text the model read to each result (the kept part when "
                              "truncated: tokenizer(text) gives the ids scored)")
    return_tokens: bool = Field(False, description="add the exact token ids the model read to each result")
    normalize: Optional[bool] = Field(None, description="normalise text and token-id items to the model's input format "
                                      "(padding, doubled BOS, trailing EOS, end-of-turn suffix); default: the server's "
                                      "--normalize-inputs")


class ScoreResult(BaseModel):
    reward: float = Field(description="raw reward; for regression models the weighted combination of the attributes")
    reward_normalized: float = Field(description="(reward - reward_mean) / reward_std with the statistics stored at export")
    num_tokens: int = Field(description="tokens fed to the model")
    truncated: bool = Field(description="whether the input was truncated to the model's max_length")
    attributes: Optional[dict[str, float]] = Field(None, description="regression models: every attribute by name")
    text: Optional[str] = Field(None, description="the text the model read (with return_text)")
    tokens: Optional[list[int]] = Field(None, description="the token ids the model read (with return_tokens)")
    normalized: Optional[list[str]] = Field(None, description="what normalisation changed in this item, if anything")
    reward_mean: Optional[float] = Field(None, description="ensembles: the members' mean reward (reward = reward_mean - "
                                         "--uncertainty-penalty x reward_std)")
    reward_std: Optional[float] = Field(None, description="ensembles: the standard deviation of the members' rewards")
    members: Optional[list[float]] = Field(None, description="ensembles: every member's reward, member_0 first")


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreResult]


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request (``--remote_rm_url`` / ``--reward.remote_url``)."""

    model_config = ConfigDict(extra="allow")
    query: Union[StrictStr, list[StrictStr]] = Field(
        description="full sequences (prompt + response) as the policy decoded them, special tokens and padding included")
    prompts: Optional[list[StrictStr]] = Field(
        None, description="each query's prompt: the response is the query after it (with --policy-tokenizer the "
        "query is parsed into messages and rendered with the reward model's template)")
    labels: Optional[list[Any]] = Field(None, description="OpenRLHF's labels; not used by a reward model")
    normalize: Optional[bool] = Field(None, description="default: the server's --normalize-inputs")


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="one reward per query (raw or normalized per --compat-reward)")
    scores: list[float] = Field(description="the same rewards (OpenRLHF reads 'scores' for dynamic filtering)")
    extra_logs: dict[str, list[float]] = Field(
        description="per query: truncated (0/1), num_tokens, normalized (0/1: the input was changed), each "
        "attribute of a regression model, and for ensembles reward_mean, reward_std and member_0..member_K-1")


# ---------------------------------------------------------------- middleware


class _BodyTooLarge(Exception):
    """The request body passed --max-body-bytes while it was being read."""


class _BodyTimeout(Exception):
    """The request body did not arrive within --body-timeout-s."""


INTERNAL_ERROR = "internal server error; the details are in the server log"


class ServeMiddleware:
    """Pure ASGI middleware: API key, request body size and time limits, per-route request metrics,
    and a generic 500 (logged with its traceback, never sent to the client) for unexpected errors."""

    def __init__(self, app, *, config: ServeConfig, metrics: ServeMetrics, api_key: str | None):
        self.app, self.config, self.metrics = app, config, metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        path = scope.get("path", "")
        route = "unmatched"  # a label per route template, never per raw path
        try:
            if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
                self.metrics.rejected.inc(1, "unauthorized")
                return await _send_error(send_wrapper, 401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                                         {"www-authenticate": "Bearer"})
            limit = self.config.max_body_bytes
            length = _header(scope, b"content-length")
            if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
                self.metrics.rejected.inc(1, "body_too_large")
                return await _send_error(send_wrapper, 413, _body_message(limit))
            received = [0]
            body_done = [False]
            timeout = self.config.body_timeout_s

            async def receive_limited():
                if body_done[0]:  # after the body only http.disconnect comes: no deadline
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), max(t0 + timeout - time.perf_counter(), 0.0))
                except asyncio.TimeoutError:
                    raise _BodyTimeout() from None
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > limit:
                        raise _BodyTooLarge()
                    body_done[0] = not message.get("more_body", False)
                else:
                    body_done[0] = True
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except _BodyTooLarge:
                self.metrics.rejected.inc(1, "body_too_large")
                if not started[0]:
                    await _send_error(send_wrapper, 413, _body_message(limit))
            except _BodyTimeout:
                self.metrics.rejected.inc(1, "body_timeout")
                if not started[0]:
                    await _send_error(send_wrapper, 408, f"the request body did not arrive within body_timeout_s={timeout:g} "
                                      "seconds (--body-timeout-s)", {"connection": "close"})
            except ClientDisconnect:
                status[0] = 499  # the client went away: nobody to answer
            except Exception:  # noqa: BLE001 - a bug: log it whole, tell the client nothing about the server
                log.exception("internal error answering %s %s", scope.get("method"), path)
                if not started[0]:
                    await _send_error(send_wrapper, 500, INTERNAL_ERROR)
            r = scope.get("route")
            route = getattr(r, "path", None) or "unmatched"
        finally:
            self.metrics.requests.inc(1, route, str(status[0]))
            self.metrics.request_latency.observe(time.perf_counter() - t0, route)

    def _authorized(self, scope) -> bool:
        value = b""
        for k, v in scope.get("headers", ()):
            if k.lower() == b"authorization":
                value = v
                break
        scheme, _, token = value.partition(b" ")
        # the raw header bytes against the key's UTF-8 bytes, in constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _body_message(limit: int) -> str:
    return f"request body exceeds max_body_bytes={limit} (--max-body-bytes)"


def _printable(message: str) -> str:
    """The message as valid UTF-8: a lone surrogate echoed from the request becomes '?'."""
    return message.encode("utf-8", "replace").decode("utf-8")


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": _printable(message)}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _printable(message)}, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """(status, message) for pydantic errors: 400 for malformed JSON, 422 for the wrong shape or types."""
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return 400, f"malformed JSON: {ctx.get('error') or e.get('msg', 'cannot parse the body')}"
    parts = []
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Validate the JSON body against ``model`` whatever the Content-Type (as OpenRLHF's server does)."""
    raw = await request.body()
    if not raw.strip():
        raise ServeError(400, "empty request body; send a JSON object", reason="malformed_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        status, message = _validation_message(e.errors(include_url=False))
        raise ServeError(status, message, reason="malformed_json" if status == 400 else "invalid") from None


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


# ---------------------------------------------------------------- OpenAPI: what the middleware and handlers answer


_ERROR = {"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS_ANY = {"500": "internal error (the details are in the server log, never in the body)"}
_ERRORS_AUTH = {"401": "missing or wrong API key (when the server has one)"}
_ERRORS_BODY = {
    "400": "malformed request: JSON that does not parse, or (v2) tensors that do not fit their shapes",
    "408": "the request body did not arrive within --body-timeout-s",
    "413": "over a limit: --max-body-bytes, --max-items-per-request or --max-item-tokens",
    "422": "well-formed JSON of the wrong shape or types, or an item that cannot be scored",
    "503": "the queue is full (with Retry-After) or the server is shutting down",
}
_ERRORS_MODEL = {"404": "unknown model name or version"}
_ERRORS_READY = {"503": "not ready (starting or shutting down)"}
_NO_BODY = ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}/ready")

_INFER_SCHEMAS: dict[str, Any] = {
    "InferInput": {
        "title": "InferInput", "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": ["sentences", "tokens", "sequence_lengths"]},
            "datatype": {"type": "string", "description": "BYTES for sentences; an integer type (INT64...) for the others"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "description": "the elements, flat or nested (JSON tensors)"},
            "parameters": {"type": "object", "description": "binary_data_size: the input's bytes after the JSON header"},
        },
    },
    "InferRequestedOutput": {
        "title": "InferRequestedOutput", "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "enum": ["rewards", "attributes"]},
                       "parameters": {"type": "object", "description": "binary_data: return this output as binary"}},
    },
    "InferRequest": {
        "title": "InferRequest", "type": "object", "required": ["inputs"],
        "description": "KServe v2 inference request (JSON; or this header followed by binary tensors, with "
        "Inference-Header-Content-Length)",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "binary_data_output: every output as binary"},
            "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/InferInput"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferRequestedOutput"}},
        },
    },
    "InferOutput": {
        "title": "InferOutput", "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                       "shape": {"type": "array", "items": {"type": "integer"}},
                       "data": {"type": "array", "items": {"type": "number"}}, "parameters": {"type": "object"}},
    },
    "InferResponse": {
        "title": "InferResponse", "type": "object", "required": ["model_name", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                       "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferOutput"}}},
    },
}


def _document_errors_and_auth(schema: dict[str, Any], *, auth: bool) -> None:
    """Add to every operation the error statuses it can answer (all as ``{"error": message}``), the v2
    inference body, and the bearer scheme when the server has an API key."""
    components = schema["components"]["schemas"]
    components["Error"] = {"title": "Error", "type": "object", "required": ["error"],
                           "properties": {"error": {"type": "string"}}}
    components.update(_INFER_SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body; ours is an Error
        components.pop(name, None)
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            errors = dict(_ERRORS_ANY)
            if path not in PUBLIC_PATHS:
                errors.update(_ERRORS_AUTH)
                if auth:
                    op["security"] = [{"bearer": []}]
            if method == "post":
                errors.update(_ERRORS_BODY)
            if path.startswith("/v2/models/"):
                errors.update(_ERRORS_MODEL)
            if path in _NO_BODY or path == "/health":
                errors.update(_ERRORS_READY)
            if path.endswith("/infer"):
                errors["415"] = "unsupported Content-Encoding (gzip, deflate or none)"
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}}}
                responses["200"] = {"description": "the outputs, as JSON or (binary_data) a JSON header and binary tensors",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
            if path in _NO_BODY:
                responses["200"] = {"description": "live / ready (empty body)"}
            for code, text in sorted(errors.items()):
                if code == "503" and path == "/health":  # the same body as the 200
                    responses[code] = {"description": text, "content": responses.get("200", {}).get("content", {})}
                    continue
                if code == "503" and path in _NO_BODY:
                    responses[code] = {"description": text}
                    continue
                responses[code] = {**_ERROR, "description": text}


# ---------------------------------------------------------------- the app


def _item_dict(item: ScoreItem) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if item.input_ids is not None:
        d["input_ids"] = item.input_ids
    elif item.text is not None:
        d["text"] = item.text
    elif item.messages is not None:
        d["messages"] = [m.model_dump() for m in item.messages]
    else:
        d["prompt"] = item.prompt if isinstance(item.prompt, str) else [m.model_dump() for m in item.prompt]
        d["response"] = item.response if isinstance(item.response, str) else [m.model_dump() for m in item.response]
    return d


def create_app(scorer, serve_config: ServeConfig | None = None, *, metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``scorer`` (a :class:`rewardforge.scoring.RewardScorer`).

    The batcher's worker thread starts with the app's lifespan and, on shutdown, finishes every
    queued sequence before it stops (uvicorn first lets in-flight requests complete).
    """
    from rewardforge.serve import triton

    cfg = (serve_config or ServeConfig()).validate()
    dtype = next(scorer.model.parameters()).dtype
    if dtype != cfg.torch_dtype():
        raise ValueError(f"the scorer's model is {dtype} but the serve config says dtype={cfg.dtype}; load it with "
                         f"rewardforge.load(..., dtype={cfg.torch_dtype()}) or set dtype to match")
    metrics = metrics or ServeMetrics()
    service = _service(scorer, cfg, metrics)
    batcher = service.batcher

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("rewardforge serve: model ready (%s outputs, max_length %d)", scorer.model.num_outputs, service.max_length)
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish; drain whatever is still queued
            await asyncio.to_thread(batcher.stop, cfg.graceful_timeout_s)
            service.close()

    app = FastAPI(
        title="rewardforge reward model server",
        version=__version__,
        description="Scores responses with an exported rewardforge reward model. Requests from every client are "
        "batched together; results come back in input order.",
        lifespan=lifespan,
    )
    app.state.service, app.state.batcher, app.state.metrics, app.state.config = service, batcher, metrics, cfg
    app.add_middleware(ServeMiddleware, config=cfg, metrics=metrics, api_key=cfg.resolved_api_key())
    _add_error_handlers(app, metrics)
    _add_operations(app, service, metrics)
    _add_scoring(app, service)
    triton.add_routes(app, service)
    _install_openapi(app, cfg)
    return app


def _service(scorer, cfg: ServeConfig, metrics: ServeMetrics) -> ScoringService:
    """The scoring service over a dynamic batcher, reporting to ``metrics``."""
    batcher = DynamicBatcher(
        scorer.model, scorer.tokenizer.pad_token_id, scorer.model.num_outputs, device=scorer.device,
        max_batch_items=cfg.max_batch_items, max_batch_tokens=cfg.max_batch_tokens, max_wait_ms=cfg.max_wait_ms,
        max_queue_items=cfg.max_queue_items, max_padding=cfg.resolved_max_padding(str(scorer.device)),
        threads=cfg.resolved_threads(str(scorer.device)), tokens_per_thread=cfg.tokens_per_thread, metrics=metrics,
    )
    service = ScoringService(scorer, cfg, batcher)
    metrics.bind(lambda: batcher.queue_depth, lambda: batcher.inflight)

    def count_normalized(counts: dict[str, int]) -> None:
        for action, n in counts.items():
            if n:
                metrics.normalized.inc(n, action)

    service.on_normalized = count_normalized
    return service


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error as ``{"error": message}`` with its status, counted in ``rewardforge_rejected_total{reason}``."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        metrics.rejected.inc(1, exc.reason)
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, message = _validation_message(list(exc.errors()))
        metrics.rejected.inc(1, "malformed_json" if status == 400 else "invalid")
        return error_response(status, message)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        metrics.rejected.inc(1, "queue_full")
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed):
        metrics.rejected.inc(1, "shutting_down")
        return error_response(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(ScoringFailed)
    async def _model_failed(request: Request, exc: ScoringFailed):
        return error_response(500, str(exc))


def _add_operations(app: FastAPI, service: ScoringService, metrics: ServeMetrics) -> None:
    """``/health`` and ``/metrics``."""
    batcher, cfg = service.batcher, service.config

    @app.get("/health", tags=["operations"], summary="liveness and readiness")
    async def health():
        ready = batcher.running
        body = {"status": "ok" if ready else "unavailable", "ready": ready, "model": cfg.model_name, "dtype": cfg.dtype,
                "queue_depth": batcher.queue_depth, "inflight_requests": batcher.inflight}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)


def _score_results(service: ScoringService, req: "ScoreRequest", prepared, s) -> list[dict[str, Any]]:
    """The ``results`` of a ``/v1/score`` answer, one per item in input order."""
    multi = len(service.attributes) > 1
    results = []
    for i in range(len(req.items)):
        r: dict[str, Any] = {
            "reward": float(s.reward[i]), "reward_normalized": float(s.normalized[i]),
            "num_tokens": int(prepared.num_tokens[i]), "truncated": bool(prepared.truncated[i]),
        }
        if multi:
            r["attributes"] = {a: float(v) for a, v in zip(service.attributes, s.outputs[i])}
        if s.members is not None:
            r["reward_mean"], r["reward_std"] = float(s.mean[i]), float(s.std[i])
            r["members"] = [float(v) for v in s.members[i]]
        if req.return_text:
            r["text"] = service.read_text(prepared, i)
        if req.return_tokens:
            r["tokens"] = [int(x) for x in prepared.seqs[i]]
        if prepared.normalized and prepared.normalized[i]:
            r["normalized"] = prepared.normalized[i]
        results.append(r)
    return results


def _get_reward_items(req: "GetRewardRequest") -> list[dict[str, Any]]:
    """OpenRLHF's ``query`` (one string or a list) and optional ``prompts`` as items of the service."""
    queries = [req.query] if isinstance(req.query, str) else req.query
    prompts = req.prompts
    if prompts is not None and len(prompts) != len(queries):
        raise ServeError(422, f"prompts has {len(prompts)} entries but query has {len(queries)}; send one "
                         "prompt per query (or no prompts)")
    return [{"text": q} if prompts is None else {"text": q, "prompt": p}
            for q, p in zip(queries, prompts or [None] * len(queries))]


def _get_reward_body(service: ScoringService, prepared, s) -> dict[str, Any]:
    """``{"rewards", "scores", "extra_logs"}``: what OpenRLHF's remote reward model client reads."""
    rewards = [float(x) for x in service.compat(s)]
    extra: dict[str, list[float]] = {
        "truncated": [float(x) for x in prepared.truncated],
        "num_tokens": [float(x) for x in prepared.num_tokens],
        "normalized": [float(bool(a)) for a in prepared.normalized],
    }
    if len(service.attributes) > 1:
        for j, name in enumerate(service.attributes):
            extra[name] = [float(v) for v in s.outputs[:, j]]
    if s.members is not None:  # ensembles: the mean, the std and each member, raw
        extra["reward_mean"], extra["reward_std"] = [float(v) for v in s.mean], [float(v) for v in s.std]
        for k in range(s.members.shape[1]):
            extra[f"member_{k}"] = [float(v) for v in s.members[:, k]]
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra}


def _add_scoring(app: FastAPI, service: ScoringService) -> None:
    """``/v1/score`` (native) and ``/get_reward`` (OpenRLHF)."""
    batcher, cfg = service.batcher, service.config

    @app.post("/v1/score", tags=["scoring"], response_model=ScoreResponse, summary="score items (native endpoint)",
              openapi_extra=_body_doc(ScoreRequest))
    async def score(request: Request):
        await request.body()  # the whole body first: a slow client must not hold up a forming batch
        ticket = batcher.announce()  # a batch forming now waits for this request's tokens
        try:
            req: ScoreRequest = await parse_body(request, ScoreRequest)
            service.check_count(len(req.items), "items")
            prepared = await service.prepare([_item_dict(it) for it in req.items], "items", req.normalize)
            s = await unless_disconnected(request.receive, service.score(prepared, ticket))
        finally:
            batcher.withdraw(ticket)
        return JSONResponse({"model": cfg.model_name, "results": _score_results(service, req, prepared, s)})

    @app.post("/get_reward", tags=["compatibility"], response_model=GetRewardResponse,
              summary="OpenRLHF remote reward model protocol (--remote_rm_url)", openapi_extra=_body_doc(GetRewardRequest))
    async def get_reward(request: Request):
        await request.body()
        ticket = batcher.announce()
        try:
            req: GetRewardRequest = await parse_body(request, GetRewardRequest)
            items = _get_reward_items(req)
            if items:  # OpenRLHF shards its list over several servers: an empty shard is answered, not refused
                service.check_count(len(items), "query")
            prepared = await service.prepare(items, "query", req.normalize)
            s = await unless_disconnected(request.receive, service.score(prepared, ticket))
        finally:
            batcher.withdraw(ticket)
        return JSONResponse(_get_reward_body(service, prepared, s))


def _install_openapi(app: FastAPI, cfg: ServeConfig) -> None:
    """The OpenAPI document: the bodies parse_body reads, every error status and the bearer scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, GetRewardRequest):  # bodies parsed by parse_body, documented here
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            _document_errors_and_auth(schema, auth=cfg.resolved_api_key() is not None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
