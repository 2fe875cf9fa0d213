"""A screenshot of the rating page as a rater sees it, in headless Chromium (Selenium).

    python benchmarks/rating_page.py [--out benchmarks/results/rating_page.png]

Serves ``recipes/feedback/serve_ratings_tiny.yaml`` (the shipped sampler, a throwaway store, a free port) in a
child process, logs in with the token it issues, rates the first query 7 and 3, and photographs the next one:
the prompt, the two candidates the private bandit chose, the 1-9 scales, the thank-you line and the rating
history. Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``). A few seconds on 2 CPU
cores. ``tests/feedback/test_browser.py`` uses the helpers here.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "feedback" / "serve_ratings_tiny.yaml"


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables on PATH, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(width: int = 1000, height: int = 980):
    """A headless Chromium WebDriver from the system's chromium + chromedriver (never downloads a browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise FileNotFoundError("headless Chromium needs chromium and chromedriver on PATH: `make browser-deps` "
                                "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    driver.set_page_load_timeout(120)
    return driver


def rate(driver, scores: list[int]) -> str:
    """Click each shown candidate's score on the open rating page and submit; the id of the query rated.
    Waits for the next page (the old page's elements gone stale, then the thank-you line: a page that already
    thanks for an earlier rating must not pass for the next one)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    qid = driver.find_element(By.ID, "query_id").get_attribute("value")
    for i, s in enumerate(scores):
        driver.find_element(By.ID, f"score-{i}-{s}").click()
    submit = driver.find_element(By.ID, "submit")
    submit.click()
    WebDriverWait(driver, 120).until(EC.staleness_of(submit))
    WebDriverWait(driver, 120).until(EC.presence_of_element_located((By.ID, "done")))
    return qid


def main() -> None:
    from rewardopt.feedback.server import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rating_page.png"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(
            ["--config", str(RECIPE), "--store", f"{tmp}/ratings.sqlite", "--port", "0"], cwd=ROOT) as srv:
        driver = headless_chromium()
        try:
            driver.get(f"{srv.url}login?token={srv.token}")
            rate(driver, [7, 3])
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
