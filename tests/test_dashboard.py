"""The dashboard in a real headless Chromium (selenium): rows for files just dispatched, the
status filter, a retry of a failed dispatch that the journal then shows, and the charts drawn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from .apiutil import BLOCKED_REASON, TOKEN, Api, running_api, unblock
from .conftest import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"{CHROMIUM} is missing (Debian packages: chromium chromium-driver)",
    ),
]


SCREENSHOT = os.environ.get("FILEDISPATCH_SCREENSHOT")  #: save a screenshot here when set


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(Path(tmp_path_factory.mktemp("dashboard"))) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="fd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def visible_rows(driver: webdriver.Chrome) -> list[tuple[str, str]]:
    """(file name, status) of each row of the history table, read in one go (it refreshes)."""
    rows = driver.execute_script(
        """return [...document.querySelectorAll('#logs tbody tr.row')].map(
            tr => [tr.querySelector('td.file').textContent, tr.dataset.status]);"""
    )
    return [(str(f), str(s)) for f, s in rows]


def click(driver: webdriver.Chrome, css: str) -> None:
    """Click what ``css`` finds; the table is redrawn every few seconds, so find it again if
    it was replaced between finding and clicking."""

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_until(attempt, 10)


def painted_pixels(driver: webdriver.Chrome, canvas_id: str) -> int:
    return int(
        driver.execute_script(
            """const c = document.getElementById(arguments[0]);
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
            return n;""",
            canvas_id,
        )
    )


def test_the_dashboard_shows_filters_retries_and_charts(
    api: Api, browser: webdriver.Chrome
) -> None:
    driver = browser
    driver.get(api.url + "/")
    # the service has a token: the page asks for it, keeps it in localStorage, and goes on
    token_form = driver.find_element(By.ID, "token-form")
    wait_until(token_form.is_displayed, 15)
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    token_form.find_element(By.CSS_SELECTOR, "button").click()

    expected = {(r["filename"], r["status"]) for r in api.rows()}
    wait_until(lambda: set(visible_rows(driver)) == expected, 15)
    assert ("a.txt", "SUCCEEDED") in expected and ("d.bin", "FAILED") in expected
    assert driver.find_element(By.ID, "failures").text == "2"
    assert driver.find_element(By.ID, "queue-depth").text == "0"
    assert driver.find_element(By.ID, "in-flight").text == "0"
    assert driver.execute_script("return localStorage.getItem('filedispatch-token')") == TOKEN

    # the charts are drawn: bars on both canvases, and pixels painted
    wait_until(
        lambda: (
            driver.find_element(By.ID, "chart-status").get_attribute("data-bars")
            not in (None, "", "0")
        ),
        15,
    )
    assert int(driver.find_element(By.ID, "chart-destination").get_attribute("data-bars") or 0)
    assert painted_pixels(driver, "chart-status") > 500
    assert painted_pixels(driver, "chart-destination") > 500
    if SCREENSHOT:
        driver.save_screenshot(SCREENSHOT)

    # filter by status
    Select(driver.find_element(By.ID, "f-status")).select_by_visible_text("FAILED")
    wait_until(lambda: {s for _, s in visible_rows(driver)} == {"FAILED"}, 15)
    assert {f for f, _ in visible_rows(driver)} == {"d.bin", "e.dat"}

    # the detail view of a failed row
    row = api.rows("filename = 'd.bin'")[0]
    click(driver, f'#logs tr[data-id="{row["id"]}"] td.file')
    dialog = driver.find_element(By.ID, "detail")
    wait_until(dialog.is_displayed, 10)
    assert BLOCKED_REASON in dialog.text and "blocker" in dialog.text
    dialog.find_element(By.CSS_SELECTOR, "button.close").click()
    wait_until(lambda: not dialog.is_displayed(), 10)

    # retry it once its cause is gone: the journal re-queues it and it is delivered
    unblock(api.root)
    click(driver, f'#logs tr[data-id="{row["id"]}"] button.retry')
    wait_until(lambda: api.rows("id = ?", (row["id"],))[0]["status"] == "SUCCEEDED", 20)
    done = api.rows("id = ?", (row["id"],))[0]
    assert done["detail"] != "retry requested" or done["status"] == "SUCCEEDED"
    assert (api.root / "blocker" / "sub" / "d.bin").exists()
    # and the page, still filtered on FAILED, no longer lists it
    wait_until(lambda: {f for f, _ in visible_rows(driver)} == {"e.dat"}, 15)
    assert driver.find_element(By.ID, "message").is_displayed() is False
