"""A headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by Selenium, with
networking off: pages are opened from file:// as a person opens a copied output folder."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

NEEDS = ("the page checks need Debian's chromium and chromium-driver (apt-get install chromium "
         "chromium-driver; .ci/run installs them) and selenium (pip install -e '.[test]')")


def _binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@contextmanager
def browser(window: tuple[int, int] = (1280, 1000)):
    """A Chrome WebDriver with no network (hosts resolve nowhere, a dead proxy, and the DevTools
    offline switch), collecting the console's messages; skips the test where it cannot start."""
    found = _binaries()
    if found is None:
        pytest.skip(NEEDS)
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip(NEEDS)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                     "--disable-background-networking", "--no-first-run", "--disable-extensions",
                     f"--window-size={window[0]},{window[1]}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is named: Selenium would otherwise look for (and try to download) its own.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def load_every_image(driver, timeout: float = 20.0) -> list[dict]:
    """Show every hidden section, load every image now (they are lazy), wait until each has
    finished, then return (src, alt, naturalWidth) of each."""
    driver.execute_script(
        "document.querySelectorAll('.class-page').forEach(function (s) { s.style.display = 'block'; });"
        "document.querySelectorAll('img').forEach(function (i) { i.loading = 'eager'; });")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(
                "return Array.prototype.every.call(document.images, function (i) { return i.complete; });"):
            break
        time.sleep(0.1)
    return driver.execute_script(
        "return Array.prototype.map.call(document.images, function (i) {"
        " return {src: i.getAttribute('src'), alt: i.alt, width: i.naturalWidth}; });")


def file_url(path: Path) -> str:
    return path.resolve().as_uri()
