"""End to end in headless Chromium: log in, score the two candidates, submit; SIGKILL and restart the server;
reload: the rating is still there (thank-you line, history, t), the pending query is the one handed out before
the crash, and after the release the next query shows what a bandit rebuilt here from the stored answers
chooses. Skips without Debian's chromium + chromium-driver (`make browser-deps`)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("flask", reason="the rating page needs the `web` extra: pip install -e '.[web]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the `web` extra)")

from rating_page import chromium_paths, headless_chromium, rate  # noqa: E402  (benchmarks/, on pytest's path)

from rewardopt.feedback.server import ServerProcess  # noqa: E402
from rewardopt.feedback.store import RatingStore  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.feedback.test_server import EXPLORE, replayed_bandit, small_args  # noqa: E402

if chromium_paths() is None:
    pytest.skip("headless Chromium is not installed: `make browser-deps` (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def shown_images(driver) -> int:
    """How many candidate images the browser decoded (PNG data URIs with a real size)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.candidate img')].filter(i => i.complete && i.naturalWidth > 0).length")


@pytest.mark.slow  # ~40 s and Chromium: `make test-all` (which runs `make browser-deps` first)
def test_rate_restart_reload_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    db = tmp_path / "ratings.sqlite"
    driver = headless_chromium()
    try:
        with ServerProcess(small_args(db), cwd=ROOT) as srv:
            port = re.search(r":(\d+)/$", srv.url)[1]
            driver.get(f"{srv.url}login?token={srv.token}")
            prompt = text(driver, "prompt")
            assert shown_images(driver) == 2 and text(driver, "t") == "0" and "exploring" in text(driver, "status")
            first = rate(driver, [7, 3])
            assert f"scores 7, 3 for {prompt}" in text(driver, "done")
            second = driver.find_element(By.ID, "query_id").get_attribute("value")
            assert second != first and text(driver, "t") == "2"
            srv.kill()
        args = small_args(db)
        args[args.index("--port") + 1] = port  # the same address: the browser just reloads
        with ServerProcess(args, cwd=ROOT) as srv:
            driver.refresh()  # /?rated=<first>
            assert "scores 7, 3" in text(driver, "done") and text(driver, "t") == "2"
            assert driver.find_element(By.ID, "query_id").get_attribute("value") == second  # pending, kept
            assert "7, 3" in text(driver, "history") and shown_images(driver) == 2
            rate(driver, [2, 8])
            assert text(driver, "t") == str(EXPLORE) and "released" in text(driver, "status")
            third = driver.find_element(By.ID, "query_id").get_attribute("value")
            assert text(driver, "t-issued") == str(EXPLORE)
            assert [li.text.split(": ")[-1] for li in driver.find_elements(By.CSS_SELECTOR, "#history li")] == [
                "2, 8", "7, 3"]
            shot = tmp_path / "rating_page.png"
            assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            srv.kill()
    finally:
        driver.quit()
    store = RatingStore(db)
    ref = replayed_bandit(store)  # rebuilt here from the stored answers
    q = store.query(third)
    assert [a.scores for a in store.answers()] == [[7, 3], [2, 8]] and ref.released
    assert q.shown == ref.select(q.context, q.actions, k=2)  # the greedy query reflects both ratings
    store.close()
