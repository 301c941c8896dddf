"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, via selenium):
pick the base and two adapters, type a prompt, and see each model's streamed output side by side."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from adaptune.serve.api import create_app  # noqa: E402
from tests.serve_helpers import make_adapters, reference_tokens, running_server, state_for  # noqa: E402
from tests.tiny import make_tokenizer  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver")
KEY = "sk-playground"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_playground_streams_base_and_adapters_side_by_side(browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    adapters = make_adapters(tmp_path)
    state = state_for({k: adapters[k] for k in ("lora_a", "dora_b")}, api_key=KEY)
    prompt, max_tokens = "the king and the", 7
    with running_server(create_app(state)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: "API key" in d.find_element(By.ID, "models").text)  # /v1/models needs the key
        key_field = browser.find_element(By.ID, "api-key")
        key_field.send_keys(KEY)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key_field)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".model-choice")) == 3)
        for box in browser.find_elements(By.CSS_SELECTOR, ".model-choice"):
            if not box.is_selected():
                box.click()
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(str(max_tokens))
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".column[data-done]")) == 3)
        columns = {c.get_attribute("data-model"): c for c in browser.find_elements(By.CSS_SELECTOR, ".column")}
        assert set(columns) == {"tiny-llama", "lora_a", "dora_b"}
        tok = make_tokenizer()
        for model, column in columns.items():
            assert column.get_attribute("data-done") == "true", column.text
            shown = column.find_element(By.CSS_SELECTOR, ".text").text
            folder = adapters.get(model)
            expected = tok.decode(reference_tokens(folder, prompt, max_tokens), skip_special_tokens=True)
            assert " ".join(shown.split()) == " ".join(expected.split()), model
        texts = [c.find_element(By.CSS_SELECTOR, ".text").text for c in columns.values()]
        assert len(set(texts)) == 3  # three different models, three different outputs
