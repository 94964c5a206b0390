"""seqtool serve under load: 8, 32 and 128 concurrent clients for a fixed time, every answer checked.

Starts `seqtool serve` on a free localhost port (with --shortlist 0, so that a line's translation does
not depend on the lines it shares a batch with), learns the translation of each pool sentence from a
lone request, then runs each concurrency level for --seconds: half the clients send single lines, the
other half requests of --request-lines lines (pool sentences in a random order, every 10th line empty).
A reply is an error unless it is a 200 holding exactly the request's lines, each translated as alone,
in order; a 503 (back-pressure, --max-queue) is counted apart and retried after its Retry-After. Reports
p50 / p99 latency per kind of request, lines/s, and the server's RSS at the start and end of each level.
Stops by itself; talks to 127.0.0.1 only.

    python bench/serve_load.py                       # trains the test suite's sample model first (~30 s)
    python bench/serve_load.py --model runs/sample --levels 8,32,128 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
# The test suite's fixture model (tests/conftest.py LEARNS): test BLEU 100 on the sample task.
SAMPLE_MODEL = ["--set", "model.embedding_size=64", "--set", "model.encoder_hidden_size=64", "--set",
                "model.hidden_size=128", "--set", "training.max_steps=400", "--set", "training.max_minutes=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "serve", "-m", model, "--port", str(port),
                             "--shortlist", "0", *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


def expected_translations(url: str, pool: list[str]) -> dict[str, str]:
    """Each pool sentence translated alone: what every batched answer must equal."""
    expected = {"": ""}
    for line in pool:
        reply = httpx.post(url + "/translate", json={"lines": [line]}, timeout=120)
        reply.raise_for_status()
        expected[line] = reply.json()["translations"][0]["text"]
    return expected


async def run_level(url: str, clients: int, seconds: float, expected: dict[str, str], request_lines: int = 100,
                    seed: int = 0) -> dict:
    """`clients` concurrent clients for `seconds`; -> counts, latencies and lines/s for this level."""
    pool = [line for line in expected if line]
    stats = {"requests": 0, "lines": 0, "errors": 0, "busy_503": 0, "first_error": None}
    latency: dict[str, list[float]] = {"1 line": [], f"{request_lines} lines": []}
    stop = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        size = 1 if i % 2 == 0 else request_lines
        kind = "1 line" if size == 1 else f"{request_lines} lines"
        while time.monotonic() < stop:
            lines = ["" if size > 1 and j % 10 == 9 else rng.choice(pool) for j in range(size)]
            start = time.monotonic()
            try:
                reply = await http.post("/translate", json={"lines": lines})
            except httpx.HTTPError as exc:
                stats["errors"] += 1
                stats["first_error"] = stats["first_error"] or f"{type(exc).__name__}: {exc}"
                continue
            if reply.status_code == 503:
                stats["busy_503"] += 1
                await asyncio.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            got = [t["text"] for t in reply.json()["translations"]] if reply.status_code == 200 else None
            if got != [expected[line] for line in lines]:
                stats["errors"] += 1
                stats["first_error"] = stats["first_error"] or f"status {reply.status_code}: {reply.text[:200]}"
                continue
            latency[kind].append(time.monotonic() - start)
            stats["requests"] += 1
            stats["lines"] += size

    began = time.monotonic()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.monotonic() - began
    out = {"clients": clients, **stats, "seconds": round(wall, 1), "lines_per_s": round(stats["lines"] / wall, 1)}
    for kind, values in latency.items():
        if values:
            values.sort()
            out[f"p50_ms {kind}"] = round(1000 * statistics.median(values), 1)
            out[f"p99_ms {kind}"] = round(1000 * values[min(len(values) - 1, int(0.99 * len(values)))], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir or file; default: train the test suite's sample model first")
    ap.add_argument("--levels", default="8,32,128")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--request-lines", type=int, default=100)
    ap.add_argument("--beam", default="5")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = f"{tmp}/model"
            subprocess.run([sys.executable, "-m", "seqtool", "train", "-c", "configs/sample.yaml", "-o", model, "-q",
                            *SAMPLE_MODEL], cwd=ROOT, check=True)
        port = free_port()
        server = start_server(model, port, ["--beam", args.beam])
        url = f"http://127.0.0.1:{port}"
        try:
            pool = (SAMPLE / "test.src").read_text(encoding="utf-8").splitlines()[:200]
            expected = expected_translations(url, pool)
            rows = []
            for level in [int(x) for x in args.levels.split(",")]:
                before = rss_mb(server.pid)
                row = asyncio.run(run_level(url, level, args.seconds, expected, args.request_lines))
                row.update(rss_start_mb=round(before, 1), rss_end_mb=round(rss_mb(server.pid), 1))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    keys = [k for k in rows[0] if k != "first_error"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if any(row["errors"] for row in rows):
        raise SystemExit("errors under load: " + "; ".join(str(r["first_error"]) for r in rows if r["errors"]))


if __name__ == "__main__":
    main()
