"""An HTTP JSON API over a Translator (FastAPI): lines from concurrent requests are decoded together.

    POST /translate  {"lines": ["...", {"text": "...", "prefix": "...", "constraints": [...], "avoid": [...]}]}
                     ->  {"translations": [{"text", "nbest", "pieces", ...}]}
    POST /poem       {"heads": "春夏秋冬", "chars": 5, "tones": true}  ->  {"heads", "lines": [...]}
                     (acrostic poems: with `seqtool serve --poem-first MODEL`, the served model answers each line)
    GET  /health     ->  {"status": "ok", "requests": N, "lines": N, "batches": N, "refused_busy": N, "waiting": N,
                          "poems": whether POST /poem is served}
    GET  /info       ->  the model card (as `seqtool info --json`)
    GET  /           ->  a page to try the model in a browser (seqtool/web: plain HTML, CSS, JavaScript)

A /translate request may carry its own "options": {"beam_size", "nbest", "sample", "temperature", "top_k",
"top_p", "seed", "attention"}; requests with the same options are decoded together.

Every error is {"error": "one line"}: 400 for a malformed request, 413 for a body over the limit, 408 for
a body too slow to arrive, 503 when too many lines wait; 500 only for a seqtool bug, and only for the
request that met it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Optional, Union, cast

from seqtool.config import DecodingConfig
from seqtool.errors import SeqtoolError, one_line
from seqtool.poem import MAX_CHARS, Poet
from seqtool.translate import Prepared, Source, Translation, Translator, translation_record

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from fastapi.routing import APIRoute
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # either one alone is not enough
    raise SeqtoolError(f"seqtool serve needs fastapi and uvicorn ({exc.name} is missing): "
                       "pip install 'seqtool[serve]'") from None


class Line(BaseModel):
    """A line with its own controls, as `seqtool translate --input-format jsonl` reads them."""

    model_config = ConfigDict(extra="forbid")
    text: str
    prefix: str = ""
    constraints: list[str] = []
    avoid: list[str] = []


MAX_BEAM = 32  # a request's own beam: a web page's slider, not a way to hold the server


class Options(BaseModel):
    """A request's own decoding settings (the server's where not given), and whether to return attention."""

    model_config = ConfigDict(extra="forbid")
    beam_size: Optional[int] = Field(default=None, ge=1, le=MAX_BEAM)
    nbest: Optional[int] = Field(default=None, ge=1, le=MAX_BEAM)
    sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    attention: bool = False


NO_OPTIONS = Options()


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines: list[Union[str, Line]]
    options: Options = Field(default_factory=Options)


MAX_HEADS = 64  # heads (lines) of one poem: a request is a poem, not a batch job


class PoemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: str = Field(max_length=MAX_HEADS)
    chars: int = Field(5, ge=2, le=MAX_CHARS)
    tones: bool = True


def _source(line: str | Line) -> Source:
    # A line break inside a line would make it two lines elsewhere in seqtool: treat it as a space.
    if isinstance(line, str):
        return Source(" ".join(line.splitlines()))
    return Source(" ".join(line.text.splitlines()), line.prefix, tuple(line.constraints), tuple(line.avoid))


class Busy(Exception):
    """More lines are waiting than the server holds (--max-queue): the client should retry later (503)."""


@dataclass
class Batcher:
    """Queues the lines of each request; one worker decodes everything waiting (up to `max_lines`) at once."""

    translator: Translator
    max_lines: int
    wait_s: float  # how long the first request of a batch waits for company
    max_waiting: int = 10_000  # lines queued and not yet taken: beyond it, requests are refused at once
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    waiting: int = 0
    stats: dict = field(default_factory=lambda: {"requests": 0, "lines": 0, "batches": 0, "refused_busy": 0})

    async def translate(self, lines: list[Optional[Prepared]], translator: Optional[Translator] = None
                        ) -> list[Translation]:
        """The translations of `lines`, decoded with `translator` (a request's own settings; the server's by
        default) together with the other waiting lines of the same settings."""
        if self.waiting + len(lines) > self.max_waiting:
            self.stats["refused_busy"] += 1
            raise Busy(f"server busy: {self.waiting} lines waiting (--max-queue {self.max_waiting}); retry shortly")
        self.stats["requests"] += 1
        self.stats["lines"] += len(lines)
        done = asyncio.get_running_loop().create_future()
        self.waiting += len(lines)
        self.queue.put_nowait((lines, done, translator or self.translator))
        return await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            taken = len(jobs[0][0])
            deadline = loop.time() + self.wait_s
            while taken < self.max_lines:
                try:  # what is already waiting always joins (wait_for with no time left would not take it)
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                taken += len(job[0])
            self.waiting -= taken
            groups: dict[int, list] = {}  # one batch per decoding setting, in the order they came
            for job in jobs:
                groups.setdefault(id(job[2]), []).append(job)
            for group in groups.values():
                try:
                    await self._decode(group)
                except Exception as exc:  # never lose the worker: whatever went wrong goes to these requests
                    for _, done, _ in group:
                        _settle(done, exc=exc)

    async def _decode(self, jobs: list) -> None:
        """Decode the jobs together; if that fails for any reason, each job alone, so that one request's
        failure is that request's alone. A job whose client has gone (its future cancelled) is skipped."""
        jobs = [job for job in jobs if not job[1].done()]
        if not jobs:
            return
        try:
            results = await asyncio.to_thread(_translate, jobs[0][2], [line for lines, _, _ in jobs for line in lines])
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    await self._decode([job])
                return
            _settle(jobs[0][1], exc=exc)
            return
        self.stats["batches"] += 1
        for lines, done, _ in jobs:
            _settle(done, results[: len(lines)])
            results = results[len(lines):]


def _translate(translator: Translator, lines: list[Optional[Prepared]]) -> list[Translation]:
    return _guarded(translator.run, lines)


def _guarded(work, *args):
    """work(*args) in a worker thread. asyncio cannot carry StopIteration through a future: the request
    would hang, so it becomes a RuntimeError."""
    try:
        return work(*args)
    except StopIteration as exc:
        raise RuntimeError(f"StopIteration: {exc}") from None


def _settle(done: asyncio.Future, result=None, exc: Exception | None = None) -> None:
    if done.done():  # a cancelled request (the client went away) takes nothing
        return
    if exc is None:
        done.set_result(result)
    else:
        done.set_exception(exc)


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, max_body: int, timeout_s: float) -> bytes:
    """The request body, at most `max_body` bytes, whether Content-Length is given or the body comes
    chunked, and within `timeout_s`: a client trickling its body cannot hold a connection for long."""
    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise BodyTooLarge
        return bytes(body)

    return await asyncio.wait_for(read(), timeout_s)


def make_app(translator: Translator, card: dict, max_lines: int = 1000, max_body: int = 1 << 20,
             wait_ms: float = 5.0, max_queue: int = 10_000, body_timeout_s: float = 10.0,
             poet: Optional[Poet] = None) -> FastAPI:
    batcher = Batcher(translator, max_lines, wait_ms / 1000, max_queue)
    variants: dict[str, Translator] = {}  # a request's options -> its translator, built once (a few kept)

    def translator_for(options: Options) -> Translator:
        """The server's own translator for options that change nothing (they share its batches), else one
        made for them."""
        if options == NO_OPTIONS:  # most requests: nothing to build or look up
            return translator
        key = options.model_dump_json()
        if key not in variants:
            given = options.model_dump(exclude_none=True, exclude={"attention"})
            try:
                decoding = DecodingConfig.model_validate({**translator.decoding.model_dump(), **given})
            except ValidationError as exc:
                raise SeqtoolError(_one_line(exc, "options")) from None
            if len(variants) >= 64:
                variants.clear()
            variants[key] = translator if decoding == translator.decoding and not options.attention else \
                replace(translator, decoding=decoding, with_attention=options.attention)
        return variants[key]

    def too_large() -> JSONResponse:
        return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="seqtool", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            return too_large()
        return await call_next(request)

    for name, media in PAGE.items():  # the page to try the model: seqtool/web, shipped in the package
        app.add_api_route("/" if name == "index.html" else f"/{name}", _page_file(name, media), methods=["GET"],
                          include_in_schema=False)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **batcher.stats, "waiting": batcher.waiting, "poems": poet is not None}

    @app.get("/info")
    async def info() -> dict:
        return card

    async def parse(request: Request, schema: type[BaseModel]):
        """The request body as `schema`, or the error response. The body is read as JSON whatever its
        Content-Type says (curl -d sends form-encoded)."""
        try:
            return schema.model_validate_json(await read_body(request, max_body, body_timeout_s))
        except ValidationError as exc:
            return JSONResponse({"error": _one_line(exc)}, status_code=400)
        except BodyTooLarge:
            return too_large()
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"request body not received within {body_timeout_s:g} s"}, status_code=408)
        except ClientDisconnect:  # gone before its body was whole: nobody to answer
            return JSONResponse({"error": "client disconnected"}, status_code=400)

    async def answer(work):
        """Await `work()` for the response body; errors become their status."""
        try:
            return await work()
        except Busy as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        except SeqtoolError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # a seqtool bug: this request fails with a message, the server stays up
            message = one_line(f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])
            print(f"seqtool: {message}", file=sys.stderr, flush=True)
            return JSONResponse({"error": message}, status_code=500)

    @app.post("/translate")
    async def translate(request: Request):
        req = await parse(request, TranslateRequest)
        if isinstance(req, JSONResponse):
            return req
        if len(req.lines) > max_lines:
            return JSONResponse({"error": f"lines: at most {max_lines} per request, got {len(req.lines)}"},
                                status_code=400)

        async def work():
            mine = translator_for(req.options)
            prepared = [mine.prepare(_source(line), i) for i, line in enumerate(req.lines, 1)]
            return {"translations": [translation_record(t) for t in await batcher.translate(prepared, mine)]}
        return await answer(work)

    @app.post("/poem")
    async def poem(request: Request):
        if poet is None:
            return JSONResponse({"error": "this server writes no poems: start it with --poem-first MODEL"},
                                status_code=404)
        req = await parse(request, PoemRequest)
        if isinstance(req, JSONResponse):
            return req

        async def work():
            lines = await asyncio.to_thread(_guarded, replace(poet, tones=req.tones).write, [req.heads], req.chars)
            return {"heads": req.heads, "lines": lines[0]}
        return await answer(work)

    return app


PAGE = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
        "page.css": "text/css; charset=utf-8"}


def _page_file(name: str, media: str):
    body = (resources.files("seqtool") / "web" / name).read_bytes()  # read once, at start

    async def page() -> Response:
        return Response(body, media_type=media)
    return page


def _one_line(exc: ValidationError, within: str = "") -> str:
    """The first problem of a request body, or of its part `within`, e.g. 'lines.0.prefix: Input should be a
    valid string'. A line is a string or an object: for an object, the object's problem, not that it is no
    string. A check across fields (nbest with sample) has no place of its own: it is the whole's."""
    errors = exc.errors()
    first = next((e for e in errors if not (e["loc"][-1:] == ("str",) and isinstance(e["input"], dict))), errors[0])
    where = ".".join(([within] if within else []) + [str(p) for p in first["loc"] if p not in ("str", "Line")])
    message = first["msg"].removeprefix("Value error, ")
    if within == "options":  # the checks are DecodingConfig's: a request names its options without "decoding."
        message = message.replace("decoding.", "")
    return f"{where or 'body'}: {message}"


def check_port(host: str, port: int) -> None:
    """Fail with one clear line before the server starts, rather than in uvicorn's log."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:  # socket.gaierror (an unknown host) has a negative errno and its own strerror
        reason = (exc.strerror or str(exc)).split(" (while attempting")[0]  # create_server adds the address again
        raise SeqtoolError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(app: FastAPI, host: str, port: int, verbose: bool) -> None:
    check_port(host, port)
    routes = ", ".join(f"{method} {r.path}" for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                       for method in sorted(cast(set[str], r.methods)))  # an APIRoute always has methods (GET)
    print(f"seqtool: serving on http://{host}:{port} ({routes}; a page to try it at /)", file=sys.stderr, flush=True)
    try:  # "" binds every interface, as 0.0.0.0 does
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)} if host else set()
    except OSError:
        addresses = set()
    # an IPv4 / IPv6 address is a str (typeshed's sockaddr also allows other families' int)
    if not addresses or not all(ipaddress.ip_address(cast(str, a).split("%")[0]).is_loopback for a in addresses):
        print(f"seqtool: {host} is reachable from other machines: anyone who can reach it can use this model",
              file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
