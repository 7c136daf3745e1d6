"""`attnkit serve`: an OpenAI-compatible HTTP API over one checkpoint (FastAPI + uvicorn).

Endpoints in OpenAI's shapes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(the model's chat template) for text generators, ``POST /v1/embeddings`` for encoders; ``stream: true``
answers with server-sent events (``data: {chunk}`` ... ``data: [DONE]``). Every error carries OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``.

Two layers. The HTTP layer validates a request, checks its limits and turns it into
``GenerationRequest``s; it never decodes. The ``Scheduler`` owns the model: ``submit`` admits
requests (or refuses them: ``Busy``) and gives back a ``Job`` per request, an async iterator of
text pieces that ``cancel()`` stops at the next token. One worker thread owns the model and runs
continuous batching (``attnkit.generate.ContinuousBatch``): a request joins the running rows at
the next decoding step and leaves when it finishes.

Nothing a client sends names a file: the checkpoint is loaded once at start, and the ``model``
field only has to name it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from attnkit.errors import AttnkitError, a_family
from attnkit.generate import (ContinuousBatch, Request as BatchedRequest, Sampling, StreamEnd, TextStream, _encode_prompt, _stop_ids,
                              stream_text, text_sampling)

log = logging.getLogger("attnkit.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_CHOICES = 16  # the largest n
SHUTDOWN_GRACE_S = 2.0  # a stream's time, once the server begins to shut down, to send its error event


# --- the scheduler: requests in, pieces of text out ---------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: the prompt text (a chat: the rendered conversation) and how."""

    prompt: str
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None


class Busy(Exception):
    """The scheduler holds as many requests as it may."""


class Timeout(Exception):
    """A request ran past the scheduler's timeout."""


class Cancelled(Exception):
    """A job was cancelled (its client left) before it finished."""


class Job:
    """One request's stream of text: ``async for piece in job`` reads it as it is generated; then
    ``job.end`` (a ``StreamEnd``, or a call's result) says how it ended. ``cancel()`` stops the work
    at its next token; a job past its deadline cancels itself and raises ``Timeout``."""

    def __init__(self, work, loop: asyncio.AbstractEventLoop, deadline: float | None):
        self.work = work  # a GenerationRequest, or a callable run on the worker (embeddings)
        self.end: Any = None
        self._loop, self._deadline = loop, deadline
        self._items: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __aiter__(self) -> "Job":
        return self

    async def __anext__(self) -> str:
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            kind, value = await asyncio.wait_for(self._items.get(), left)
        except asyncio.TimeoutError:
            self.cancel()
            raise Timeout() from None
        if kind == "piece":
            return value
        if kind == "error":
            raise value
        self.end = value
        raise StopAsyncIteration

    # the worker's side: hand an item to the event loop that reads this job
    def _put(self, kind: str, value) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (shutdown): nobody reads this job any more
            pass


@dataclass
class _Generation:
    """A generation in the running batch: its job, its request in the batch and its text so far."""

    job: Job
    request: BatchedRequest
    text: TextStream


class Scheduler:
    """Runs requests on one model and streams their text back.

    At most ``max_concurrent`` requests are in it at once, decoding or waiting their turn; ``submit``
    refuses more with ``Busy``. One worker thread owns the model. With ``batching`` (eager decoding
    of a dense decoder LM, ``ContinuousBatch.supports``) it runs continuous batching: a request joins
    the running rows at the next decoding step and leaves when it finishes, every step one forward
    for all of them (``attnkit.generate.ContinuousBatch``, over the decoding loop's decode state);
    otherwise it decodes one request at a time through ``stream_text``. A job cancelled (its client
    left, or it timed out) stops at its next token and frees its row. ``cancelled`` counts those
    jobs; ``steps`` and ``row_steps`` count batched decoding steps and the rows they ran."""

    def __init__(self, model, tokenizer, *, max_concurrent: int = 16, timeout: float | None = None,
                 compile: bool = False, batching: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrent, self.timeout, self.compile = max_concurrent, timeout, compile
        self.batching = batching and ContinuousBatch.supports(model, compile)
        self.cancelled = self.steps = self.row_steps = 0
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished (decoding or waiting)."""
        return self._in_flight

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="attnkit-serve", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, requests: Sequence[GenerationRequest]) -> list[Job]:
        """One job per request (a request's n choices, say), admitted all together or not at all
        (``Busy``). Call it from the event loop that will read the jobs."""
        return self._admit(list(requests))

    async def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` run on the worker (it owns the model), admitted like one request."""
        [job] = self._admit([functools.partial(fn, *args, **kwargs)])
        try:
            async for _ in job:
                pass
            return job.end
        finally:
            job.cancel()  # nothing once it has run; skipped if it has not started

    def _admit(self, works: list) -> list[Job]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._in_flight + len(works) > self.max_concurrent:
                raise Busy()
            self._in_flight += len(works)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        jobs = [Job(work, loop, deadline) for work in works]
        for job in jobs:
            self._queue.put(job)
        return jobs

    def _done(self, job: Job, kind: str, value) -> None:
        """A job ends (its end, or an error) and leaves its place."""
        job._put(kind, value)
        with self._lock:
            self._in_flight -= 1

    def _arrived(self, wait: bool) -> list[Job] | None:
        """The jobs that have arrived (waiting for one if ``wait``), or None once the scheduler closes."""
        jobs = []
        try:
            job = self._queue.get(block=wait)
            while job is not None:
                jobs.append(job)
                job = self._queue.get_nowait()
            return None
        except queue.Empty:
            return jobs

    def _work(self) -> None:
        batch = ContinuousBatch(self.model, pad_id=self.tokenizer.eos_id or 0, max_rows=self.max_concurrent)
        running: list[_Generation] = []
        while (jobs := self._arrived(wait=not running)) is not None:
            for job in jobs:
                try:
                    if job.cancelled:
                        self._stopped(job)
                    elif not isinstance(job.work, GenerationRequest):
                        self._done(job, "end", job.work())
                    elif self.batching:
                        running.append(self._join(batch, job))
                    else:
                        self._decode(job)
                except Exception as e:
                    self._failed(job, e)
            if running:
                try:
                    self._step(batch, running)
                except Exception as e:  # the batch is lost: every request in it fails
                    for g in running:
                        self._failed(g.job, e)
                    running.clear()
                    batch = ContinuousBatch(self.model, pad_id=batch.pad_id, max_rows=batch.max_rows)

    def _failed(self, job: Job, e: Exception) -> None:
        """AttnkitError: the request's fault (400); anything else: ours (500)."""
        if not isinstance(e, AttnkitError):
            log.exception("request failed")
        self._done(job, "error", e)

    def _join(self, batch: ContinuousBatch, job: Job) -> _Generation:
        r: GenerationRequest = job.work
        ids = _encode_prompt(self.tokenizer, r.prompt, self.model.cfg.bos_id)
        stop_ids = sorted({*_stop_ids(self.tokenizer, self.model), *r.stop_ids})
        request = batch.submit(BatchedRequest(ids, r.max_tokens, text_sampling(r.sampling, self.tokenizer), stop_ids,
                                              r.seed))
        return _Generation(job, request, TextStream(self.tokenizer, r.stop))

    def _step(self, batch: ContinuousBatch, running: list[_Generation]) -> None:
        """One step of the batch; each request's new text goes to its job; finished ones end."""
        for g in running:
            if g.job.cancelled:
                batch.cancel(g.request)
        rows = len(batch.running)
        by_request = {id(g.request): g for g in running}
        for request, token in batch.step():
            g = by_request[id(request)]  # one token per request and step
            piece = g.text.push(token)
            if piece:
                g.job._put("piece", piece)
            if g.text.stopped:  # a stop string: done here; the row leaves at the next step
                batch.cancel(request)
        if rows:
            self.steps, self.row_steps = self.steps + 1, self.row_steps + rows
        for g in [g for g in running if g.text.stopped or g.request.finish_reason is not None]:
            running.remove(g)
            if g.text.stopped:
                self._done(g.job, "end", StreamEnd("stop", len(g.request.tokens)))
            elif g.request.finish_reason == "cancelled":
                self._stopped(g.job)
            elif g.request.finish_reason == "error":  # this request's failure; the others in the batch go on
                self._failed(g.job, g.request.error)
            else:
                piece = g.text.flush()
                if piece:
                    g.job._put("piece", piece)
                # a stop id counts as a generated token, as in stream_text
                tokens = len(g.request.tokens) + (g.request.finish_reason == "stop")
                self._done(g.job, "end", StreamEnd("stop" if g.text.stopped else g.request.finish_reason, tokens))

    def _decode(self, job: Job) -> None:
        """One request alone, start to end (a model whose decode states cannot take new rows)."""
        r: GenerationRequest = job.work
        pieces = stream_text(self.model, self.tokenizer, r.prompt, max_new_tokens=r.max_tokens, sampling=r.sampling,
                             stop=r.stop, seed=r.seed, compile=self.compile, stop_ids=r.stop_ids)
        try:
            while not job.cancelled:  # checked between tokens
                try:
                    piece = next(pieces)
                except StopIteration as end:
                    self._done(job, "end", end.value)
                    return
                job._put("piece", piece)
            self._stopped(job)
        finally:
            pieces.close()

    def _stopped(self, job: Job) -> None:
        """A cancelled job ends: counted, and whoever still reads it is told."""
        with self._lock:
            self.cancelled += 1
        self._done(job, "error", Cancelled())


# --- errors in OpenAI's shape ------------------------------------------------------------------------

class APIError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _as_api_error(e: Exception) -> APIError:
    """What a job's failure means to the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Timeout):
        return APIError(504, "the request ran past the server's timeout; ask for fewer tokens or raise --timeout",
                        type="server_error", code="timeout")
    if isinstance(e, Cancelled):  # nginx's "client closed request": seen only in logs, the client has gone
        return APIError(499, "the request was cancelled", code="cancelled")
    if isinstance(e, Busy):
        return APIError(503, "the server is busy (its queue is full); retry shortly", type="server_error",
                        code="server_busy")
    if isinstance(e, AttnkitError):
        return APIError(400, str(e))
    return APIError(500, f"the server failed on this request ({type(e).__name__}); see its log", type="server_error")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over the server's limit of {self.max_bytes} bytes; send less",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = self._too_large() if declared.isdigit() else APIError(400, "the Content-Length header is not a number")
            return await error.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


# --- request bodies -----------------------------------------------------------------------------------

def _strings(value, what: str) -> list[str]:
    """A string or a list of strings -> a list of strings; else the field's error."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"must be {what}")


class Body(BaseModel):
    """A JSON body: unknown fields and wrong types are errors (no "5" for 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class Sampled(Body):
    """The fields completions and chat share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Any = []  # -> a list of strings
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_CHOICES)  # choice i samples with seed + i
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value):
        if value is None:
            return []
        stops = _strings(value, "a string or a list of up to 4 strings")
        if len(stops) > 4 or not all(stops):
            raise ValueError("must be a string or a list of up to 4 non-empty strings")
        return stops


class CompletionBody(Sampled):
    prompt: Any

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value):
        prompts = _strings(value, "a string or a list of strings (token ids are not accepted)")
        if not prompts:
            raise ValueError("must not be an empty list")
        return prompts


class Message(Body):
    role: str
    content: Any
    name: str | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                           and isinstance(p["text"], str) for p in value):
            return "".join(p["text"] for p in value)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


class ChatBody(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AttentionBody(Body):
    text: str | None = None
    messages: list[Message] | None = None
    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)


ATTENTION_TOKENS = 256  # the longest text the playground's attention view is computed for


class EmbeddingBody(Body):
    model: str
    input: Any
    encoding_format: str = "float"
    user: str | None = None

    @field_validator("input", mode="plain")
    @classmethod
    def _input(cls, value):
        texts = _strings(value, "a string or a list of strings (token ids are not accepted)")
        if not texts or not all(t.strip() for t in texts):
            raise ValueError("must be a non-empty text or list of non-empty texts")
        return texts

    @field_validator("encoding_format", mode="after")
    @classmethod
    def _format(cls, value):
        if value not in ("float", "base64"):
            raise ValueError('must be "float" or "base64"')
        return value


def _where(loc) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _validation_error(e, schema) -> APIError:
    """pydantic's first complaint as one sentence naming the field."""
    error = e.errors()[0]
    where, kind, message = _where(error["loc"]), error["type"], error["msg"]
    if kind == "extra_forbidden":
        if len(error["loc"]) == 1:
            fields = ", ".join(schema.model_fields)
            return APIError(400, f"unknown field '{where}'; this endpoint accepts {fields}", param=where)
        return APIError(400, f"unknown field '{where}'", param=where)
    if kind == "missing":
        return APIError(400, f"'{where}' is required", param=where)
    message = message.removeprefix("Value error, ").replace("Input should be", "must be")
    return APIError(400, f"'{where}' {message}", param=where)


async def _parse(request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, schema) from None


# --- the app ------------------------------------------------------------------------------------------

def _plain_messages(messages) -> list[dict]:
    """Request messages as render_chat takes them (OpenAI's "developer" role is the system message)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]


def _kind_of(model, tokenizer, source: str) -> str:
    """'generate' (a text LM: completions and chat) or 'embed' (an encoder); anything else is an error."""
    from attnkit.media import media_layout

    family = getattr(model.cfg, "family", None)
    if tokenizer is None:
        raise AttnkitError(f"{source} has no tokenizer.json; serve a checkpoint with its tokenizer")
    if family == "encoder":
        return "embed"
    if family in ("decoder", "gru") and media_layout(model.cfg) is None:
        return "generate"
    what = f"{media_layout(model.cfg).kind} model" if media_layout(model.cfg) is not None else f"{family} model"
    raise AttnkitError(f"{source} is a {what}; serve takes a text decoder (completions, chat) or an encoder "
                       "(embeddings)")


def create_app(model, tokenizer, *, model_name: str, api_key: str | None = None, max_tokens_cap: int = 2048,
               max_concurrent: int = 16, timeout: float | None = 300.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               compile: bool = False, batching: bool = True):
    """The FastAPI app serving ``model`` under ``model_name``; ``app.state.scheduler`` runs its requests
    (started and stopped with the app); ``batching`` False decodes one request at a time."""
    import contextlib

    for name, value in (("--max-tokens-cap", max_tokens_cap), ("--max-concurrent", max_concurrent),
                        ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise AttnkitError(f"{name} must be at least 1, got {value}")
    if timeout is not None and timeout <= 0:
        raise AttnkitError(f"--timeout must be a positive number of seconds, got {timeout}")
    kind = _kind_of(model, tokenizer, model_name)
    context = model.cfg.context_length
    scheduler = Scheduler(model, tokenizer, max_concurrent=max_concurrent, timeout=timeout, compile=compile,
                          batching=batching)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="attnkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        if e.status_code == 404:
            return APIError(404, f"there is no {request.method} {request.url.path} here; this server answers "
                                 "GET /v1/models and POST /v1/completions, /v1/chat/completions, /v1/embeddings",
                            code="not_found").response()
        if e.status_code == 405:
            return APIError(405, f"{request.url.path} does not take {request.method}", code="method_not_allowed").response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return APIError(400, "the request is not valid: " + "; ".join(err["msg"] for err in e.errors())).response()

    async def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # the scheme's name is case-insensitive (RFC 7235)
            raise APIError(401, "no API key was given; send it as the header 'Authorization: Bearer KEY' (the "
                                "server's --api-key)", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "the API key is wrong; send the server's --api-key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "attnkit"}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def require(wanted: str, endpoint: str) -> None:
        if kind != wanted:
            raise APIError(400, f"{model_name} is {a_family(model.cfg.family)} model; it serves "
                                f"{'/v1/embeddings' if kind == 'embed' else '/v1/completions and /v1/chat/completions'}"
                                f", not {endpoint}")

    def prepare(prompt: str, max_tokens: int | None, default: int | None, param: str) -> tuple[int, int]:
        """(prompt tokens, max_tokens) within the cap and the model's context, else a 400. ``default``
        None: as many tokens as the context leaves (up to the cap)."""
        n_prompt = len(_encode_prompt(tokenizer, prompt, model.cfg.bos_id))
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty; give some text to continue", param=param)
        if max_tokens is not None and max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of {max_tokens_cap}; ask for "
                                "fewer", param="max_tokens")
        if max_tokens is None:
            max_tokens = default if default is not None else min(max_tokens_cap, context - n_prompt)
            max_tokens = min(max_tokens, max_tokens_cap)
        if n_prompt + max_tokens > context or max_tokens < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens; with max_tokens {max_tokens} it exceeds the model's "
                                f"context of {context} tokens: shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
        return n_prompt, max_tokens

    def requests_for(body, prompts: list[str], limits: list[int], stop_ids: Sequence[int]) -> list[GenerationRequest]:
        n = body.n or 1
        if n * len(prompts) > max_concurrent:
            raise APIError(400, f"this request asks for {n * len(prompts)} completions; this server runs at most "
                                f"{max_concurrent} at once (--max-concurrent)", param="n")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = body.top_p if body.top_p is not None and body.top_p < 1 else None
        sampling = Sampling(temperature=temperature, top_p=top_p)
        try:
            sampling.validate()
        except AttnkitError as e:
            raise APIError(400, str(e)) from None
        return [GenerationRequest(prompt, limit, sampling, tuple(body.stop), tuple(stop_ids),
                                  None if body.seed is None else body.seed + i)
                for prompt, limit in zip(prompts, limits) for i in range(n)]

    def admit(requests: list[GenerationRequest]) -> list[Job]:
        try:
            return scheduler.submit(requests)
        except Busy as e:
            raise _as_api_error(e) from None

    async def cancel_on_disconnect(request: Request, jobs: list[Job]) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        for job in jobs:
            job.cancel()

    async def collect(request: Request, jobs: list[Job]) -> list[tuple[str, StreamEnd]]:
        async def text_of(job: Job) -> tuple[str, StreamEnd]:
            return "".join([piece async for piece in job]), job.end

        watcher = asyncio.create_task(cancel_on_disconnect(request, jobs))
        try:
            return await asyncio.gather(*(text_of(job) for job in jobs))
        except Exception as e:
            raise _as_api_error(e) from None
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancel()

    def usage(prompt_tokens: int, ends: Sequence[StreamEnd]) -> dict:
        completion = sum(end.tokens for end in ends)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def stream(jobs: list[Job], head: dict, piece_choice, end_choice, first_choices, prompt_tokens: int,
               include_usage: bool):
        """Server-sent events: ``head`` + choices per chunk, a last chunk per choice with its finish
        reason, the usage chunk if asked, then [DONE]; an error mid-stream is one error event."""
        def chunk(choices: list[dict]) -> str:
            return json.dumps({**head, "choices": choices})

        shutdown = anyio.Event()  # set by sse-starlette when the server begins to shut down

        async def events() -> AsyncIterator[str]:
            try:
                for choice in first_choices:
                    yield chunk([choice])
                async for index, piece in _merged(jobs):
                    if shutdown.is_set():  # an error event, so the client can tell the text was cut short
                        yield json.dumps(APIError(503, "the server is shutting down; this stream was cut short",
                                                  type="server_error", code="shutting_down").body())
                        return
                    if piece is not None:
                        yield chunk([piece_choice(index, piece)])
                    else:
                        yield chunk([end_choice(index, jobs[index].end.reason)])
                if include_usage:
                    yield json.dumps({**head, "choices": [], "usage": usage(prompt_tokens, [j.end for j in jobs])})
                yield "[DONE]"
            except Exception as e:
                yield json.dumps(_as_api_error(e).body())
            finally:
                for job in jobs:
                    job.cancel()

        return EventSourceResponse(events(), sep="\n", shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S)

    @router.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @router.post("/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        check_model(body.model)
        require("generate", "/v1/completions")
        prepared = [prepare(p, body.max_tokens, 16, "prompt") for p in body.prompt]  # OpenAI's default: 16 tokens
        prompt_tokens = sum(n for n, _ in prepared)
        jobs = admit(requests_for(body, body.prompt, [m for _, m in prepared], ()))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return stream(jobs, head, lambda i, text: {"index": i, "text": text, "logprobs": None, "finish_reason": None},
                          lambda i, reason: {"index": i, "text": "", "logprobs": None, "finish_reason": reason},
                          [], prompt_tokens, bool(body.stream_options and body.stream_options.include_usage))
        results = await collect(request, jobs)
        return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": end.reason}
                                    for i, (text, end) in enumerate(results)],
                "usage": usage(prompt_tokens, [end for _, end in results])}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        from attnkit.chat import end_of_turn_ids, render_chat

        body = await _parse(request, ChatBody)
        check_model(body.model)
        require("generate", "/v1/chat/completions")
        messages = _plain_messages(body.messages)
        try:
            prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
        except AttnkitError as e:
            raise APIError(400, str(e), param="messages") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt_tokens, limit = prepare(prompt, limit, None, "messages")
        jobs = admit(requests_for(body, [prompt], [limit], end_of_turn_ids(tokenizer, model.cfg.end_ids)))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream else
                "chat.completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                     for i in range(len(jobs))]
            return stream(jobs, head,
                          lambda i, text: {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None},
                          lambda i, reason: {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason},
                          first, prompt_tokens, bool(body.stream_options and body.stream_options.include_usage))
        results = await collect(request, jobs)
        return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                     "finish_reason": end.reason} for i, (text, end) in enumerate(results)],
                "usage": usage(prompt_tokens, [end for _, end in results])}

    @router.post("/embeddings")
    async def embeddings(request: Request):
        from attnkit.encoding import embed_texts

        body = await _parse(request, EmbeddingBody)
        check_model(body.model)
        require("embed", "/v1/embeddings")
        counts = [len(tokenizer.encode(text)) + 2 for text in body.input]  # + [CLS], [SEP]
        for i, n in enumerate(counts):
            if n > context:
                raise APIError(400, f"input {i} is {n} tokens, more than the model's {context}; shorten it",
                               param="input", code="context_length_exceeded")
        try:
            vectors = await scheduler.call(embed_texts, model, tokenizer, body.input)
        except Exception as e:
            raise _as_api_error(e) from None
        data = []
        for i, v in enumerate(vectors.float().cpu()):
            value = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
                     if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}

    @app.get("/", include_in_schema=False)
    async def playground():
        """The web playground (attnkit/static/playground.html): prompt or chat, sampling controls,
        streamed output, and the attention of the text so far."""
        from importlib.resources import files

        from fastapi.responses import HTMLResponse

        return HTMLResponse(files("attnkit").joinpath("static/playground.html").read_text(encoding="utf-8"))

    @app.post("/attnkit/attention", dependencies=[Depends(check_key)])
    async def attention(request: Request):
        """One layer's and head's attention over a text (or a rendered chat), from the model itself:
        {"tokens": [...], "weights": T x T (row: the query token), "layer", "head", "n_layers", "n_heads"}."""
        from attnkit.plots import attention_weights

        require("generate", "/attnkit/attention")
        if model.cfg.family != "decoder":
            raise APIError(400, f"{model_name} is {a_family(model.cfg.family)} model, which has no attention to show")
        body = await _parse(request, AttentionBody)
        if (body.text is None) == (body.messages is None):
            raise APIError(400, "give exactly one of text or messages", param="text")
        text = body.text
        if body.messages is not None:
            from attnkit.chat import render_chat

            messages = _plain_messages(body.messages)
            try:
                text = render_chat(tokenizer, messages, add_generation_prompt=False)
            except AttnkitError as e:
                raise APIError(400, str(e), param="messages") from None
        if body.layer >= model.cfg.n_layer or body.head >= model.cfg.n_head:
            raise APIError(400, f"layer and head must be below {model.cfg.n_layer} and {model.cfg.n_head}", param="layer")

        def compute() -> dict:
            ids, maps = attention_weights(model, tokenizer, text, ATTENTION_TOKENS, what="text")
            weights = maps[body.layer][0, body.head].float()  # (T, T)
            return {"tokens": [tokenizer.decode([i]) for i in ids], "layer": body.layer, "head": body.head,
                    "n_layers": model.cfg.n_layer, "n_heads": model.cfg.n_head,
                    "weights": [[round(w, 5) for w in row] for row in weights.tolist()]}

        try:
            return await scheduler.call(compute)  # on the worker, which owns the model
        except AttnkitError as e:
            raise APIError(400, str(e), param="text") from None

    app.include_router(router)
    return app


async def _merged(jobs: list[Job]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, piece) from several jobs as they come; (index, None) when job ``index`` has ended."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for piece in job:
                out.put_nowait((index, piece, None))
            out.put_nowait((index, None, None))
        except Exception as e:
            out.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            index, piece, error = await out.get()
            if error is not None:
                raise error
            left -= piece is None
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()


# --- the command --------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (the port is taken, the host is not this machine's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AttnkitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, device="cpu",
          dtype=None, quantize: str | None = None, log_level: str = "info", **limits) -> None:
    """Load ``ckpt`` once and serve it until interrupted (``limits``: see ``create_app``)."""
    import uvicorn

    from attnkit.checkpoints import load_checkpoint

    sock = bind(host, port)  # first: a taken port is one line, before the model loads
    try:
        model, tokenizer = load_checkpoint(ckpt, device=device, dtype=dtype, quantize=quantize)
        app = create_app(model, tokenizer, model_name=model_name or str(ckpt), **limits)
        bound_host, bound_port = sock.getsockname()[:2]  # (--port 0: the port the system chose)
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"attnkit: serving {model_name or ckpt} on http://{shown}:{bound_port} (Ctrl-C stops)", file=sys.stderr,
              flush=True)  # uvicorn does not say where, given a socket
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
