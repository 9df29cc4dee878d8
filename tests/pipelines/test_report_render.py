"""The report as a browser shows it: headless Chromium from the system packages (``apt install chromium``)
renders a report with every element issue 12 asks for; skipped, with the reason, where no Chromium is
installed."""

import io
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.report import PALETTE, write_report

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine (apt install chromium)")
SERVED = (255, 0, 255)  # a colour nothing else in the report uses: its pixels on screen mean the image decoded


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _browser(*flags: str, page) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A shapes-world report: base, sft and sfo rows with standard errors, the verdict, curves, the grid with
    oracle verdicts, and the captioned served image."""
    folder = tmp_path_factory.mktemp("report")
    methods = {"base": (0.09, "#202020"), "sft": (0.19, "#404040"), "sfo": (0.21, "#606060")}
    rows = [{"method": m, "subject": f"t{i}", "prompt_index": 0, "prompt": "a striped circle on grass", "seed": 0,
             "image_png": _png(grey), "oracle_subject": i == 0, "oracle_text": True}
            for m, (_, grey) in methods.items() for i in range(2)]
    summary = {"methods": {m: {"images": 512, "subject": v, "text": 0.66, "stderr": {"subject": 0.01, "text": 0.02}}
                           for m, (v, _) in methods.items()}}
    curves = {"loss (per step)": {"sft": [(1, 0.5), (2, 0.3)], "sfo": [(1, 0.69), (2, 0.6)]},
              "SFO: policy error minus the reference's": {"positive": [(1, 0.0), (2, 0.001)],
                                                          "negative": [(1, 0.0), (2, 0.01)]}}
    return write_report(folder / "report.html", title="SFO run", summary=summary,
                        images=pa.Table.from_pylist(rows), references={f"t{i}": Image.new("RGB", (32, 32), "white")
                                                                       for i in range(2)},
                        pairs=None, parameters={"sfo": {"beta": 1000.0}}, served=_png(SERVED),
                        metrics=[("subject", "subject fidelity"), ("text", "text")],
                        metrics_title="Shapes-world oracles (exact): share of images right",
                        verdict="SFO against the SFT base, paired over 512 images: subject fidelity +0.020 ± 0.005",
                        served_caption="POST /v1/generate with prompt='a striped circle on grass'", curves=curves)


def test_the_browser_parses_every_element(report):
    result = _browser("--dump-dom", page=report)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert dom.count("<img") == 2 * (1 + 3) + 1  # two triplets x (reference, base, sft, sfo), the served image
    assert "<b>base</b>" in dom and "0.090 ± 0.010" in dom  # the base row, rates with standard errors
    assert 'class="verdict"' in dom and "+0.020 ± 0.005" in dom
    assert dom.count("<polyline") == 4 and dom.count("<rect") == 2 * 3  # curves; bars: 2 metrics x 3 methods
    assert "subject ✓ text ✓" in dom and "subject ✗ text ✓" in dom  # per-image oracle verdicts
    assert "<figcaption>POST /v1/generate with prompt=" in dom


def test_the_page_shows_the_images_and_the_bars(report, tmp_path):
    shot = tmp_path / "page.png"
    result = _browser(f"--screenshot={shot}", "--window-size=1000,4000", page=report)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)

    def count(colour) -> int:
        return int(np.all(pixels == colour, axis=1).sum())

    assert count(SERVED) >= 100 * 100  # the served image, decoded and drawn (128 px thumbnail)
    for hexcode in PALETTE[:3]:  # one bar colour per method
        rgb = tuple(int(hexcode[i:i + 2], 16) for i in (1, 3, 5))
        assert count(rgb) > 50, hexcode
