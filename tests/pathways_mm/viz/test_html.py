"""routes.html in a real headless Chromium: no console errors, every view drawn, numbers on hover.

Chromium comes from Debian's `chromium` package (.ci/run installs it); without it these tests
are skipped and say why.
"""

import re
import shutil
import subprocess

import pytest

from pathways_mm import routes_file
from pathways_mm.viz.draw import draw
from tests.helpers import AFTER, BEFORE, make_doc

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on this machine: `apt-get install chromium` (.ci/run does it where apt works)"
)
VIEWS = ("heatmap", "pathways", "reuse", "modality", "compare")


def open_in_chromium(url: str, tmp_path) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, console messages) from headless Chromium."""
    cmd = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=2000",
        "--dump-dom",
        url,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, [line for line in res.stderr.splitlines() if ":CONSOLE" in line]


def test_console_capture_sees_a_script_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>notDefined();</script></body></html>")
    _, console = open_in_chromium(bad.as_uri(), tmp_path)
    assert any("notDefined" in line for line in console), console


def test_routes_html_renders_every_view_without_console_errors(tmp_path):
    docs = [make_doc(BEFORE), make_doc(AFTER)]
    for doc in docs:  # a long task name, as image_speech_same once was clipped to "age_speech_same"
        doc["tasks"][0] = "image_speech_same_and_more"
    before = routes_file.write(tmp_path / "before.json", docs[0])
    after = routes_file.write(tmp_path / "after.json", docs[1])
    page = draw(after, tmp_path / "out", compare=before)[-1]
    dom, console = open_in_chromium(page.as_uri() + "#selftest", tmp_path)
    assert console == [], console
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and 'data-views="5"' in body and 'data-layers="2"' in body, body
    hovered, items = map(int, re.search(r'data-hover="(\d+)/(\d+)"', body).groups())
    assert items > 50 and hovered == items, body  # every cell, node, link and bar shows its number
    assert 'data-clipped="0"' in body, body  # no label runs off its picture (long task names included)
    for view in VIEWS:
        section = re.search(rf'<section class="view" id="view-{view}">(.*?)</section>', dom, re.S).group(1)
        assert section.count("<svg") >= 1 and section.count("data-tip=") >= 4, view
