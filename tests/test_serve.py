"""seqtool serve: a real server on localhost, a real HTTP client, concurrent and malformed requests."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, readline_within, run_cli
from seqtool.serve import make_app
from seqtool.translate import Translation


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
    cli = run_cli("translate", "-m", str(trained_model), "--beam", "5", "--shortlist", "0",
                  input="\n".join(lines) + "\n", check=True)
    assert got == cli.stdout.split("\n")[:-1] and got[1] == got[3] == ""


def test_concurrent_requests_each_get_their_own_lines(server):
    url, _ = server
    before = httpx.get(url + "/health").json()
    requests = [[f"seliti roma {w}"] * (i % 3 + 1)
                for i, w in enumerate(["zefu", "la", "sa", "roma", "fizafa", "zefu"])]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda lines: httpx.post(url + "/translate", json={"lines": lines}, timeout=60),
                                requests))
    alone = {lines[0]: httpx.post(url + "/translate", json={"lines": lines[:1]},
                                  timeout=60).json()["translations"][0]["text"]
             for lines in requests}
    for lines, reply in zip(requests, replies):
        assert reply.status_code == 200
        texts = [t["text"] for t in reply.json()["translations"]]
        assert texts == [alone[lines[0]]] * len(lines)
    after = httpx.get(url + "/health").json()
    assert after["requests"] - before["requests"] == len(requests) * 2


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


def test_lines_with_controls_and_a_request_that_cannot_be_met(server, trained_model):
    """A line may be an object with the fields `translate --input-format jsonl` reads; the answers are the
    CLI's, and a control that cannot be met fails its request with the line named."""
    url, _ = server
    lines = [{"text": "seliti roma zefu", "prefix": "voba Kevi"}, "fizafa la sa",
             {"text": "seliti sate bi vizigi", "constraints": ["Roda"], "avoid": ["keke"]}]
    r = httpx.post(url + "/translate", json={"lines": lines}, timeout=60)
    assert r.status_code == 200, r.text
    got = [t["text"] for t in r.json()["translations"]]
    jsonl = "\n".join(json.dumps(line) for line in lines) + "\n"
    cli = run_cli("translate", "-m", str(trained_model), "--beam", "5", "--shortlist", "0", "--input-format", "jsonl",
                  input=jsonl, check=True)
    assert got == cli.stdout.split("\n")[:-1]
    assert got[0].startswith("voba Kevi") and "Roda" in got[2].split() and "keke" not in got[2].split()
    r = httpx.post(url + "/translate", json={"lines": ["a", {"text": "b", "prefix": "x\ny"}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("line 2: the prefix 'x\\ny' holds a control character")
    r = httpx.post(url + "/translate", json={"lines": [{"text": 5}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "lines.0.text: Input should be a valid string"


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
    assert (proc.returncode == 1
            and proc.stderr == f"seqtool: error: cannot listen on 127.0.0.1:{port}: Address already in use\n")


# -- in-process: the batcher under failure and back-pressure -----------------------------------
class FakeTranslator:
    """Echoes each line upper-cased; fails on a line 'boom' (a seqtool bug stand-in); can be held."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()
        self.calls = 0

    def prepare(self, source, lineno):
        return source.text

    def run(self, lines):
        self.calls += 1
        self.started.set()
        assert self.release.wait(30)
        if "boom" in lines:
            raise RuntimeError("something inside broke\nsecond line of it")
        return [Translation(line.upper()) for line in lines]


def in_process(app, scenario):
    """Run `scenario(client)` against the app in this process, its batcher started as the server starts it."""
    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://seqtool") as client:
                return await asyncio.wait_for(scenario(client), 60)  # a broken server fails, never hangs

    return asyncio.run(main())


def test_an_unexpected_error_fails_only_its_own_request():
    async def scenario(client):
        return await asyncio.gather(*(client.post("/translate", json={"lines": lines})
                                      for lines in (["a", "b"], ["boom"], ["c"])))

    replies = in_process(make_app(FakeTranslator(), {}, max_lines=50, wait_ms=200), scenario)
    assert [r.status_code for r in replies] == [200, 500, 200]
    assert [t["text"] for t in replies[0].json()["translations"]] == ["A", "B"]
    assert replies[1].json() == {"error": "internal error: RuntimeError: something inside broke"}
    assert [t["text"] for t in replies[2].json()["translations"]] == ["C"]


def test_requests_that_wait_together_are_decoded_together():
    """While one batch is being decoded, the requests that arrive wait, and go together in the next batch."""
    fake = FakeTranslator()
    fake.release.clear()

    async def scenario(client):
        first = asyncio.create_task(client.post("/translate", json={"lines": ["a"]}))
        assert await asyncio.to_thread(fake.started.wait, 30)
        rest = [asyncio.create_task(client.post("/translate", json={"lines": [w] * n}))
                for w, n in zip("bcde", (1, 2, 3, 1))]
        while (await client.get("/health")).json()["waiting"] < 7:
            await asyncio.sleep(0.01)
        fake.release.set()
        return await first, await asyncio.gather(*rest), (await client.get("/health")).json()

    first, rest, health = in_process(make_app(fake, {}, max_lines=50, wait_ms=0), scenario)
    assert [[t["text"] for t in r.json()["translations"]] for r in rest] == [["B"], ["C"] * 2, ["D"] * 3, ["E"]]
    assert health["batches"] == 2 and fake.calls == 2 and health["requests"] == 5


def test_a_full_queue_gets_503_at_once_and_the_rest_is_served():
    fake = FakeTranslator()
    fake.release.clear()

    async def scenario(client):
        first = asyncio.create_task(client.post("/translate", json={"lines": ["a", "b", "c"]}))
        assert await asyncio.to_thread(fake.started.wait, 30)  # being decoded: its lines no longer wait
        second = asyncio.create_task(client.post("/translate", json={"lines": ["d"] * 5}))
        while (await client.get("/health")).json()["waiting"] < 5:
            await asyncio.sleep(0.01)
        refused = await client.post("/translate", json={"lines": ["e"]})  # while the decoder is still held
        fake.release.set()
        return refused, await first, await second, (await client.get("/health")).json()

    refused, first, second, health = in_process(make_app(fake, {}, max_lines=5, wait_ms=0, max_queue=5), scenario)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "server busy: 5 lines waiting" in refused.json()["error"]
    assert first.status_code == second.status_code == 200
    assert health["refused_busy"] == 1 and health["waiting"] == 0


# -- a real server: abusive clients ------------------------------------------------------------
def _raw_request(port: int, head: bytes, chunks, pause: float = 0.0) -> bytes:
    """Send `head` then each chunk (with a pause between) until the server answers; return the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:  # answered early (413): stop sending, read the answer
                break
            sock.sendall(chunk)
            time.sleep(pause)
        reply = b""
        try:
            while data := sock.recv(65536):
                reply += data
        except ConnectionResetError:  # closed on the unread rest of the body, after the answer
            pass
        return reply


def test_chunked_bodies_are_limited_like_the_others(server):
    _, port = server
    head = b"POST /translate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    piece = b'{"lines": ["' + b"a" * 60000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] + [b"%x\r\n%s\r\n" % (60000, b"a" * 60000)] * 30 + [b"0\r\n\r\n"]
    reply = _raw_request(port, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413") and b"request body over 1048576 bytes" in reply
    small = b'{"lines": ["seliti roma zefu"]}'
    reply = _raw_request(port, head, [b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)])
    assert reply.startswith(b"HTTP/1.1 200") and b'"translations"' in reply


def test_huge_requests_are_refused_with_a_status_and_a_message(server):
    url, _ = server
    many = httpx.post(url + "/translate", content=b'{"lines": [' + b'"",' * (10**6 - 1) + b'""]}', timeout=60)
    assert many.status_code == 413 and "over 1048576 bytes" in many.json()["error"]
    long = httpx.post(url + "/translate", content=b'{"lines": ["' + b"zefu " * (2 * 10**6) + b'"]}', timeout=60)
    assert long.status_code == 413 and "over 1048576 bytes" in long.json()["error"]
    lines = httpx.post(url + "/translate", json={"lines": [""] * 51}, timeout=60)  # under 1 MB, over --max-lines
    assert lines.status_code == 400 and "at most 50 per request" in lines.json()["error"]


def test_a_slow_client_holds_neither_the_batcher_nor_other_clients(server):
    url, port = server
    body = b'{"lines": ["seliti roma zefu"]}'
    head = b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_raw_request, port, head, [body[i:i + 1] for i in range(len(body))], 0.1)  # ~3 s
        time.sleep(0.3)
        for _ in range(3):  # answered while the slow body trickles in
            start = time.monotonic()
            r = httpx.post(url + "/translate", json={"lines": ["fizafa la sa"]}, timeout=60)
            assert r.status_code == 200 and time.monotonic() - start < 2.5 and not slow.done()
        assert slow.result().startswith(b"HTTP/1.1 200")


def test_a_body_that_never_ends_is_cut_off():
    fake = FakeTranslator()
    app = make_app(fake, {}, body_timeout_s=0.5)

    async def stalled():
        messages = [{"type": "http.request", "body": b'{"lines": ', "more_body": True}]
        sent = []

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # the rest never comes

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/translate", "headers": [], "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "server": ("x", 80), "client": ("y", 1), "root_path": ""}
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    sent = asyncio.run(stalled())
    assert sent[0]["status"] == 408 and b"not received within 0.5 s" in sent[1]["body"]


def test_binding_beyond_localhost_is_said_and_bad_ports_hosts_are_one_line(trained_model):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "seqtool", "serve", "-m", str(trained_model), "--host", "0.0.0.0",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        # a missing line fails, never hangs
        first, second = readline_within(proc.stderr, 120), readline_within(proc.stderr, 30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first.startswith(f"seqtool: serving on http://0.0.0.0:{port} (GET /health, GET /info, POST /translate, "
                            "POST /poem; a page to try it at /)".encode())  # the banner lists the app's own routes
    assert b"0.0.0.0 is reachable from other machines" in second
    for args, message in ((["--port", "70000"], "--port must be a TCP port, 1 to 65535, not 70000"),
                          (["--port", "0"], "--port must be a TCP port"),
                          (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid:8000: "),
                          (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1:8000: ")):
        proc = run_cli("serve", "-m", str(trained_model), *args)
        assert proc.returncode in (1, 2) and proc.stderr.startswith(f"seqtool: error: {message}"), proc.stderr
        assert proc.stderr.count("\n") == 1


def test_uvicorn_missing_while_fastapi_is_there_is_one_line(trained_model, monkeypatch):
    from test_fuzz import run_main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    monkeypatch.delitem(sys.modules, "seqtool.serve")
    code, _, err = run_main("serve", "-m", str(trained_model))
    assert code == 1 and err == ("seqtool: error: seqtool serve needs fastapi and uvicorn (uvicorn is missing): "
                                 "pip install 'seqtool[serve]'\n")


def test_a_client_that_goes_away_does_not_break_the_batcher():
    fake = FakeTranslator()
    fake.release.clear()

    async def scenario(client):
        first = asyncio.create_task(client.post("/translate", json={"lines": ["a"]}))
        assert await asyncio.to_thread(fake.started.wait, 30)
        gone = asyncio.create_task(client.post("/translate", json={"lines": ["b"]}))
        while (await client.get("/health")).json()["waiting"] < 1:
            await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnects while its request waits
        fake.release.set()
        await first
        return await client.post("/translate", json={"lines": ["c"]})

    after = in_process(make_app(fake, {}, max_lines=5, wait_ms=0), scenario)
    assert after.status_code == 200 and after.json()["translations"][0]["text"] == "C"


def test_load_many_clients_every_answer_its_own_lines_in_order(server):
    """bench/serve_load.py, short: 8 then 32 concurrent clients (single lines and 20-line requests) for 2 s
    each; every reply must be a 200 with the request's own lines, each translated as when sent alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    url, _ = server
    expected = load.expected_translations(url, (ROOT / "sample_data" / "test.src").read_text().splitlines()[:20])
    for clients in (8, 32):
        row = asyncio.run(load.run_level(url, clients, 2.0, expected, request_lines=20))
        assert row["errors"] == 0 and row["busy_503"] == 0, row
        assert row["requests"] >= clients and row["lines"] > row["requests"], row


def test_a_request_chooses_its_own_search_and_gets_the_clis_answers(server, trained_model):
    url, _ = server
    lines = ["seliti roma zefu", "fizafa la sa"]
    for options, flags in (({"beam_size": 3, "nbest": 2}, ["--beam", "3", "--nbest", "2"]),
                           ({"beam_size": 1}, ["--beam", "1"]),
                           ({"sample": True, "seed": 4, "temperature": 0.7}, ["--sample", "--seed", "4",
                                                                             "--temperature", "0.7"])):
        r = httpx.post(url + "/translate", json={"lines": lines, "options": options}, timeout=60)
        assert r.status_code == 200, r.text
        cli = run_cli("translate", "-m", str(trained_model), "--shortlist", "0", "--format", "json", *flags,
                      input="\n".join(lines) + "\n", check=True)
        want = [json.loads(line) for line in cli.stdout.splitlines()]
        got = r.json()["translations"]
        assert [t["text"] for t in got] == [t["text"] for t in want]
        assert [[h["text"] for h in t["nbest"]] for t in got] == [[h["text"] for h in t["nbest"]] for t in want]
    r = httpx.post(url + "/translate", json={"lines": lines, "options": {"attention": True}}, timeout=60)
    weights = r.json()["translations"][0]["attention"]
    assert len(weights[0]) == len(r.json()["translations"][0]["src_pieces"])
    for options, message in (({"beam_size": 99}, "options.beam_size"), ({"top_p": 2}, "options.top_p"),
                             ({"beams": 2}, "options.beams"),
                             ({"sample": True, "nbest": 2}, "options: nbest 2 with sample: sampling draws")):
        r = httpx.post(url + "/translate", json={"lines": lines, "options": options}, timeout=60)
        assert r.status_code == 400 and r.json()["error"].startswith(message), r.text


def _browser():
    """A headless chromium driven by selenium, or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_translates_a_typed_line_and_shows_errors_in_a_real_browser(server, trained_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    line = "seliti roma zefu"
    want = json.loads(run_cli("translate", "-m", str(trained_model), "--shortlist", "0", "--beam", "5", "--nbest",
                              "3", "--format", "json", input=line + "\n", check=True).stdout)
    page = _browser()
    try:
        page.get(url + "/")
        wait = WebDriverWait(page, 60)
        wait.until(lambda p: "parameters" in p.find_element(By.ID, "model").text)  # the model card arrived
        page.find_element(By.ID, "lines").send_keys(line)
        nbest = page.find_element(By.ID, "nbest")
        nbest.clear()
        nbest.send_keys("3")
        page.find_element(By.ID, "attention").click()
        page.find_element(By.ID, "go").click()
        shown = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#out .result .text")))
        assert shown.text == want["text"]
        items = [li.text for li in page.find_elements(By.CSS_SELECTOR, "#out .result ol li")]
        assert [i.rsplit(" (", 1)[0] for i in items] == [h["text"] for h in want["nbest"]]
        assert len(page.find_elements(By.CSS_SELECTOR, "#out table.attention tbody tr")) == len(want["pieces"]) + 1
        page.save_screenshot(str(tmp_path / "page.png"))
        # An error from the API is shown as its message (the page leaves the checking to the server).
        beam = page.find_element(By.ID, "beam")
        beam.clear()
        beam.send_keys("99")
        page.find_element(By.ID, "go").click()
        error = wait.until(ready.visibility_of_element_located((By.ID, "error")))
        assert error.text == "options.beam_size: Input should be less than or equal to 32"
    finally:
        page.quit()
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
