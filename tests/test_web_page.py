"""The chat page at `/` in a real headless browser (Debian's chromium + chromium-driver, which .ci/run installs).

Loads the page, sends a message with greedy decoding, waits for the streamed reply, checks it is the
reply the API gives, clicks a token and reads its top-5 alternatives; saves a screenshot to
$LMSMITH_TEST_ARTIFACTS (default ./test-artifacts).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest
from test_serve import KEY, Server, make_model_dir

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def browser():
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver")
    assert binary and driver_path, "install a browser and its driver: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply_and_shows_alternatives(tmp_path, browser):
    server = Server(make_model_dir(tmp_path / "tiny"), "--max-batch", "4")
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        key = browser.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys(KEY)
        browser.refresh()  # the page reads the key from localStorage at load
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-name"), "tiny"))
        Select(browser.find_element(By.ID, "strategy")).select_by_value("greedy")
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("24")
        browser.find_element(By.ID, "message").send_keys("What is a tuple?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant span.tok"))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream ended
        spans = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant span.tok")
        reply = "".join(s.get_attribute("textContent") for s in spans)
        api = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is a tuple?"}], max_tokens=24, temperature=0,
            logprobs=True, top_logprobs=5)
        assert [e.token for e in api.choices[0].logprobs.content] == [s.get_attribute("textContent") for s in spans]
        assert len(spans) == api.usage.completion_tokens and reply == api.choices[0].message.content

        spans[1].click()
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#alternatives .alt"))
        assert 1 <= len(rows) <= 6
        probs = [r.find_element(By.CSS_SELECTOR, ".alt-prob").text for r in rows]
        assert all(re.fullmatch(r"\d+\.\d\d%", p) for p in probs), probs
        want = api.choices[0].logprobs.content[1]
        assert probs[0] == f"{math.exp(want.top_logprobs[0].logprob) * 100:.2f}%"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#alternatives .alt.chosen")) == 1
        assert browser.find_elements(By.CSS_SELECTOR, "#alternatives .alt .bar")

        out = Path(os.environ.get("LMSMITH_TEST_ARTIFACTS", "test-artifacts"))
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "chat_page.png"))
    finally:
        server.stop()
