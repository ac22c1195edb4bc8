"""The README's screenshot of the built-in web page: a real `kvserve serve` (SmolLM2, `native` and
`mqa` side by side), a chat sent through the page in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium), captured once the answer has streamed in and the panel
has caught up.

    python -m benchmarks.ui_screenshot --out benchmarks/results/ui.png
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--variants", args.variants,
           "--kv-cache-memory", args.kv_cache_memory, "--port", "0", "--log-stats-interval", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"kvserve listening on (http://[\d.]+:\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError(f"server exited with {proc.wait()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="native,mqa")
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--prompt", default="In two sentences: why does a paged KV cache waste less memory?")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ui.png"))
    args = p.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proc, url = start_server(args)
    profile = tempfile.mkdtemp(prefix="kvserve-ui-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        wait = WebDriverWait(driver, 600, poll_frequency=0.2)
        driver.get(url + "/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.card[data-variant="mqa"]'))
        box = driver.find_element(By.ID, "temperature")
        box.clear()
        box.send_keys("0")
        driver.find_element(By.ID, "prompt").send_keys(args.prompt)
        driver.find_element(By.ID, "send").click()
        bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        wait.until(lambda d: bubble.get_attribute("data-done"))
        # the panel polls every second: wait until it shows the finished request (blocks now cached)
        wait.until(lambda d: int(d.find_element(By.CSS_SELECTOR, '.card[data-variant="native"]')
                                 .get_attribute("data-blocks-cached")) > 0)
        driver.execute_script("window.scrollTo(0, 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
