"""The JSON API over real HTTP: a uvicorn server on a free loopback port, httpx requests."""

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from pneumoscope.inference import Predictor

FIELDS = {"p_pneumonia", "label", "threshold", "model"}


@pytest.fixture(scope="module")
def client(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def xray(shared_data):
    return sorted((shared_data / "val" / "PNEUMONIA").glob("*.jpeg"))[0]


def encodings(xray, encode) -> dict[str, bytes]:
    """The same real X-ray as JPEG, 16-bit PNG and two DICOMs (MONOCHROME2 16-bit,
    MONOCHROME1 12-bit), each decoding to the JPEG's gray levels."""
    gray = np.asarray(Image.open(xray).convert("L"))
    files = {"xray.jpeg": xray.read_bytes()}
    for fmt in ("png16", "dcm_mono2_16", "dcm_mono1_12"):
        data, suffix = encode(gray, fmt)
        files[f"xray_{fmt}{suffix}"] = data
    return files


def post(client, name, data, **params):
    return client.post("/v1/predict", files={"file": (name, data)}, params=params)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height 8-bit gray, with a tiny IDAT."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"]["backbone"] == "efficientnet_lite0"
    # the default engine on a CPU (pneumoscope.deploy.scoring)
    assert body["model"]["runtime"] == "onnxruntime"


def test_openapi_without_swagger_ui(client):
    # Swagger UI and ReDoc load their scripts from a CDN: not served (a clinical workstation
    # makes no third-party request); the API description itself is served
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/healthz" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_every_format_predicts_the_same(client, xray, encode, deploy_run, run_threshold):
    predictor = Predictor.from_run(deploy_run, device="cpu")
    expected = float(predictor.predict_images(predictor.load(xray)[None])[0])
    files = encodings(xray, encode)
    assert {n.rsplit(".", 1)[1] for n in files} == {"jpeg", "png", "dcm"}
    for name, data in files.items():
        r = post(client, name, data)
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert FIELDS <= set(body) and "heatmap_png" not in body
        assert body["p_pneumonia"] == pytest.approx(expected, abs=1e-4), name
        assert body["threshold"] == pytest.approx(run_threshold)
        assert body["label"] == ("PNEUMONIA" if body["p_pneumonia"] >= run_threshold else "NORMAL")


def test_heatmap_is_a_png_overlay(client, xray):
    r = post(client, "xray.jpeg", xray.read_bytes(), heatmap="true")
    assert r.status_code == 200
    body = r.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    model_input = Image.open(io.BytesIO(base64.b64decode(body["input_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (64, 64)
    assert model_input.size == (64, 64)
    rgb = np.asarray(overlay).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 20  # coloured, not a gray copy


@pytest.mark.parametrize(
    "name,data,status,words",
    [
        (
            "random.bin",
            bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
            415,
            "unsupported format",
        ),
        ("notes.txt", b"patient notes, not an image\n" * 20, 415, "not an image"),
        ("empty.jpeg", b"", 422, "empty"),
        ("bomb.png", png_header(30000, 30000), 422, "too large"),
        ("cut.png", None, 422, "truncated or corrupt"),
    ],
)
def test_bad_uploads_are_4xx_with_a_message(client, xray, name, data, status, words):
    if data is None:  # a real PNG cut in half
        buf = io.BytesIO()
        Image.open(xray).save(buf, format="PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    r = post(client, name, data)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert name in detail and words in detail


def test_no_file_is_422(client):
    assert client.post("/v1/predict").status_code == 422  # empty body
    r = client.post("/v1/predict", files={"other": ("x.jpeg", b"abc")})
    assert r.status_code == 422 and "file" in r.text


def test_oversize_upload_is_413_by_content_length(client, max_upload):
    r = post(client, "big.dcm", b"\0" * (max_upload + 1))
    assert r.status_code == 413
    assert f"{max_upload:,}" in r.json()["detail"]


def test_oversize_chunked_upload_is_413_while_reading(live_server, max_upload):
    """No Content-Length (chunked transfer): the limit is enforced as bytes arrive."""
    boundary = "pneumoscope-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(max_upload // 16384 + 4):
            yield b"\0" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        request = c.build_request(
            "POST",
            "/v1/predict",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in request.headers
        try:
            r = c.send(request)
        except httpx.TransportError as err:  # server may close before the client stops writing
            pytest.fail(f"no answer to an oversize chunked upload: {err!r}")
    assert r.status_code == 413
    assert f"{max_upload:,}" in r.json()["detail"]


def test_small_upload_just_under_the_limit_passes_the_limit(client, max_upload):
    """Padding a real image to just under the limit is not refused as too large."""
    r = post(client, "pad.txt", b"x" * (max_upload - 1024))
    assert r.status_code == 415  # read whole and judged as content, not as size


def test_20_concurrent_requests_all_answered(client, live_server, xray):
    data = xray.read_bytes()

    def one(i):
        with httpx.Client(base_url=live_server.url, timeout=300) as c:
            heat = "true" if i % 5 == 0 else "false"  # some with Grad-CAM at the same time
            return post(c, f"x{i}.jpeg", data, heatmap=heat)

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(one, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    probs = {round(r.json()["p_pneumonia"], 5) for r in responses}
    assert len(probs) == 1  # the same answer under concurrency
    assert client.get("/healthz").status_code == 200


def test_onnx_backed_server_agrees_with_torch(deploy_run, onnx_model, server_for, client, xray):
    from pneumoscope.serve import create_app

    data = xray.read_bytes()
    torch_body = post(client, "xray.jpeg", data).json()
    with server_for(create_app(deploy_run, onnx_path=onnx_model, device="cpu")) as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.get("/healthz").json()["model"]["runtime"] == "onnxruntime"
            r = post(c, "xray.jpeg", data, heatmap="true")
    assert r.status_code == 200
    body = r.json()
    assert body["model"]["runtime"] == "onnxruntime" and body["heatmap_png"]
    assert body["p_pneumonia"] == pytest.approx(torch_body["p_pneumonia"], abs=1e-4)
    assert body["label"] == torch_body["label"] and body["threshold"] == torch_body["threshold"]


@pytest.mark.slow  # torchrun / subprocess / fuzz: see pyproject's markers
def test_cli_serve_in_a_subprocess(deploy_run):
    """`pneumoscope serve RUN_DIR --port P` starts, answers /healthz, and stops on SIGINT."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pneumoscope",
            "serve",
            str(deploy_run),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, body = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert body is not None and body["status"] == "ok", (
            proc.stdout.read() if proc.poll() is not None else ""
        )
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out


def test_cli_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from pneumoscope.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a pneumoscope run directory" in err and "Traceback" not in err


def test_page_files_are_package_data():
    """Every file of the page is covered by pyproject's package-data (non-editable installs)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from pathlib import Path

    import pneumoscope.serve

    repo = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["pneumoscope.serve"]
    static = Path(pneumoscope.serve.__file__).parent / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_two_files_in_one_request_is_4xx(client, xray):
    data = xray.read_bytes()
    r = client.post("/v1/predict", files=[("file", ("a.jpeg", data)), ("file", ("b.jpeg", data))])
    assert 400 <= r.status_code < 500, r.text
