"""The built-in web page, in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium), against a live tiny server that requires an API key: the page loads nothing
from outside the server, asks for the key, streams a chat answer (equal to the same greedy request
through the API), and its live panel shows the variant's KV footprint and moves with the traffic.
Screenshots go to test-artifacts/ui/ (gitignored; KVSERVE_TEST_ARTIFACTS overrides).

Without a browser the browser test is skipped locally, with the reason; under CI (CI=true, where
.ci/run installs the packages) it fails instead.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from model.config import PRESETS
from tests.service.live_server import REPO, LiveServer, only_match

KEY = "ui-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("KVSERVE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
TIMEOUT_S = 60  # a guard against a hung page, not a timing assertion


@pytest.fixture(scope="module")
def server():
    # llama3_json: its tool instructions are short enough for the tiny model's 512-token context
    with LiveServer("--api-key", KEY, "--kv-cache-memory", "1MiB", "--variants", "native,mqa",
                    "--tool-call-parser", "llama3_json") as s:
        yield s


def test_stats_json_agrees_with_metrics(server):
    r = httpx.get(server.url("/stats"))  # open like /metrics: no key
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["api_key_required"], body["draining"]) == ("tiny", True, False)
    metrics = server.metrics()
    cfg = PRESETS["tiny"]
    assert [v["variant"] for v in body["variants"]] == ["native", "mqa"]
    for v in body["variants"]:
        name = v["variant"]
        kv = v["kv"]
        assert v["model_id"] == f"tiny:{name}" and v["alive"] is True
        assert kv["bytes_per_token"] == 2 * cfg.n_layers * v["n_kv_heads"] * cfg.head_dim * 4  # float32
        assert kv["bytes_per_token"] == only_match(metrics, "kvserve_kv_cache_bytes_per_token", variant=name)
        assert kv["capacity_tokens"] == only_match(metrics, "kvserve_kv_cache_capacity_tokens", variant=name)
        assert kv["num_blocks"] == kv["blocks_used"] + kv["blocks_cached"] + kv["blocks_free"]
        for state in ("used", "cached", "free"):
            assert kv[f"blocks_{state}"] == only_match(metrics, "kvserve_kv_cache_blocks", variant=name, state=state)
        assert v["generation_tokens_total"] == only_match(metrics, "kvserve_generation_tokens_total", variant=name)
    assert body["variants"][1]["n_kv_heads"] == 1


def test_the_page_is_one_self_contained_file(server):
    r = httpx.get(server.url("/"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert "http://" not in html and "https://" not in html  # no external asset, font or API


def test_favicon(server):
    r = httpx.get(server.url("/favicon.ico"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and r.text.startswith("<svg")


def browser(tmp_path: Path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = "chromium / chromedriver not found: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are console errors
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_chat_streams_and_the_kv_panel_moves(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = browser(tmp_path)
    wait = WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.05)
    card = '.card[data-variant="native"]'
    try:
        driver.get(server.url("/"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, card))
        assert driver.find_element(By.CSS_SELECTOR, card + " .bytes-per-token").text == \
            f"{2 * PRESETS['tiny'].n_layers * PRESETS['tiny'].n_kv_heads * PRESETS['tiny'].head_dim * 4:,}"
        assert driver.find_element(By.ID, "key-hint").is_displayed()  # the server wants a key
        total_before = int(driver.find_element(By.CSS_SELECTOR, card).get_attribute("data-generation-total"))

        # without the key: the answer says so
        driver.find_element(By.ID, "prompt").send_keys("hello")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="error"]'))
        assert "API key" in driver.find_element(By.CSS_SELECTOR, ".msg.assistant.error").text

        # with it: greedy, 120 tokens, streamed
        driver.find_element(By.ID, "clear").click()
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        for field, value in (("temperature", "0"), ("max-tokens", "120")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys("Tell me about paged KV caches")
        driver.find_element(By.ID, "send").click()
        bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        wait.until(lambda d: bubble.get_attribute("data-done"))
        driver.save_screenshot(str(ARTIFACTS / "chat-done.png"))
        assert bubble.get_attribute("data-done") == "true", bubble.text
        assert int(bubble.get_attribute("data-chunks")) > 1  # rendered piece by piece as events arrived
        shown = driver.execute_script("return arguments[0].querySelector('.text').textContent", bubble)

        # the same request through the API gives the same text
        r = httpx.post(server.url("/v1/chat/completions"), headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "tiny:native", "messages": [{"role": "user", "content": "Tell me about paged KV caches"}],
                             "temperature": 0, "max_tokens": 120, "top_p": 0.95})
        assert r.status_code == 200
        expected = r.json()["choices"][0]["message"]["content"]
        assert shown == expected and expected
        tokens = r.json()["usage"]["completion_tokens"]
        assert f"{tokens} tokens" in bubble.find_element(By.CSS_SELECTOR, ".meta").text

        # the panel moved: the page's request (and the API's) generated tokens, the prefix stayed cached
        def moved(d):
            el = d.find_element(By.CSS_SELECTOR, card)
            return (int(el.get_attribute("data-generation-total")) >= total_before + 2 * tokens
                    and int(el.get_attribute("data-blocks-cached")) > 0)
        wait.until(moved)
        mqa = driver.find_element(By.CSS_SELECTOR, '.card[data-variant="mqa"]')
        assert mqa.get_attribute("data-generation-total") == "0"  # the other variant stayed still
        driver.save_screenshot(str(ARTIFACTS / "panel.png"))

        # offline: everything the page loaded came from the server itself
        urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(server.base_url) for u in urls), urls

        # under its strict Content-Security-Policy (issue 21): nothing was blocked, the bars have widths
        assert "script-src 'sha256-" in httpx.get(server.url("/")).headers["content-security-policy"]
        blocked = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not blocked, blocked
        width = driver.execute_script("return document.querySelector(arguments[0] + ' .bar .cached').style.width", card)
        assert width.endswith("%") and float(width[:-1]) > 0, width
    finally:
        driver.quit()


def test_playground_schema_tools_and_live_charts(server, tmp_path):
    import json

    import jsonschema
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = browser(tmp_path)
    driver.set_window_size(1280, 900)
    wait = WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.05)
    rect = "return arguments[0].getBoundingClientRect().toJSON()"
    try:
        driver.get(server.url("/"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.card[data-variant="native"]'))
        chat, seed = (driver.execute_script(rect, driver.find_element(By.ID, i)) for i in ("chat", "seed"))
        assert chat["left"] <= seed["left"] and seed["right"] <= chat["right"], (seed, chat)  # no overflow at 1280 px
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        for field, value in (("temperature", "0"), ("max-tokens", "60")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)

        def ask(prompt: str):
            driver.find_element(By.ID, "clear").click()
            driver.find_element(By.ID, "prompt").send_keys(prompt)
            driver.find_element(By.ID, "send").click()
            bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
            wait.until(lambda d: bubble.get_attribute("data-done"))
            assert bubble.get_attribute("data-done") == "true", bubble.text
            return bubble

        # the schema box constrains the answer
        schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"], "additionalProperties": False}
        driver.find_element(By.ID, "schema").send_keys(json.dumps(schema))
        bubble = ask("Answer in JSON")
        jsonschema.validate(json.loads(driver.execute_script("return arguments[0].querySelector('.text').textContent",
                                                             bubble)), schema)
        driver.find_element(By.ID, "schema").clear()

        # the tool list: a required call is shown with its arguments
        params = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
        driver.find_element(By.ID, "tools").send_keys(json.dumps([{"name": "pick", "parameters": params}]))
        Select(driver.find_element(By.ID, "tool-choice")).select_by_visible_text("required")
        bubble = ask("Pick one")
        line = bubble.find_element(By.CSS_SELECTOR, ".tool-call").text
        assert line.startswith("→ pick(") and line.endswith(")"), line
        jsonschema.validate(json.loads(line[len("→ pick("):-1]), params)
        assert "finish: tool_calls" in bubble.find_element(By.CSS_SELECTOR, ".meta").text

        # the live charts drew the traffic: lines with points, pixels on every canvas
        card = '.card[data-variant="native"]'

        def drawn(d):
            return all(int(d.find_element(By.CSS_SELECTOR, f'{card} canvas[data-chart="{k}"]').get_attribute(
                "data-points") or 0) >= 2 for k in ("generation", "ttft", "itl", "kv"))
        wait.until(drawn)
        inked = """const c = arguments[0], data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++; return n;"""
        for key in ("generation", "ttft", "itl", "kv"):
            canvas = driver.find_element(By.CSS_SELECTOR, f'{card} canvas[data-chart="{key}"]')
            assert driver.execute_script(inked, canvas) > canvas.size["width"], key
        ttft = driver.find_element(By.CSS_SELECTOR, f'{card} .last[data-chart="ttft"]').text
        assert ttft.endswith(" ms") and ttft.split(" / ")[0] != "-", ttft
        driver.save_screenshot(str(ARTIFACTS / "playground-charts.png"))
    finally:
        driver.quit()
