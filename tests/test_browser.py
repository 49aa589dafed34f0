"""The search page in a real browser: headless Chromium from the OS packages, driven by Selenium.

Chromium and chromedriver are Debian's (/usr/bin/chromium, /usr/bin/chromedriver; installed by
.ci/install_browser.sh). Selenium is given the driver's path, so selenium-manager never runs
(and SE_OFFLINE forbids it to download anything if it did). Chromium starts with the flags that
keep it from reaching out to the network, which this closed machine would otherwise stall on,
and a fresh profile. The test starts tools/serve.py on 127.0.0.1, picks a catalog image in the
page's file input, waits until the k result images have loaded, and checks the ranking shown.

    SEARCH_PAGE_SCREENSHOT=docs/search_page.png python -m pytest -q tests/test_browser.py

also saves a screenshot of the page (the README's picture).
"""

import importlib.util
import os
from pathlib import Path

import pytest

from test_serve import SERVER_EXTRAS, Server, build_catalog

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1100,760"]
K = 8
WAIT_S = 60


def missing() -> str | None:
    if SERVER_EXTRAS:
        return f"{', '.join(SERVER_EXTRAS)} not installed (pip install fastapi uvicorn httpx)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed (pip install selenium, or run .ci/install_browser.sh)"
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            return f"{binary} not found (apt-get install chromium chromium-driver, or run .ci/install_browser.sh)"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no headless browser: {missing()}")

RESULTS_LOADED = """
const images = [...document.querySelectorAll("#results .result img")];
return images.length === arguments[0] && images.every((image) => image.complete && image.naturalWidth > 0);
"""
SHOWN = """
return [...document.querySelectorAll("#results .result")].map((figure) => ({
  rank: Number(figure.dataset.rank), score: Number(figure.dataset.score), path: figure.dataset.path,
  caption: figure.querySelector("figcaption").innerText}));
"""


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_the_nearest_catalog_images(browser, tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    catalog = build_catalog(tmp_path_factory.getbasetemp() / "serve_catalog")
    server = Server(catalog, tmp_path / "serve.log", "--k", str(K))
    try:
        browser.get(server.url)
        WebDriverWait(browser, WAIT_S).until(lambda d: "images" in d.find_element(By.ID, "catalog").text)
        assert browser.find_element(By.ID, "k").get_attribute("value") == str(K)

        browser.find_element(By.ID, "file").send_keys(str(catalog.query))  # the file input, as a person picks
        WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script(RESULTS_LOADED, K))
        shown = browser.execute_script(SHOWN)
        assert [result["rank"] for result in shown] == list(range(1, K + 1))
        scores = [result["score"] for result in shown]
        assert scores == sorted(scores, reverse=True)
        assert shown[0]["path"] == catalog.query.relative_to(catalog.images).as_posix()
        assert shown[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert catalog.query.parent.name in shown[0]["caption"] and "1.000" in shown[0]["caption"]
        assert browser.find_element(By.ID, "query").get_attribute("naturalWidth") not in (None, "0")

        screenshot = os.environ.get("SEARCH_PAGE_SCREENSHOT")
        if screenshot:
            save_screenshot(browser.get_screenshot_as_png(), Path(screenshot))

        not_an_image = tmp_path / "notes.jpg"
        not_an_image.write_text("not an image at all")
        browser.find_element(By.ID, "file").send_keys(str(not_an_image))
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not an image" in browser.find_element(By.ID, "error").text
        assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []
    finally:
        server.stop()
    lines = server.access_lines()
    assert ("POST", f"/api/search?k={K}", "200") in [line[1:4] for line in lines]
    assert all(line[0] == "127.0.0.1" for line in lines)


def save_screenshot(png: bytes, path: Path) -> None:
    """The page as a palette PNG (256 colours): small enough to keep in the repository."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
