"""The web app with real patients' films: uploads never reach the disk, and the server
trusts no stranger (Host header, token, rate limit, security headers), over real HTTP."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.serve import create_app
from pneumoscope.serve.security import API_CSP

BIG_UPLOAD_LIMIT = 16 * 2**20
PATIENT = {"PatientName": "Doe^Jane", "InstitutionName": "Example General"}


@pytest.fixture(scope="module")
def xray(shared_data) -> Path:
    return sorted((shared_data / "val" / "PNEUMONIA").glob("*.jpeg"))[0]


def post(client, name: str, data: bytes, **kwargs):
    return client.post("/v1/predict", files={"file": (name, data)}, **kwargs)


# ----------------------------------------------------------------------------- uploads stay in memory


class PauseMidBody:
    """ASGI wrapper: once the app has taken `after` bytes of an upload's body and asks for
    more (so it has handled those), stop there until the test has looked around."""

    def __init__(self, app, after: int):
        self.app, self.after = app, after
        self.paused, self.resume = threading.Event(), threading.Event()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/predict":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            if seen >= self.after and not self.paused.is_set():
                self.paused.set()
                while not self.resume.is_set():
                    await asyncio.sleep(0.01)
            message = await receive()
            seen += len(message.get("body", b""))
            return message

        return await self.app(scope, counted, send)


def open_files() -> set[str]:
    """What this process (the server runs in a thread of it) holds open that lives on a
    file system: sockets, pipes and devices left out."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            found.add(target)
    return found


def big_dicom(xray: Path, make_dicom) -> bytes:
    """A real film as a ~6 MB 16-bit DICOM with a patient's name in its header."""
    gray = np.asarray(Image.open(xray).convert("L").resize((2000, 1500)))
    return make_dicom(
        gray.astype(np.uint16) * 257, WindowCenter=32767.5, WindowWidth=65536, **PATIENT
    )


def test_a_large_upload_never_touches_the_disk(
    deploy_run, server_for, xray, make_dicom, tmp_path, monkeypatch
):
    """Halfway through a 6 MB DICOM upload (Starlette spooled anything over 1 MiB to a
    file in /tmp), the server holds no new open file and the temporary folder is empty."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))  # where a spooled part would go
    data = big_dicom(xray, make_dicom)
    assert len(data) > 4 * 2**20
    app = PauseMidBody(
        create_app(deploy_run, device="cpu", max_upload_bytes=BIG_UPLOAD_LIMIT), after=3 * 2**20
    )
    with server_for(app) as server:
        before = open_files()
        answer = {}
        upload = threading.Thread(
            target=lambda: answer.update(
                r=post(httpx.Client(base_url=server.url, timeout=300), "big.dcm", data)
            )
        )
        upload.start()
        try:
            assert app.paused.wait(timeout=300), "the upload never reached the middle of its body"
            written = sorted(open_files() - before)
            in_tmp = sorted(p.name for p in private_tmp.iterdir())
        finally:
            app.resume.set()
            upload.join(timeout=300)
    assert written == [] and in_tmp == [], (written, in_tmp)
    assert answer["r"].status_code == 200, answer["r"].text
    assert "Doe" not in answer["r"].text


def test_an_upload_over_the_limit_is_refused_before_the_rest_is_read(deploy_run, server_for):
    limit = 64 * 1024
    with server_for(create_app(deploy_run, device="cpu", max_upload_bytes=limit)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = post(client, "big.dcm", b"\0" * (limit + 1))
    assert r.status_code == 413 and f"{limit:,}" in r.json()["detail"]


# ----------------------------------------------------------------------------- Host header


def test_a_foreign_host_header_is_refused(live_server, xray):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches
    the server, but its requests still say Host: evil.example."""
    with httpx.Client(base_url=live_server.url, timeout=120) as client:
        for path in ("/", "/healthz"):
            r = client.get(path, headers={"Host": "evil.example"})
            assert r.status_code == 400 and "evil.example" in r.json()["detail"], path
        r = post(client, xray.name, xray.read_bytes(), headers={"Host": "evil.example:8000"})
        assert r.status_code == 400
        port = live_server.url.rsplit(":", 1)[1]
        for name in ("127.0.0.1", "localhost"):
            assert client.get("/healthz", headers={"Host": f"{name}:{port}"}).status_code == 200, (
                name
            )


def test_allowed_hosts_adds_names(deploy_run, server_for):
    app = create_app(deploy_run, device="cpu", allowed_hosts=("xray.lab.example",))
    with server_for(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.get("/healthz", headers={"Host": "xray.lab.example"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "other.lab.example"}).status_code == 400


# ----------------------------------------------------------------------------- token


def test_a_token_guards_everything_but_the_page(deploy_run, server_for, xray):
    token = "s3cret-token"
    with server_for(create_app(deploy_run, device="cpu", token=token)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {token}"},
                {"Authorization": f"Bearer {token}x"},
            ):
                r = post(client, xray.name, xray.read_bytes(), headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
                assert client.get("/healthz", headers=headers).status_code == 401
                assert client.get("/openapi.json", headers=headers).status_code == 401
            good = {"Authorization": f"Bearer {token}"}
            assert post(client, xray.name, xray.read_bytes(), headers=good).status_code == 200
            assert client.get("/healthz", headers=good).status_code == 200
            for path in ("/", "/static/app.js", "/static/style.css"):  # the page asks for the token
                assert client.get(path).status_code == 200, path


def test_serving_beyond_loopback_needs_a_token(deploy_run, monkeypatch, capsys):
    import uvicorn

    def started(*args, **kwargs):  # a server that would answer the whole network, unguarded
        raise AssertionError("serve started on 0.0.0.0 without a token")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.delenv("PNEUMOSCOPE_TOKEN", raising=False)
    assert main(["serve", str(deploy_run), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "PNEUMOSCOPE_TOKEN" in err and "Traceback" not in err


def test_serve_announces_its_guards(deploy_run, monkeypatch, capsys):
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("PNEUMOSCOPE_TOKEN", "from-the-environment")
    assert (
        main(
            ["serve", str(deploy_run), "--host", "0.0.0.0", "--device", "cpu", "--rate-limit", "30"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert started["host"] == "0.0.0.0"
    assert (
        "token required" in out and "30 requests a minute" in out and "never written to disk" in out
    )
    assert "from-the-environment" not in out  # the token itself is not printed


# ----------------------------------------------------------------------------- rate limit, headers


def test_rate_limit_per_client_is_429(deploy_run, server_for):
    with server_for(create_app(deploy_run, device="cpu", rate_limit=3)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            codes = [client.get("/healthz").status_code for _ in range(4)]
            refused = client.get("/healthz")
            page = client.get("/")  # the page and its files are not counted
        # another client (another loopback source address) has its own allowance
        other = httpx.Client(
            base_url=server.url,
            timeout=60,
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),
        )
        with other:
            assert other.get("/healthz").status_code == 200
    assert codes == [200, 200, 200, 429]
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "3 a minute" in refused.json()["detail"] and page.status_code == 200


def test_every_response_has_a_content_security_policy(live_server, xray):
    with httpx.Client(base_url=live_server.url, timeout=120) as client:
        answers = {
            "page": client.get("/"),
            "health": client.get("/healthz"),
            "openapi": client.get("/openapi.json"),
            "missing": client.get("/nothing-here"),
            "script": client.get("/static/app.js"),
            "bad upload": post(client, "x.txt", b"hello"),
            "prediction": post(client, xray.name, xray.read_bytes()),
            "foreign host": client.get("/", headers={"Host": "evil.example"}),
        }
    for what, r in answers.items():
        assert r.headers.get("content-security-policy"), what
        assert r.headers.get("x-content-type-options") == "nosniff", what
    assert "script-src 'self'" in answers["page"].headers["content-security-policy"]
    assert answers["health"].headers["content-security-policy"] == API_CSP


@pytest.mark.browser
def test_the_page_asks_for_the_token(guarded_page, deploy_run, server_for, xray):
    """In Chromium: a server with a token answers the page's upload with 401; the page
    shows the token field, and with the token the upload gives its result."""
    with server_for(create_app(deploy_run, device="cpu", token="page-token")) as server:
        page = guarded_page(server.url)
        page.goto(server.url + "/")
        assert page.is_hidden("#token-box")
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#token-box", state="visible", timeout=120_000)
        assert "access token" in page.inner_text("#status")
        page.fill("#token", "page-token")
        page.set_input_files("#file", files=[])
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#result", state="visible", timeout=120_000)
        assert page.inner_text("#label") in ("NORMAL", "PNEUMONIA")
        assert page.outside == []


def test_host_name_takes_only_what_a_browser_sends():
    from pneumoscope.serve.security import host_name

    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1"
    assert host_name("Example.org:8000") == "example.org"
    for forged in ("[::1].evil.example", "[::1]evil", "[::1]:80x", "[::1"):
        assert host_name(forged) not in ("::1", "127.0.0.1", "localhost"), forged


def test_rate_limit_memory_stays_bounded_under_many_clients():
    from pneumoscope.serve.security import TokenBuckets

    buckets = TokenBuckets(120)
    for i in range(30_000):  # each client once: none is ever refused
        assert buckets.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") == 0.0
    assert len(buckets.buckets) <= 10_001
    for _ in range(120):  # a busy client keeps its state through the pruning
        buckets.take("192.0.2.1")
    assert buckets.take("192.0.2.1") > 0


def test_serve_ignores_forwarded_for_headers(monkeypatch, deploy_run):
    """`pneumoscope serve` runs uvicorn without proxy headers, so a caller's X-Forwarded-For
    cannot choose the address the rate limit counts (uvicorn trusts it from loopback otherwise)."""
    import uvicorn

    from pneumoscope.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert main(["serve", str(deploy_run), "--port", "0"]) == 0
    assert seen.get("proxy_headers") is False
