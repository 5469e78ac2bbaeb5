"""The trace page in a real headless Chromium: type, trace, see highlighted spans, click one, see its documents."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import PROJECT

from stages.io import read_jsonl

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("CONSORT_TEST_ARTIFACTS", PROJECT / "test-artifacts"))


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed for the page test: `make test` installs them")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,900"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture
def page_server(smoke_workspace):
    from tracing.coordinator import start_services, stop_services

    ws, _ = smoke_workspace
    services = start_services(ws, ["news", "code"])
    port = 8790
    page = subprocess.Popen([sys.executable, "-m", "tracing.page", "--workspace", str(ws), "--port", str(port)],
                            cwd=PROJECT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and page.poll() is None, "trace page did not start"
            time.sleep(0.2)
        yield ws, url
    finally:
        page.terminate()
        page.wait(timeout=10)
        stop_services(services)


def test_page_highlights_spans_by_owner_and_shows_their_documents(page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ws, url = page_server
    news = [r["text"] for r in read_jsonl(ws / "owners" / "news" / "corpus" / "train.jsonl")]
    passage = " ".join(news[3][300:700].split(" ")[1:40])
    driver = browser()
    try:
        driver.get(url)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(passage)
        driver.find_element(By.ID, "trace-text").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-traced"))
        spans = driver.find_elements(By.CSS_SELECTOR, "#output .span")
        assert spans, driver.find_element(By.ID, "busy").text
        owners = {s.get_attribute("data-owner") for s in spans}
        assert "news" in owners
        news_span = next(s for s in spans if s.get_attribute("data-owner") == "news")
        assert news_span.text.strip() and news_span.text in passage
        assert news_span.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
        news_span.click()
        docs = [d for d in driver.find_elements(By.CSS_SELECTOR, "#docs .doc") if "owner news" in d.text]
        assert docs and all("document" in d.text and "BM25" in d.text for d in docs)
        # The newsroom's policy discloses ids only: none of its documents shows a snippet.
        assert not any(d.find_elements(By.CSS_SELECTOR, ".snippet") for d in docs)
        assert all("ids only" in d.text for d in docs)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOTS / "trace_page.png"))
        assert (SCREENSHOTS / "trace_page.png").stat().st_size > 10_000
        # Generation through the page works too (the smoke model's text is noise; it must not fail).
        box.clear()
        box.send_keys("The company")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-traced") == "2")
        assert "experts: public" in driver.find_element(By.ID, "experts").text
    finally:
        driver.quit()
