"""An OpenAI-compatible HTTP server over the generation engine (`python -m maxlm.serve`).

The routes are the ones clients of the OpenAI API and of vLLM call, so the `openai` Python client,
lm-evaluation-harness's `local-completions` / `local-chat-completions` models and curl work unchanged:

* `POST /v1/completions`: text or token-id prompts (one or a batch), `max_tokens`, `temperature`, `top_p`,
  `top_k`, `repetition_penalty`, `n`, `stop`, `stop_token_ids`, `seed`, `logprobs`, `echo`, `ignore_eos`,
  `stream` (server-sent events, `stream_options.include_usage`). With `echo` and `logprobs`, the prompt's
  own tokens come with their log-probs too (the first has none): what lm-evaluation-harness's
  log-likelihood requests read.
* `POST /v1/chat/completions`: the messages rendered by the model's chat template, then as above;
  `logprobs` / `top_logprobs` in the chat format.
* `GET /v1/models`, `GET /health`; vLLM's `GET /tokenizer_info`, `POST /tokenize` and `POST /detokenize`,
  which lm-evaluation-harness detects and then tokenizes through the server (no tokenizer files needed).

Why it is built this way:

* **One engine thread.** The engine (`maxlm.inference.engine`) is not thread-safe; its `serve_forever`
  runs in one thread and steps whenever requests wait. Handlers only `submit` and `cancel`. Each request's
  `on_update` callback, run in the engine thread, hands a snapshot (token count, text, finish reason) to
  the handler's asyncio queue through `call_soon_threadsafe`. Concurrent HTTP requests therefore become
  one continuous batch.
* **Errors are the OpenAI API's.** Every refusal is a 4xx with
  `{"error": {"message", "type", "param", "code"}}`: a malformed body (400, not FastAPI's 422), a request
  the engine cannot serve (`Engine.check`: 400 naming the field), an unknown model (404). The server keeps
  serving. A client that goes away mid-stream cancels its request, which frees its slot at the next step.
* **Graceful shutdown.** On SIGTERM, uvicorn stops accepting connections and lets open ones finish; the
  lifespan's exit then lets the engine drain its queue and stops its thread.
* **Streamed text is never retracted.** A stream holds back text that could still become a stop string,
  and a trailing U+FFFD (half a UTF-8 character in a byte-fallback token), until the reply ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat
from maxlm.errors import UserError
from maxlm.inference.engine import Engine, Request, SamplingParams
from maxlm.model.sampler import SampleError


class APIError(Exception):
    """An error answered as the OpenAI API answers it."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def _error(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


# ----------------------------------------------------------------------------------------------------------
# Request bodies (fields the OpenAI API has and maxlm cannot honour are refused, not ignored)

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False


class ChatBody(_Body):
    messages: list[dict]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


@dataclasses.dataclass
class Served:
    """What the server serves: the engine over a model, its tokenizer, name and chat template."""

    engine: Engine
    tok: Any  # maxlm.tokenizer.Tokenizer | HFTokenizer
    name: str
    template: Any = None  # chat.Template | chat_hf.HFTemplate | None (no chat endpoint)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def piece(self, token: int) -> str:
        return self.tok.decode([token])


# ----------------------------------------------------------------------------------------------------------
# Turning a body into engine requests

def _stops(body: _Body, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stop)}", "stop")
    return tuple(s for s in stop + list(extra) if s)


def _params(served: Served, body: _Body, max_tokens: int, logprobs: int | None, *, stop_ids: tuple[int, ...] = (),
            stop: tuple[str, ...] = ()) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", name)
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                          repetition_penalty=body.repetition_penalty,
                          stop_token_ids=tuple(body.stop_token_ids or ()) + stop_ids, stop=_stops(body, stop),
                          seed=body.seed, logprobs=logprobs, ignore_eos=body.ignore_eos)


def _each_seed(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n samples of one prompt: seeds seed, seed+1, ... so that each differs and the set is reproducible."""
    if params.seed is None or n == 1:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def _check_model(served: Served, body: _Body) -> None:
    if body.model is not None and body.model != served.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served.name!r}", "model",
                       code="model_not_found")


def _completion_prompts(served: Served, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    prefix = tokenizer_lib.text_prefix(served.tok)
    return [prefix + list(served.tok.encode(p)) if isinstance(p, str) else list(p) for p in prompt]


def _submit_all(served: Served, jobs: list[tuple[list[int], SamplingParams]], on_update) -> list[Request]:
    """Check every request first, so that a bad one refuses the whole body before any runs."""
    try:
        for prompt, params in jobs:
            served.engine.check(prompt, params)
        return [served.engine.submit(prompt, params, on_update=on_update) for prompt, params in jobs]
    except SampleError as e:
        raise APIError(400, str(e)) from None


class _Updates:
    """Snapshots of requests' progress, from the engine thread to this handler's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, req: Request) -> None:  # runs in the engine thread
        snap = (req, len(req.tokens), req.text, req.finish_reason)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, snap)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that a stream must not send yet (see the module docstring)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                keep = max(keep, k)
                break
    while keep < len(text) and text[len(text) - keep - 1] == "\ufffd":
        keep += 1
    return keep


# ----------------------------------------------------------------------------------------------------------
# Log-probs in the two formats

def _completion_logprobs(served: Served, tokens: list[int], lps: list, tops: list, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in zip(tokens, lps, tops):
        piece = served.piece(token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else {served.piece(i): v for i, v in top})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def _chat_logprobs(served: Served, req: Request, start: int, end: int) -> dict:
    content = []
    for token, lp, top in zip(req.tokens[start:end], req.logprobs[start:end], req.top_logprobs[start:end]):
        piece = served.piece(token)
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": served.piece(i), "logprob": v, "bytes": list(served.piece(i).encode())}
                                         for i, v in top]})
    return {"content": content}


def _usage(reqs: list[Request], prompt_lens: list[int]) -> dict:
    prompt = sum(prompt_lens)
    completion = sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ----------------------------------------------------------------------------------------------------------
# The app

def build_app(served: Served) -> FastAPI:
    """The FastAPI app over `served`; its lifespan runs the engine thread (started on entry, drained on exit)."""
    state: dict[str, Any] = {"error": None}

    def engine_thread() -> None:
        try:
            served.engine.serve_forever()
        except Exception as e:  # the engine is broken: fail what waits, and say so on /health
            state["error"] = f"{type(e).__name__}: {e}"
            served.engine.abort()
            raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=engine_thread, name="maxlm-engine", daemon=True)
        thread.start()
        state["thread"] = thread
        yield
        served.engine.shutdown()
        await asyncio.to_thread(thread.join)

    app = FastAPI(title="maxlm", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError):
        return _error(e.status, e.message, e.param, e.type, e.code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: HTTPRequest, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the body is not valid JSON", None
        return _error(400, f"{where}: {message}" if where else message, where)

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), type=kind)

    @app.get("/health")
    async def health():
        thread = state.get("thread")
        if state["error"] or thread is None or not thread.is_alive():
            return _error(503, f"the engine is not running: {state['error'] or 'stopped'}", type="server_error")
        e = served.engine
        return {"status": "ok", "waiting": len(e.waiting) + len(e.prefilling), "running": len(e.running),
                "slots": e.slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "maxlm", "max_model_len": served.engine.max_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = served.tok
        name = lambda i: tok.id_to_piece(i) if i is not None and i >= 0 else None  # noqa: E731
        template = getattr(served.template, "source", None) or (
            chat.to_jinja(served.template, tok.add_bos) if isinstance(served.template, chat.Template) else None)
        return {"eos_token": name(tok.eos_id), "bos_token": name(tok.bos_id), "pad_token": name(tok.pad_id),
                "chat_template": template, "model_max_length": served.engine.max_len}

    @app.post("/tokenize")
    async def tokenize(body: dict):
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "prompt must be a string", "prompt")
        ids = list(served.tok.encode(body["prompt"]))
        if body.get("add_special_tokens", True):
            ids = tokenizer_lib.text_prefix(served.tok) + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": served.engine.max_len}

    @app.post("/detokenize")
    async def detokenize(body: dict):
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < served.engine.vocab
                                                   for t in tokens):
            raise APIError(400, f"tokens must be a list of ids in [0, {served.engine.vocab})", "tokens")
        return {"prompt": served.tok.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        _check_model(served, body)
        prompts = _completion_prompts(served, body.prompt)
        if body.logprobs is not None and body.logprobs > served.engine.top_logprobs:
            raise APIError(400, f"logprobs must be in [0, {served.engine.top_logprobs}]", "logprobs")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo (scoring the prompt)", "max_tokens")
        params = _params(served, body, max(16 if body.max_tokens is None else body.max_tokens, 1), body.logprobs)
        if body.stream and body.echo:
            raise APIError(400, "echo is not supported with stream", "echo")
        jobs = [(p, q) for p in prompts for q in _each_seed(params, body.n)]
        scored = {}
        if body.echo and body.logprobs is not None:
            try:
                for p in prompts:
                    served.engine.check(p, params)
            except SampleError as e:
                raise APIError(400, str(e)) from None
            # The prompt's own log-probs: one forward pass, outside the engine thread.
            for i, p in enumerate(prompts):
                scored[i] = await asyncio.to_thread(served.engine.prompt_logprobs, p, body.logprobs)
        if body.max_tokens == 0:
            return _echo_only(served, body, prompts, scored)
        updates = _Updates()
        reqs = _submit_all(served, jobs, updates)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_completion_stream(served, body, reqs, [len(p) for p, _ in jobs], updates, http,
                                                        rid, created), media_type="text/event-stream")
        await _wait(reqs, updates, http)
        choices = []
        for i, (req, (prompt, _)) in enumerate(zip(reqs, jobs)):
            text, logprobs = req.text, None
            if body.echo:
                head = served.tok.decode(prompt)
                text = head + text
            if body.logprobs is not None:
                tops = req.top_logprobs if body.logprobs else [None] * len(req.tokens)
                logprobs = _completion_logprobs(served, req.tokens, req.logprobs, tops,
                                                len(served.tok.decode(prompt)) if body.echo else 0)
                if body.echo:
                    head_lp = _prompt_part(served, prompt, scored[i // body.n], body.logprobs)
                    logprobs = {k: head_lp[k] + logprobs[k] for k in logprobs}
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": _reason(req)})
        return {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                "choices": choices, "usage": _usage(reqs, [len(p) for p, _ in jobs])}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        _check_model(served, body)
        if served.template is None:
            raise APIError(400, f"{served.name} has no chat template; use /v1/completions", "messages")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if (body.top_logprobs or 0) > served.engine.top_logprobs:
            raise APIError(400, f"top_logprobs must be in [0, {served.engine.top_logprobs}]", "top_logprobs")
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        roles = served.template.roles
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                raise APIError(400, f"messages.{i}.role: {m['role']!r} is not one of {list(roles)}", f"messages.{i}.role")
        try:
            prompt = list(chat.render_prompt(served.template, served.tok, messages))
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        stop_ids, stop = _end_of_turn(served)
        max_tokens = body.max_completion_tokens or body.max_tokens or served.engine.max_len - len(prompt)
        if max_tokens < 1:
            raise APIError(400, f"the conversation ({len(prompt)} tokens) fills the context length "
                                f"{served.engine.max_len}", "messages")
        params = _params(served, body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                         stop_ids=stop_ids, stop=stop)
        jobs = [(prompt, q) for q in _each_seed(params, body.n)]
        updates = _Updates()
        reqs = _submit_all(served, jobs, updates)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_chat_stream(served, body, reqs, len(prompt), updates, http, rid, created),
                                     media_type="text/event-stream")
        await _wait(reqs, updates, http)
        choices = [{"index": i, "message": {"role": "assistant", "content": req.text},
                    "logprobs": _chat_logprobs(served, req, 0, len(req.tokens)) if body.logprobs else None,
                    "finish_reason": _reason(req)} for i, req in enumerate(reqs)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                "choices": choices, "usage": _usage(reqs, [len(prompt)] * len(reqs))}

    return app


def _reason(req: Request) -> str:
    return "length" if req.finish_reason == "length" else "stop"


def _message(m: Any, i: int) -> dict:
    """An OpenAI message with its content as text (a list of text parts is joined)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"messages.{i}: expected an object with a role and content", f"messages.{i}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"messages.{i}.content: only text parts are supported", f"messages.{i}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages.{i}.content must be a string or a list of text parts", f"messages.{i}.content")
    return {**{k: v for k, v in m.items() if k in ("role", "name")}, "content": content}


def _end_of_turn(served: Served) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The template's end-of-turn marker: a stop id when it is one token, else a stop string."""
    marker = served.template.stop
    ids = served.tok.encode(marker) if marker else []
    if len(ids) == 1:
        return (ids[0],), ()
    return (), ((marker,) if marker else ())


def _prompt_part(served: Served, prompt: list[int], scored: tuple[list, list], n: int) -> dict:
    lps, tops = scored
    return _completion_logprobs(served, prompt, [None] + lps, [None] + (tops if n else [None] * len(lps)), 0)


def _echo_only(served: Served, body: CompletionBody, prompts: list[list[int]], scored: dict) -> dict:
    """max_tokens=0 with echo: the prompts back, with their log-probs when asked (scoring, no generation)."""
    choices = []
    for i, p in enumerate(prompts):
        for j in range(body.n):
            logprobs = _prompt_part(served, p, scored[i], body.logprobs) if body.logprobs is not None else None
            choices.append({"index": i * body.n + j, "text": served.tok.decode(p), "logprobs": logprobs,
                            "finish_reason": "length"})
    n_prompt = sum(len(p) for p in prompts) * body.n
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}


async def _wait(reqs: list[Request], updates: _Updates, http: HTTPRequest) -> None:
    """Until every request is done; a client that disconnects cancels them."""
    try:
        while not all(r.done for r in reqs):
            try:
                await asyncio.wait_for(updates.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    break
    finally:
        for r in reqs:
            if not r.done:
                r.cancelled = True


async def _snapshots(reqs: list[Request], updates: _Updates) -> AsyncIterator[tuple[int, Request, int, str, str | None]]:
    index = {id(r): i for i, r in enumerate(reqs)}
    done = 0
    try:
        while done < len(reqs):
            req, n, text, finish = await updates.queue.get()
            done += finish is not None
            yield index[id(req)], req, n, text, finish
    finally:  # the client went away (the response was cancelled): free the slots
        for r in reqs:
            if not r.done:
                r.cancelled = True


async def _completion_stream(served, body, reqs, prompt_lens, updates, http, rid, created) -> AsyncIterator[str]:
    sent_chars, sent_tokens = [0] * len(reqs), [0] * len(reqs)
    base = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
    async for i, req, n, text, finish in _snapshots(reqs, updates):
        upto = len(text) if finish else len(text) - _holdback(text, req.params.stop)
        delta = text[sent_chars[i]:upto]
        logprobs = None
        if body.logprobs is not None:
            tops = req.top_logprobs[sent_tokens[i]:n] if body.logprobs else [None] * (n - sent_tokens[i])
            logprobs = _completion_logprobs(served, req.tokens[sent_tokens[i]:n], req.logprobs[sent_tokens[i]:n], tops,
                                            sent_chars[i])
        if delta or finish or (logprobs and logprobs["tokens"]):
            yield _sse({**base, "choices": [{"index": i, "text": delta, "logprobs": logprobs,
                                              "finish_reason": _reason(req) if finish else None}]})
        sent_chars[i], sent_tokens[i] = max(sent_chars[i], upto), n
    if (body.stream_options or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": _usage(reqs, prompt_lens)})
    yield _sse("[DONE]")


async def _chat_stream(served, body, reqs, prompt_len, updates, http, rid, created) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
    for i in range(len(reqs)):
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                          "finish_reason": None}]})
    sent_chars, sent_tokens = [0] * len(reqs), [0] * len(reqs)
    async for i, req, n, text, finish in _snapshots(reqs, updates):
        upto = len(text) if finish else len(text) - _holdback(text, req.params.stop)
        delta = text[sent_chars[i]:upto]
        logprobs = _chat_logprobs(served, req, sent_tokens[i], n) if body.logprobs else None
        if delta or finish or (logprobs and logprobs["content"]):
            yield _sse({**base, "choices": [{"index": i, "delta": {"content": delta} if delta else {},
                                              "logprobs": logprobs, "finish_reason": _reason(req) if finish else None}]})
        sent_chars[i], sent_tokens[i] = max(sent_chars[i], upto), n
    if (body.stream_options or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": _usage(reqs, [prompt_len] * len(reqs))})
    yield _sse("[DONE]")


def run(served: Served, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM: uvicorn's graceful shutdown (no new connections, open ones finish), then
    the engine drains and the process exits with status 0. uvicorn re-raises the signal it caught once it is
    done; the handler installed here turns that into a normal exit, so a supervisor sees a clean stop."""
    import uvicorn

    def stopped(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    uvicorn.run(build_app(served), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)

