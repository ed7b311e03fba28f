"""The web layer of ``steerkit serve``: OpenAI's request and response shapes (plus ``steering``) over an
``Engine``, in FastAPI; ``serve`` runs it, ``launch`` starts it in a subprocess for notebooks, tests and benches.

Routes: ``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events or not),
``/v1/models``, ``/v1/steering/vectors`` and ``/v1/steering/stats``.

(No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at definition time, and
the request class is imported inside ``create_app``, so that fastapi stays an optional dependency.)
"""

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

from steerkit import arch
from steerkit.hooks import block_dtype
from steerkit.serve.engine import Engine, Request
from steerkit.serve.limits import Guard, ServeConfig, head_timeout_protocol, is_loopback
from steerkit.serve.metrics import Metrics
from steerkit.serve.schema import Busy, Completion, Library, RequestError, Unavailable, parse_completion

log = logging.getLogger(__name__)


ERROR_TYPES = {400: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error", 500: "server_error",
               503: "unavailable_error", 504: "timeout_error"}  # fmt: skip


def create_app(engine: Engine, model_name: str, config: ServeConfig | None = None):
    """An ASGI app serving ``engine`` with OpenAI's request and response shapes (plus ``steering``), behind the
    ``Guard`` of ``config``'s key and limits; ``/health`` and ``/metrics`` beside the API."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import Response

    config = (config or ServeConfig()).checked()
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="steerkit", description="OpenAI-compatible completions with per-request steering",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    if config.origins():
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.origins(), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await complete(engine, model_name, http, True, config, metrics)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await complete(engine, model_name, http, False, config, metrics)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "steerkit"}]}

    @app.get("/v1/steering/vectors")
    async def vectors():
        return {"object": "list", "data": engine.library.describe()}

    @app.get("/v1/steering/stats")
    async def stats():
        return {**engine.stats, "active": len(engine.active), "waiting": engine.waiting.qsize()}

    @app.get("/health")
    async def health():
        if engine.ending is not None or not engine.alive():
            return error(503, engine.ending or "the engine has stopped", "unavailable_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def scrape():
        body, kind = metrics.text()
        return Response(body, media_type=kind)

    return Guard(app, config, metrics)


def error(status: int, message: str, kind: str | None = None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind or ERROR_TYPES.get(status, "server_error"), "code": status}}
    return JSONResponse(body, status_code=status)


async def complete(engine: Engine, model_name: str, http, chat: bool, config: ServeConfig, metrics):
    """One chat or completions request: checked, queued, answered whole or streamed; refusals are 4xx."""
    from fastapi.responses import StreamingResponse

    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body is not valid JSON")
    try:
        dtype_at = lambda i: block_dtype(engine.model, i)  # noqa: E731
        job = parse_completion(body, chat, engine.tok, engine.library, dtype_at, config)
    except RequestError as err:
        return error(400, str(err))
    except (TypeError, ValueError, RecursionError) as err:
        return error(400, f"bad request: {err}")
    reply = Reply(engine, job, chat, job.model or model_name, config, metrics)
    try:
        engine.submit(reply.request)
    except RequestError as err:
        return error(400, str(err))
    except Busy as err:
        return error(429, str(err))
    except Unavailable as err:
        return error(503, str(err))
    if job.stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream")
    whole = await reply.whole()
    return error(whole["status"], whole["error"]) if "error" in whole else whole


class Reply:
    """One request's way back: the engine's events, through an asyncio queue, as an OpenAI response (whole or
    streamed), cut at the first stop sequence and at the request's deadline. A reply that ends, or whose client
    goes away, frees its row in the engine."""

    def __init__(self, engine: Engine, job: Completion, chat: bool, model: str, config: ServeConfig, metrics):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        emit = lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event)  # noqa: E731  (engine thread)
        self.request = Request(job.prompt_ids, job.max_tokens, job.entries, emit, logprobs=job.logprobs,
                               **job.sampling)  # fmt: skip
        self.tok, self.job, self.chat, self.metrics = engine.tok, job, chat, metrics
        self.deadline, self.timeout = loop.time() + config.request_timeout, config.request_timeout
        self.kind = "chat.completion" if chat else "text_completion"
        self.head = {"id": f"cmpl-{self.request.id}", "created": int(time.time()), "model": model}
        self.tokens: list[int] = []
        self.finish, self.failure, self.stopped = "length", None, False  # failure: (status, message)
        self.hold = max((len(stop) for stop in job.stop), default=1) - 1  # text a stop may still start in

    async def _token_events(self) -> AsyncIterator[dict]:
        """The request's token events until it finishes, stops, fails or runs out of time."""
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        event = await self.events.get()
                except TimeoutError:
                    self.failure = (504, f"the request ran longer than {self.timeout:g} s (request_timeout)")
                    return
                if "error" in event:
                    self.failure = (event.get("status", 500), event["error"])
                    return
                if "finish" in event:
                    self.finish = event["finish"]
                    break
                self.tokens.append(event["token"])
                yield event
                if self.job.stop:
                    self.visible()  # (sets stopped)
                    if self.stopped:
                        self.finish = "stop"
                        break
            self.metrics.completion(len(self.job.prompt_ids), len(self.tokens), self.timeout - self._left())
        finally:
            self.request.cancelled = True  # finished, or the client went away: the engine drops the row

    def _left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def visible(self) -> str:
        """The text so far, cut before the first stop sequence in it (``stopped`` says whether one was)."""
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(stop) for stop in self.job.stop) if i >= 0]
        self.stopped = bool(cuts)
        return text[: min(cuts)] if cuts else text

    async def whole(self) -> dict:
        """The completed response, or ``{"error": message, "status": code}``."""
        scored = [event async for event in self._token_events()]
        if self.failure is not None:
            return {"status": self.failure[0], "error": self.failure[1]}
        text = self.visible()
        choice = {"index": 0, "finish_reason": self.finish}
        if self.job.logprobs is not None:
            choice["logprobs"] = self.logprobs(scored)
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self.head, "object": self.kind, "choices": [choice], "usage": usage(len(self.job.prompt_ids),
                len(self.tokens))}  # fmt: skip

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk shape (a last chunk with the usage if asked, as OpenAI's
        ``stream_options.include_usage``); a failure ends the stream with an error event."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        sent, scored, done = "", [], 0  # scored: token events whose text is not sent yet; done: tokens sent
        if self.chat:
            yield self.chunk(kind, {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
        async for event in self._token_events():
            scored.append(event)
            text = self.visible()
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
                continue
            ready = text if self.stopped else text[: max(len(sent), len(text) - self.hold)]
            if len(ready) > len(sent):
                yield self.chunk(kind, self.piece(ready[len(sent) :], scored, done))
                sent, done, scored = ready, done + len(scored), []
        if self.failure is not None:
            error = {"message": self.failure[1], "type": ERROR_TYPES.get(self.failure[0], "server_error"),
                     "code": self.failure[0]}  # fmt: skip
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            rest = self.visible()[len(sent) :]
            if rest or scored:
                yield self.chunk(kind, self.piece(rest, scored, done))
            yield self.chunk(kind, self.choice(None, self.finish))
            if self.job.include_usage:
                yield self.chunk(kind, None, usage(len(self.job.prompt_ids), len(self.tokens)))
        yield "data: [DONE]\n\n"

    def piece(self, text: str, scored: list[dict], done: int) -> dict:
        """A chunk's choice: ``text``, with the log-probabilities of the tokens it covers if asked for."""
        choice = self.choice(text, None)
        if self.job.logprobs is not None:
            choice["logprobs"] = self.logprobs(scored, self.tokens[:done])
        return choice

    def choice(self, text: str | None, finish: str | None) -> dict:
        if self.chat:
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish}

    def chunk(self, kind: str, choice: dict | None, usage: dict | None = None) -> str:
        payload = {**self.head, "object": kind, "choices": [choice] if choice is not None else []}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def logprobs(self, events: list[dict], before: Sequence[int] = ()) -> dict:
        """The log-probabilities of ``events`` in OpenAI's chat or completions shape, each token as its text or
        (``as_ids``, vLLM's ``return_tokens_as_token_ids``) as ``token_id:{id}``; a completion's ``text_offset``
        counts from the start of its text (``before``: the tokens already sent)."""
        tok = self.tok
        name = (lambda t: f"token_id:{t}") if self.job.as_ids else (lambda t: tok.decode([t]))
        entry = lambda t, lp: {"token": name(t), "logprob": lp, "bytes": list(name(t).encode())}  # noqa: E731
        if self.chat:
            return {"content": [{**entry(e["token"], e["logprob"]), "top_logprobs": [entry(*t) for t in e["top"]]}
                                for e in events]}  # fmt: skip
        ids = [e["token"] for e in events]
        offsets = [len(tok.decode([*before, *ids[:i]], skip_special_tokens=True)) for i in range(len(ids))]
        tops = [{name(t): lp for t, lp in e["top"]} for e in events]
        return {"tokens": [name(t) for t in ids], "token_logprobs": [e["logprob"] for e in events],
                "top_logprobs": tops, "text_offset": offsets}  # fmt: skip


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(model_name: str, vectors: str | Path, host: str = "127.0.0.1", port: int = 8000, device=None, dtype=None,
          config: ServeConfig | None = None, **options) -> None:  # fmt: skip
    """Load the model and the vectors, and serve until SIGTERM or Ctrl-C (``steerkit serve``). The limits and key
    are ``config``'s (its fields may be given as keywords). On SIGTERM the server stops accepting, lets running
    requests finish for ``shutdown_timeout`` seconds, then ends the rest with an error event, and returns."""
    import uvicorn

    from steerkit.models import load_model

    config = replace(config or ServeConfig(), **options).checked()
    if not is_loopback(host) and config.api_key is None:
        warnings.warn(f"serving on {host} without an API key: anyone who can reach port {port} can generate and "
                      "list the vectors (pass --api-key or set STEERKIT_API_KEY)", stacklevel=2)  # fmt: skip
    model, tok = load_model(model_name, dtype=dtype, device=device)
    library = Library(vectors, arch.hidden_size(model), arch.num_layers(model))
    engine = Engine(model, tok, library, max_batch=config.max_batch, max_queue=config.max_queue)
    log.info("serving %s with vectors %s and conditions %s on http://%s:%d", model_name, sorted(library.vectors),
             sorted(library.conditions), host, port)  # fmt: skip
    settings = uvicorn.Config(create_app(engine, str(model_name), config), host=host, port=port, log_level="warning",
                              http=head_timeout_protocol(config.header_timeout),
                              timeout_graceful_shutdown=int(config.shutdown_timeout) + 10)  # fmt: skip
    _draining_server(settings, engine, config.shutdown_timeout).run()


def _draining_server(settings, engine: Engine, grace: float):
    """A uvicorn server whose first SIGTERM (or Ctrl-C) also starts the clock on running requests: after ``grace``
    seconds the engine ends them with an error event, so their streams close; after SIGTERM the process then exits
    0 (Ctrl-C keeps its 130)."""
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                message = f"the server is shutting down (its requests had {grace:g} s to finish)"
                timer = threading.Timer(grace, engine.end_all, args=(message,))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a drained SIGTERM is a clean stop: uvicorn would re-raise it (exit -15)
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    return Draining(settings)


def launch(vectors: str | Path, *args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``steerkit serve --vectors VECTORS ARGS`` in a subprocess on a free port of 127.0.0.1 and wait until
    it answers: (the process, its base URL). For notebooks, tests and benchmarks; terminate the process to stop."""
    import socket
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "steerkit.cli", "serve", "--vectors", str(vectors), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"steerkit serve exited with code {proc.returncode}: {proc.stderr.read().strip()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"steerkit serve did not answer within {timeout:g} s")
