"""The dashboard of `cem demo` in headless Chromium (the distribution's package, driven by
selenium and chromedriver): it loads, shows every RM and EV, draws its charts, and the "why"
text of an EV follows a congestion window added through the API.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: `apt-get install chromium
chromium-driver`; `make test` installs them when it runs as root). Without them the test is
skipped with that hint, unless CEM_BROWSER_TESTS=required (as `.ci/run` sets): then it fails.
Set CEM_SCREENSHOT=PATH to keep the screenshot (the README's docs/dashboard.png is made so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOML = ROOT / "specs" / "sites" / "demo.toml"
CHROMIUM = os.environ.get("CEM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CEM_CHROMEDRIVER", "/usr/bin/chromedriver")
HINT = ("browser tests need Chromium and chromedriver from the distribution: "
        "apt-get install chromium chromium-driver (make test does it as root), and selenium "
        "(pip install -e '.[dev]')")


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        if os.environ.get("CEM_BROWSER_TESTS") == "required":
            pytest.fail(f"missing {', '.join(missing)}; {HINT}")
        pytest.skip(f"missing {', '.join(missing)}; {HINT}")


def wait_until(condition: Callable[[], Any], within_s: float, what: str) -> Any:
    end = time.monotonic() + within_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"not in time: {what}")
        time.sleep(0.2)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A running `cem demo` (its dashboard URL and token), stopped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cem.app.cli import app; app()", "demo", "--config",
         str(DEMO_TOML), "--report", str(tmp_path / "report"), "--duration", "120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        found = None
        deadline = time.monotonic() + 60
        while found is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = re.search(r"dashboard: (http://\S+) .*token for changes: (\S+)\)", line)
        assert found is not None, "cem demo printed no dashboard URL"
        yield found.group(1), found.group(2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def browser() -> Iterator[Any]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cem-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1400,2200", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_shows_the_demo_site_live(demo: tuple[str, str], browser: Any,
                                            tmp_path: Path) -> None:
    url, token = demo
    browser.get(url)

    def texts(selector: str, attribute: str | None = None) -> list[str]:
        """Read in one go in the page (rows are replaced live, element handles go stale)."""
        return list(browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map("
            "e => arguments[1] ? e.getAttribute(arguments[1]) : e.textContent)",
            selector, attribute))

    def rows(table: str) -> set[str]:
        return set(texts(f"#{table} tbody tr", "data-rm"))

    # every RM of the site (8 EVSEs, battery, heat pump, PV, meter), as the API lists them
    wait_until(lambda: len(rows("rms")) == 12, 30, "12 RM rows")
    assert rows("rms") == {r["rm_id"] for r in get_json(url + "api/rms")}
    kinds = set(texts("#rms tbody td:nth-child(2)"))
    assert {"EV charger", "battery", "heat pump", "grid meter"} <= kinds
    # every EV: the page follows the API within a push or two (EVs come and go at 1440x)
    wait_until(lambda: rows("evs") and rows("evs") == {e["rm_id"] for e in
                                                       get_json(url + "api/evs")}, 20,
               "the EV rows of the API")
    whys = texts("#evs td.why")
    assert whys and all(whys), whys

    # the charts have data: the site's power history and the plan per device, with limits
    def history_points() -> int:
        paths = texts("#history-chart path.import", "d")
        return (paths[0] or "").count("L") if paths else 0

    wait_until(lambda: history_points() >= 5, 20, "a power history with points")
    assert len(texts("#plan-chart rect.bar", "height")) > 10
    assert texts("#plan-chart path.limit", "d")
    assert len(texts("#price-chart rect.price", "height")) == 96

    # a congestion window through the API: some EV's "why" names it, live, without a reload
    now = datetime.fromisoformat(get_json(url + "api/state")["now"])
    end = now + timedelta(hours=5)
    body = json.dumps({"start": (now - timedelta(minutes=15)).isoformat(),
                       "end": end.isoformat(), "import_limit_kw": 3}).encode()
    request = urllib.request.Request(url + "api/congestion", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    local_end = end.astimezone(site_zone(get_json(url + "api/state"))).strftime("%H:%M")

    def named() -> list[str]:
        return [t for t in texts("#evs td.why") if f"congestion window until {local_end}" in t
                and "from api" in t]

    wait_until(named, 20, "an EV's why text naming the new congestion window")
    sources = texts("#congestion tbody td:nth-child(4)")
    assert any(s.startswith("api") for s in sources)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("CEM_SCREENSHOT")
    if keep:  # the README's picture: the top of the page, small (64 colours)
        from PIL import Image

        with Image.open(shot) as image:
            top = image.convert("RGB").crop((0, 0, 1400, 1500)).resize((933, 1000))
            top.quantize(colors=64).save(keep, optimize=True)


def site_zone(state: dict[str, Any]) -> Any:
    """The site's time zone, from /api/state."""
    from zoneinfo import ZoneInfo

    return ZoneInfo(state["site"]["timezone"])
