"""The upload page in a real headless Chromium (Debian's /usr/bin/chromium via Playwright)."""

import httpx
import numpy as np
import pytest
from PIL import Image

from pneumoscope.evaluation.threshold_rules import DEFAULT_THRESHOLD_RULE

pytestmark = pytest.mark.browser


@pytest.fixture
def page(guarded_page, live_server):
    """The upload page of live_server; requests leaving it are blocked and recorded."""
    return guarded_page(live_server.url)


def wait_result(page):
    page.wait_for_selector("#result", state="visible", timeout=120_000)
    page.wait_for_function(
        "() => ['heatmap-img', 'input-img'].every(id => {"
        " const im = document.getElementById(id); return im.complete && im.naturalWidth > 0; })",
        timeout=60_000,
    )


def test_upload_shows_probability_label_and_heatmap(page, live_server, shared_data, artifacts_dir):
    xray = sorted((shared_data / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    page.goto(live_server.url + "/")
    assert "not a diagnosis" in page.inner_text(".notice")
    page.set_input_files("#file", str(xray))
    wait_result(page)

    api = httpx.post(
        live_server.url + "/v1/predict", files={"file": (xray.name, xray.read_bytes())}, timeout=120
    ).json()
    assert page.inner_text("#prob") == f"{100 * api['p_pneumonia']:.1f}%"
    assert page.inner_text("#label") == api["label"]
    assert f"{api['threshold']:.3f}" in page.inner_text("#threshold-line")
    # the default rule, named in words on the page
    assert api["threshold_rule"] == DEFAULT_THRESHOLD_RULE
    target = DEFAULT_THRESHOLD_RULE.removeprefix("sensitivity")
    assert f"({target}% sensitivity on validation)" in page.inner_text("#threshold-line")
    assert page.is_hidden("#classes")  # the three-class table is for three-class runs only
    assert page.inner_text("#file-name") == xray.name
    assert page.eval_on_selector("#heatmap-img", "im => im.naturalWidth") == 64
    page.screenshot(path=str(artifacts_dir / "webapp.png"), full_page=True)

    assert page.outside == []
    assert page.requests and all(
        u.startswith(live_server.url + "/") or u.startswith("data:") for u in page.requests
    ), page.requests
    assert page.console_errors == []


def test_dicom_through_the_page(page, live_server, shared_data, encode):
    xray = sorted((shared_data / "val" / "NORMAL").glob("*.jpeg"))[0]
    data, _ = encode(np.asarray(Image.open(xray).convert("L")), "dcm_mono1_12")
    page.goto(live_server.url + "/")
    page.set_input_files(
        "#file", files=[{"name": "chest.dcm", "mimeType": "application/dicom", "buffer": data}]
    )
    wait_result(page)
    assert page.inner_text("#prob").endswith("%")
    assert page.inner_text("#label") in ("NORMAL", "PNEUMONIA")


def test_bad_file_shows_the_servers_message(page, live_server):
    page.goto(live_server.url + "/")
    page.set_input_files(
        "#file",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an x-ray\n" * 10}],
    )
    page.wait_for_selector("#status.error", timeout=60_000)
    message = page.inner_text("#status")
    assert "notes.txt" in message and "not an image" in message
    assert page.is_hidden("#result")
