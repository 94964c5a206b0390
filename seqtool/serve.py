"""An HTTP JSON API over a Translator (FastAPI): lines from concurrent requests are decoded together.

    POST /translate  {"lines": ["...", ...]}  ->  {"translations": [{"text", "nbest", "pieces", ...}]}
    GET  /health     ->  {"status": "ok", "requests": N, "lines": N, "batches": N}
    GET  /info       ->  the model card (as `seqtool info --json`)

Malformed requests get 400 (413 for an oversized body) with {"error": "..."}; never a 500.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from seqtool.errors import SeqtoolError
from seqtool.translate import Translation, Translator, translation_record

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.exceptions import HTTPException
except ImportError:  # pragma: no cover - depends on the install
    raise SeqtoolError("seqtool serve needs fastapi and uvicorn: pip install 'seqtool[serve]'") from None


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines: list[str]


@dataclass
class Batcher:
    """Queues the lines of each request; one worker decodes everything waiting (up to `max_lines`) at once."""

    translator: Translator
    max_lines: int
    wait_s: float  # how long the first request of a batch waits for company
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stats: dict = field(default_factory=lambda: {"requests": 0, "lines": 0, "batches": 0})

    async def translate(self, lines: list[str]) -> list[Translation]:
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((lines, done))
        return await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while sum(len(lines) for lines, _ in jobs) < self.max_lines:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            lines = [line for job_lines, _ in jobs for line in job_lines]
            try:
                results = await asyncio.to_thread(self.translator.translate, lines)
            except Exception as exc:  # reported to every waiting request, and the server stays up
                for _, done in jobs:
                    done.set_exception(exc)
                continue
            self.stats["batches"] += 1
            for job_lines, done in jobs:
                done.set_result(results[: len(job_lines)])
                results = results[len(job_lines):]


def make_app(translator: Translator, card: dict, max_lines: int = 1000, max_body: int = 1 << 20,
             wait_ms: float = 5.0) -> FastAPI:
    batcher = Batcher(translator, max_lines, wait_ms / 1000)

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
            return JSONResponse({"error": f"request body over {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **batcher.stats}

    @app.get("/info")
    async def info() -> dict:
        return card

    @app.post("/translate")
    async def translate(request: Request):
        # The body is read as JSON whatever its Content-Type says (curl -d sends form-encoded).
        try:
            req = TranslateRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": _one_line(exc)}, status_code=400)
        if len(req.lines) > max_lines:
            return JSONResponse({"error": f"lines: at most {max_lines} per request, got {len(req.lines)}"},
                                status_code=400)
        batcher.stats["requests"] += 1
        batcher.stats["lines"] += len(req.lines)
        # A line break inside a line would make it two lines elsewhere in seqtool: treat it as a space.
        try:
            results = await batcher.translate([" ".join(line.splitlines()) for line in req.lines])
        except SeqtoolError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return {"translations": [translation_record(t) for t in results]}

    return app


def _one_line(exc: ValidationError) -> str:
    """The first problem of a request body, e.g. 'lines.0: Input should be a valid string'."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def check_port(host: str, port: int) -> None:
    """Fail with one clear line before the server starts, rather than in uvicorn's log."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SeqtoolError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(app: FastAPI, host: str, port: int, verbose: bool) -> None:
    import uvicorn

    check_port(host, port)
    print(f"seqtool: serving on http://{host}:{port} (POST /translate, GET /health, GET /info)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
