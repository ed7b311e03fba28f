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
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from steerkit import arch
from steerkit.hooks import block_dtype
from steerkit.serve.engine import Engine, Request
from steerkit.serve.schema import Busy, Completion, Library, RequestError, parse_completion

log = logging.getLogger(__name__)


def create_app(engine: Engine, model_name: str):
    """A FastAPI app serving ``engine`` with OpenAI's request and response shapes (plus ``steering``)."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="steerkit", description="OpenAI-compatible completions with per-request steering",
                  lifespan=lifespan)  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await complete(engine, model_name, http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await complete(engine, model_name, http, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "steerkit"}]}

    @app.get("/v1/steering/vectors")
    async def vectors():
        return {"object": "list", "data": engine.library.describe()}

    @app.get("/v1/steering/stats")
    async def stats():
        return {**engine.stats, "active": len(engine.active), "waiting": engine.waiting.qsize()}

    return app


def error(status: int, message: str, kind: str = "invalid_request_error"):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


async def complete(engine: Engine, model_name: str, http, chat: bool):
    """One chat or completions request: checked, queued, answered whole or streamed; refusals are 4xx."""
    from fastapi.responses import StreamingResponse

    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body is not valid JSON")
    try:
        job = parse_completion(body, chat, engine.tok, engine.library, lambda i: block_dtype(engine.model, i))
    except RequestError as err:
        return error(400, str(err))
    except (TypeError, ValueError) as err:
        return error(400, f"bad request: {err}")
    reply = Reply(engine, job, chat, job.model or model_name)
    try:
        engine.submit(reply.request)
    except RequestError as err:
        return error(400, str(err))
    except Busy as err:
        return error(429, str(err), "rate_limit_error")
    if job.stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream")
    whole = await reply.whole()
    return error(500, whole["error"], "server_error") if "error" in whole else whole


class Reply:
    """One request's way back: the engine's events, through an asyncio queue, as an OpenAI response (whole or
    streamed). A reply that ends, or whose client goes away, frees its row in the engine."""

    def __init__(self, engine: Engine, job: Completion, chat: bool, model: str):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        emit = lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event)  # noqa: E731  (engine thread)
        self.request = Request(job.prompt_ids, job.max_tokens, job.entries, emit, logprobs=job.logprobs,
                               **job.sampling)  # fmt: skip
        self.tok, self.job, self.chat = engine.tok, job, chat
        self.kind = "chat.completion" if chat else "text_completion"
        self.head = {"id": f"cmpl-{self.request.id}", "created": int(time.time()), "model": model}

    async def whole(self) -> dict:
        """The completed response, or ``{"error": message}``."""
        finish, scored = "length", []
        try:
            while True:
                event = await self.events.get()
                if "error" in event:
                    return event
                if "finish" in event:
                    finish = event["finish"]
                    break
                scored.append(event)
        finally:
            self.request.cancelled = True
        tokens = [e["token"] for e in scored]
        text = self.tok.decode(tokens, skip_special_tokens=True)
        choice = {"index": 0, "finish_reason": finish}
        if self.job.logprobs is not None:
            choice["logprobs"] = self.logprobs(scored)
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self.head, "object": self.kind, "choices": [choice], "usage": usage(len(self.job.prompt_ids),
                len(tokens))}  # fmt: skip

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk shape (a last chunk with the usage if asked, as OpenAI's
        ``stream_options.include_usage``)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        sent, tokens, scored = "", [], []  # scored: the token events not yet sent
        try:
            if self.chat:
                yield self.chunk(kind, {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None})
            while True:
                event = await self.events.get()
                if "error" in event:
                    yield f"data: {json.dumps({'error': {'message': event['error']}})}\n\n"
                    break
                if "finish" in event:
                    yield self.chunk(kind, self.choice(None, event["finish"]))
                    if self.job.include_usage:
                        yield self.chunk(kind, None, usage(len(self.job.prompt_ids), len(tokens)))
                    break
                tokens.append(event["token"])
                scored.append(event)
                text = self.tok.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
                    continue
                choice = self.choice(text[len(sent) :], None)
                if self.job.logprobs is not None:
                    choice["logprobs"] = self.logprobs(scored, tokens[: len(tokens) - len(scored)])
                    scored = []
                yield self.chunk(kind, choice)
                sent = text
            yield "data: [DONE]\n\n"
        finally:
            self.request.cancelled = True  # finished, or the client went away: the engine drops the row

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
          max_batch: int = 16, max_queue: int = 64) -> None:  # fmt: skip
    """Load the model and the vectors, and serve until interrupted (``steerkit serve``)."""
    import uvicorn

    from steerkit.models import load_model

    model, tok = load_model(model_name, dtype=dtype, device=device)
    library = Library(vectors, arch.hidden_size(model), arch.num_layers(model))
    engine = Engine(model, tok, library, max_batch=max_batch, max_queue=max_queue)
    log.info("serving %s with vectors %s and conditions %s on http://%s:%d", model_name, sorted(library.vectors),
             sorted(library.conditions), host, port)  # fmt: skip
    uvicorn.run(create_app(engine, str(model_name)), host=host, port=port, log_level="warning")


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
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"steerkit serve did not answer within {timeout:g} s")
