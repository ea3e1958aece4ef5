"""``report.html`` in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by
Selenium. Every plotly figure must have drawn its SVG with data in it and the console must hold no error
or warning. A full-page screenshot is kept next to the report (``<sweep>/report/screenshot.png``).

Skipped only when Chromium is absent *and* cannot be installed (no root or no apt-get); ``.ci/run``
installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from report_fixtures import make_sweep

pytest.importorskip("plotly")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")

#: Per plotly div: SVG layers, drawn elements, traces in the figure, and marks in the plot area.
PROBE = """return [...document.querySelectorAll('.plotly-graph-div')].map(g => ({
  id: g.id, svgs: g.querySelectorAll('svg.main-svg').length, drawn: g.querySelectorAll('svg *').length,
  traces: (g._fullData || []).length, height: g.getBoundingClientRect().height,
  marks: g.querySelectorAll('.scatterlayer .trace path, .heatmaplayer image, .barlayer path, .parcoords .axis').length,
}));"""


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing and possible."""
    def find():
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

    browser, driver = find()
    if not (browser and driver) and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]
        if subprocess.run(install, capture_output=True, env=env, timeout=1800).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
            subprocess.run(install, capture_output=True, env=env, timeout=1800)
        browser, driver = find()
    if not (browser and driver):
        pytest.skip("headless Chromium is absent and cannot be installed here (needs root and apt-get): "
                    "apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):  # software WebGL (parcoords)
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=options)
    yield drv
    drv.quit()


def test_every_plot_renders_without_console_errors(browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    from sweeper.report import report

    sweep = make_sweep(tmp_path / "fake-sdr")
    out = report(sweep)
    browser.get(out["html"].resolve().as_uri())
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && [...document.querySelectorAll('.plotly-graph-div')]"
        ".every(g => g._fullLayout && g.querySelector('svg.main-svg'))"))
    figures = browser.execute_script(PROBE)
    assert [f["id"] for f in figures] == [f"fig-{p.stem}" for p in out["pngs"]] and len(figures) == out["figures"] == 6
    for f in figures:
        assert f["svgs"] >= 1 and f["drawn"] > 50 and f["traces"] >= 1 and f["height"] > 200 and f["marks"] >= 1, f
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems
    height = min(browser.execute_script("return document.documentElement.scrollHeight"), 12000)
    browser.set_window_size(1280, height)
    shot = sweep / "report" / "screenshot.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.width >= 1000 and im.height >= 2000, im.size
