"""seqtool serve: a real server on localhost, a real HTTP client, concurrent and malformed requests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_model):
    """The server on a free port, waiting up to 300 ms per batch so that concurrent requests share one. Without
    the model's shortlist: a shortlist is the union over a batch's sentences, so a line's translation may
    depend on the lines it shares a batch with, and the tests compare batched requests with lone ones."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "serve", "-m", str(trained_model), "--port", str(port),
                             "--batch-wait-ms", "300", "--max-lines", "50", "--beam", "5", "--shortlist", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stderr.read()}")
            time.sleep(0.1)
    yield url, port
    proc.terminate()
    proc.wait(timeout=30)


def test_translations_match_the_cli(server, trained_model):
    url, _ = server
    lines = ["seliti roma zefu", "", "fizafa la sa", "   "]
    r = httpx.post(url + "/translate", json={"lines": lines}, timeout=60)
    assert r.status_code == 200
    got = [t["text"] for t in r.json()["translations"]]
    cli = run_cli("translate", "-m", str(trained_model), "--beam", "5", "--shortlist", "0", input="\n".join(lines) + "\n", check=True)
    assert got == cli.stdout.split("\n")[:-1] and got[1] == got[3] == ""


def test_concurrent_requests_are_batched_and_each_gets_its_own_lines(server):
    url, _ = server
    before = httpx.get(url + "/health").json()
    requests = [[f"seliti roma {w}"] * (i % 3 + 1) for i, w in enumerate(["zefu", "la", "sa", "roma", "fizafa", "zefu"])]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda lines: httpx.post(url + "/translate", json={"lines": lines}, timeout=60),
                                requests))
    alone = {lines[0]: httpx.post(url + "/translate", json={"lines": lines[:1]}, timeout=60).json()["translations"][0]["text"]
             for lines in requests}
    for lines, reply in zip(requests, replies):
        assert reply.status_code == 200
        texts = [t["text"] for t in reply.json()["translations"]]
        assert texts == [alone[lines[0]]] * len(lines)
    after = httpx.get(url + "/health").json()
    assert after["requests"] - before["requests"] == len(requests) * 2
    batches = after["batches"] - before["batches"] - len(requests)  # the `alone` requests came one by one
    assert 1 <= batches < len(requests)


@pytest.mark.parametrize("body, message", [
    (b"not json", "Invalid JSON"),
    (b'{"lines": "one line"}', "lines: Input should be a valid array"),
    (b'{"lines": [1, 2]}', "lines.0: Input should be a valid string"),
    (b'{"lines": [], "beam": 3}', "beam: Extra inputs are not permitted"),
    (b'{}', "lines: Field required"),
    (b'[]', "Input should be an object"),
    (b'{"lines": ["\xff\xfe"]}', "Invalid JSON"),
    (b'{"lines": [' + b'"a",' * 60 + b'"a"]}', "at most 50 per request"),
])
def test_malformed_requests_get_400_with_a_message(server, body, message):
    url, _ = server
    r = httpx.post(url + "/translate", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400 and message in r.json()["error"]


def test_oversized_body_unknown_route_and_health_info(server):
    url, _ = server
    r = httpx.post(url + "/translate", content=b'{"lines": ["' + b"a" * (2 << 20) + b'"]}')
    assert r.status_code == 413 and "over" in r.json()["error"]
    assert httpx.get(url + "/nope").json() == {"error": "Not Found"}
    assert httpx.get(url + "/translate").status_code == 405
    info = httpx.get(url + "/info").json()
    assert info["format_version"] == 1 and info["parameters"] > 0
    assert httpx.post(url + "/translate", json={"lines": ["still up"]}).status_code == 200


def test_port_in_use_is_one_line(server, trained_model):
    _, port = server
    proc = run_cli("serve", "-m", str(trained_model), "--port", str(port))
    assert proc.returncode == 1 and proc.stderr == f"seqtool: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
