"""The upload page in a real headless Chromium (Debian's /usr/bin/chromium via Playwright)."""

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found (Debian package `chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, live_server):
    """A page that records every request it makes and blocks any that would leave the server."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    outside = []

    def guard(route):
        url = route.request.url
        if url.startswith(live_server.url + "/") or url.startswith("data:"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", guard)
    pg = context.new_page()
    pg.requests = []
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.console_errors = []
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.outside = outside
    yield pg
    context.close()


def wait_result(page):
    page.wait_for_selector("#result", state="visible", timeout=120_000)
    page.wait_for_function(
        "() => ['heatmap-img', 'input-img'].every(id => {"
        " const im = document.getElementById(id); return im.complete && im.naturalWidth > 0; })",
        timeout=60_000)


def test_upload_shows_probability_label_and_heatmap(page, live_server, shared_data, artifacts_dir):
    xray = sorted((shared_data / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    page.goto(live_server.url + "/")
    assert "not a diagnosis" in page.inner_text(".notice")
    page.set_input_files("#file", str(xray))
    wait_result(page)

    api = httpx.post(live_server.url + "/v1/predict", files={"file": (xray.name, xray.read_bytes())},
                     timeout=120).json()
    assert page.inner_text("#prob") == f"{100 * api['p_pneumonia']:.1f}%"
    assert page.inner_text("#label") == api["label"]
    assert f"{api['threshold']:.3f}" in page.inner_text("#threshold-line")
    assert page.inner_text("#file-name") == xray.name
    assert page.eval_on_selector("#heatmap-img", "im => im.naturalWidth") == 64
    page.screenshot(path=str(artifacts_dir / "webapp.png"), full_page=True)

    assert page.outside == []
    assert page.requests and all(u.startswith(live_server.url + "/") or u.startswith("data:")
                                 for u in page.requests), page.requests
    assert page.console_errors == []


def test_dicom_through_the_page(page, live_server, shared_data, encode):
    xray = sorted((shared_data / "val" / "NORMAL").glob("*.jpeg"))[0]
    data, _ = encode(np.asarray(Image.open(xray).convert("L")), "dcm_mono1_12")
    page.goto(live_server.url + "/")
    page.set_input_files("#file", files=[{"name": "chest.dcm", "mimeType": "application/dicom", "buffer": data}])
    wait_result(page)
    assert page.inner_text("#prob").endswith("%")
    assert page.inner_text("#label") in ("NORMAL", "PNEUMONIA")


def test_bad_file_shows_the_servers_message(page, live_server):
    page.goto(live_server.url + "/")
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"not an x-ray\n" * 10}])
    page.wait_for_selector("#status.error", timeout=60_000)
    message = page.inner_text("#status")
    assert "notes.txt" in message and "not an image" in message
    assert page.is_hidden("#result")
