"""The chat page in a real headless Chromium: type a prompt, watch the answer stream in."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lambda_split import GenerationConfig
from tests.local.conftest import MODE

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("LAMBDA_SPLIT_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))

pytestmark = pytest.mark.browser


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:  # CI runs this test: a missing browser is a failure, not a skip
        pytest.fail(
            f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (make system-packages)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1100,800")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_streams_an_answer(browser: webdriver.Chrome, make_local: Callable[..., Any]) -> None:
    local, engine = make_local()
    prompt = "What is split inference?"
    reference = engine.client.generate(prompt, GenerationConfig(max_new_tokens=24)).texts[0]
    wait = WebDriverWait(browser, 120)
    browser.get(local.url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert browser.find_element(By.ID, "security").text == MODE
    assert browser.find_element(By.ID, "split").text == ":".join(map(str, engine.client.info.split))
    assert browser.find_element(By.ID, "model").text == "tiny-random-llama"

    for field, value in (("max-tokens", "24"), ("temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant"))
    wait.until(lambda _: answer.get_attribute("data-done") == "true")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").get_attribute("textContent") == prompt
    assert answer.get_attribute("textContent") == reference
    assert int(answer.get_attribute("data-chunks") or 0) > 1  # it arrived in pieces, as it was generated
    assert answer.get_attribute("data-finish") == "length"
    stats = browser.find_element(By.ID, "stats").text
    assert "tokens/s" in stats and "wire" in stats and "24 tokens" in stats
