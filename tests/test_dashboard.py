"""The dashboard in a real headless Chromium (selenium): rows for files just dispatched, the
status filter, a retry of a failed dispatch that the journal then shows, and the charts drawn.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from .apiutil import BLOCKED_REASON, TOKEN, Api, running_api, unblock
from .conftest import free_port, journal_rows, wait_until
from .conftest import old as old
from .ops import console, ops_config

# where Debian's packages put them; the variables are for other layouts (and for the test of
# this module's own message, tests/test_test_setup.py)
CHROMIUM = os.environ.get("FILEDISPATCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FILEDISPATCH_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """What this machine lacks to run the dashboard in Chromium, naming the Debian packages
    to install; None when nothing is missing."""
    missing = [
        (path, package)
        for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
        if not os.access(path, os.X_OK)
    ]
    if not missing:
        return None
    paths = " and ".join(path for path, _ in missing)
    packages = " ".join(package for _, package in missing)
    return (
        f"the dashboard tests need {paths}: install the Debian package(s) {packages} "
        f"(apt-get install {packages}; .ci/run does it)"
    )


MISSING = browser_missing()
#: CI must not pass by skipping: there a missing browser fails the tests with the same message
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(MISSING) and not IN_CI, reason=MISSING or ""),
]


@pytest.fixture(scope="module", autouse=True)
def _browser_present() -> None:  # module scope: before the service of the api fixture starts
    if MISSING:  # only in CI: elsewhere the module is skipped
        pytest.fail(MISSING, pytrace=False)


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


def column(driver: webdriver.Chrome, css: str) -> dict[str, str]:
    """File name -> the text shown in the cell ``css`` finds, for each row of the history
    table (read in one go: it refreshes)."""
    rows = driver.execute_script(
        """return [...document.querySelectorAll('#logs tbody tr.row')].map(
            tr => [tr.querySelector('td.file').textContent,
                   tr.querySelector(arguments[0]).innerText]);""",
        css,
    )
    return {str(f): str(t) for f, t in rows}


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


#: a URL with no place to break a line (a folder named by a digest, say)
LONG_PATH = "in/" + "0123456789abcdef" * 16
SHOTS = os.environ.get("FILEDISPATCH_SCREENSHOT_DIR")  #: save the 1280 px screenshots here


def _status(url: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        body: dict[str, Any] = json.load(resp)
        return body


def _text(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.execute_script("return document.querySelector(arguments[0]).innerText", css))


def _end_in_view(driver: webdriver.Chrome, css: str) -> bool:
    """Whether the last character of the cell's text is drawn inside its box (not cut off)."""
    return bool(
        driver.execute_script(
            """const box = document.querySelector(arguments[0] + ' .cut');
            const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
            let text = null;
            while (walker.nextNode()) text = walker.currentNode;
            const range = document.createRange();
            range.setStart(text, text.length - 1);
            range.setEnd(text, text.length);
            const c = range.getBoundingClientRect(), b = box.getBoundingClientRect();
            return c.width > 0 && c.left >= b.left - 1 && c.right <= b.right + 1;""",
            css,
        )
    )


def test_the_dashboard_shows_what_the_service_is_doing_at_1280_px(
    tmp_path: Path, browser: webdriver.Chrome, service_factory: Any
) -> None:
    driver = browser
    driver.set_window_size(1280, 900)
    port, console_port = free_port(), free_port()
    dead = free_port()  # nothing listens there
    long_url = f"ftp://bob:pw@127.0.0.1:{dead}/{LONG_PATH}"
    cfg = ops_config(
        tmp_path,
        rules=[
            {
                "name": "gone",
                "glob": "*.bin",
                "to": {"url": long_url, "retry": {"attempts": 1}, "connect_timeout": 2},
            },
            {
                "name": "later",
                "glob": "*.dat",
                "to": {
                    "url": f"ftp://bob:pw@127.0.0.1:{dead}/later",
                    "retry": {"attempts": 5, "delay": 3600, "jitter": False},
                    "connect_timeout": 2,
                },
            },
            {"name": "rest", "glob": "*", "to": str(tmp_path / "outbox")},
        ],
        api={"port": port, "token": TOKEN},
        monitor={"port": console_port},
        node="desk-1",
    )
    svc = service_factory(cfg).start()
    url = f"http://127.0.0.1:{port}"
    driver.get(url + "/")
    driver.execute_script("localStorage.setItem('filedispatch-token', arguments[0])", TOKEN)
    driver.get(url + "/")
    wait_until(lambda: _text(driver, "#failures") == "0", 15)
    assert "bad" not in str(driver.find_element(By.ID, "failures-card").get_attribute("class"))
    assert _text(driver, "#state") == "running"
    # the node (one, implicit, with SQLite), its lease held
    node_css = '#nodes tbody tr[data-node="desk-1"]'
    wait_until(lambda: bool(driver.find_elements(By.CSS_SELECTOR, node_css)), 15)
    assert "held" in driver.find_element(By.CSS_SELECTOR, node_css).text

    old(tmp_path / "inbox" / "big.bin", b"b")
    old(tmp_path / "inbox" / "soon.dat", b"s")
    db = tmp_path / "journal.db"
    wait_until(lambda: journal_rows(db, "filename='big.bin' AND status='FAILED'"), 30)
    wait_until(lambda: journal_rows(db, "filename='soon.dat' AND attempts=1"), 30)

    # failures, the destination's last error, what waits for a retry and when
    wait_until(lambda: _text(driver, "#failures") == "1", 15)
    assert "bad" in str(driver.find_element(By.ID, "failures-card").get_attribute("class"))
    wait_until(lambda: _text(driver, "#retry-waiting") == "1", 15)
    assert _text(driver, "#retry-next").startswith("next ")
    status = _status(url)
    assert status["retry_waiting"]["count"] == 1 and status["retry_waiting"]["next_attempt"]
    dest_errors = {
        row.get_attribute("data-destination"): row.text
        for row in driver.find_elements(By.CSS_SELECTOR, "#destinations tbody tr")
    }
    shown_url = long_url.replace("bob:pw@", "bob:***@")
    assert shown_url in dest_errors, dest_errors
    last_error = status["destinations"][shown_url]["last_error"]
    # the error without the URL it starts with (the row shows the destination already): the
    # cause is what shows, not the URL again
    cause = last_error.removeprefix(shown_url + ": ")
    assert cause != last_error and cause[:20] in dest_errors[shown_url], dest_errors
    assert "pw@" not in driver.page_source
    # two long URLs on one server: their ends are on screen, so the rows can be told apart
    later_url = shown_url.rsplit("/", 2)[0] + "/later"
    for d, end in ((shown_url, LONG_PATH[-8:]), (later_url, "/later")):
        css = f'#destinations tr[data-destination="{d}"] td.dest'
        assert _text(driver, css).endswith(end)
        assert _end_in_view(driver, css), (css, _text(driver, css))
    row_css = '#logs tr[data-id="{}"] td.dest'
    for r in journal_rows(db):
        assert _end_in_view(driver, row_css.format(r["id"])), r["destination"]
    # numbers and their headers line up (right-aligned both)
    for table in ("#destinations", "#nodes"):
        edges = driver.execute_script(
            """const t = document.querySelector(arguments[0]);
            return [...t.querySelectorAll('thead th')].map((th, i) => {
              const td = t.querySelector(`tbody tr td:nth-child(${i + 1})`);
              return [th.className, th.getBoundingClientRect().right,
                      td && getComputedStyle(td).textAlign, getComputedStyle(th).textAlign];
            });""",
            table,
        )
        for cls, _, td_align, th_align in edges:
            if "num" in cls:
                assert td_align == th_align == "right", (table, edges)
    # the charts follow what just happened, not 30 s later
    wait_until(
        lambda: (
            driver.find_element(By.ID, "chart-status").get_attribute("data-bars")
            not in (None, "", "0")
        ),
        20,
    )

    # the failed row with its long URL: the reason and the Retry button stay on screen
    row = journal_rows(db, "filename='big.bin'")[0]
    retry_css = f'#logs tr[data-id="{row["id"]}"] button.retry'
    wait_until(lambda: bool(driver.find_elements(By.CSS_SELECTOR, retry_css)), 15)
    width = int(driver.execute_script("return document.documentElement.clientWidth"))
    reason_css = f'#logs tr[data-id="{row["id"]}"] td.reason'
    for css in (retry_css, reason_css):
        rect = driver.execute_script(
            "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()", css
        )
        assert rect["width"] > 0 and rect["right"] <= width, (css, rect, width)
    # the reason says why (the URL is in the destination column beside it)
    assert _text(driver, reason_css).startswith(row["reason"].removeprefix(shown_url + ": ")[:15])
    assert int(driver.execute_script("return document.documentElement.scrollWidth")) <= width
    if SHOTS:
        driver.save_screenshot(str(Path(SHOTS) / "dashboard-1280.png"))
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", retry_css)
        driver.save_screenshot(str(Path(SHOTS) / "dashboard-history-1280.png"))

    # paused by an operator: PAUSED, and why
    (answer,) = console(console_port, "fd-pause")
    assert answer.startswith("paused")
    wait_until(lambda: _text(driver, "#state") == "PAUSED", 15)
    assert "operator" in _text(driver, "#pause-alert")
    if SHOTS:
        driver.save_screenshot(str(Path(SHOTS) / "dashboard-paused-1280.png"))
    (answer,) = console(console_port, "fd-resume")
    wait_until(lambda: _text(driver, "#state") == "running", 15)
    assert not driver.find_element(By.ID, "pause-alert").is_displayed()

    # the status filter takes any case, in the API too
    for spelling in ("failed", "Failed", "FAILED"):
        request = urllib.request.Request(
            f"{url}/api/v1/logs?status={spelling}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert [r["filename"] for r in json.load(resp)["results"]] == ["big.bin"]
    assert svc.stop() == 0


def test_the_dashboard_shows_what_waits_for_a_window(
    tmp_path: Path, browser: webdriver.Chrome, service_factory: Any
) -> None:
    import datetime as dt

    driver = browser
    port = free_port()
    start = (dt.datetime.now(dt.UTC).hour + 2) % 24
    window = f"{start:02d}:00-{(start + 1) % 24:02d}:00"
    outbox = tmp_path / "night"
    cfg = ops_config(
        tmp_path,
        rules=[{"to": {"url": str(outbox), "window": window, "timezone": "UTC"}}],
        api={"port": port, "token": TOKEN},
    )
    svc = service_factory(cfg).start()
    old(tmp_path / "inbox" / "night.txt", b"n")
    wait_until(lambda: journal_rows(tmp_path / "journal.db", "reason IS NOT NULL"), 30)
    url = f"http://127.0.0.1:{port}"
    driver.get(url + "/")
    driver.execute_script("localStorage.setItem('filedispatch-token', arguments[0])", TOKEN)
    driver.get(url + "/")
    wait_until(lambda: "1 waiting" in _text(driver, "#windows"), 15)
    text = _text(driver, "#windows")
    assert f"{outbox}: window {window} shut; 1 waiting, opens " in text
    assert driver.find_elements(By.CSS_SELECTOR, "#windows li.window.shut")
    assert svc.stop() == 0


def test_the_dashboard_tells_a_marked_row_from_a_delivery(
    tmp_path: Path, browser: webdriver.Chrome, service_factory: Any
) -> None:
    from .conftest import run_cli

    driver = browser
    port = free_port()
    cfg = ops_config(tmp_path, api={"port": port, "token": TOKEN})
    old(tmp_path / "inbox" / "there.txt", b"was there")
    assert run_cli("mark-existing", "-c", cfg).returncode == 0
    svc = service_factory(cfg).start()
    old(tmp_path / "inbox" / "new.txt", b"new")
    wait_until(lambda: journal_rows(tmp_path / "journal.db", "filename='new.txt' AND attempts=1"))
    url = f"http://127.0.0.1:{port}"
    driver.get(url + "/")
    driver.execute_script("localStorage.setItem('filedispatch-token', arguments[0])", TOKEN)
    driver.get(url + "/")
    wait_until(lambda: len(visible_rows(driver)) == 2, 15)
    assert column(driver, "td.status") == {"there.txt": "MARKED", "new.txt": "SUCCEEDED"}
    (marked,) = journal_rows(tmp_path / "journal.db", "filename='there.txt'")
    click(driver, f'#logs tr[data-id="{marked["id"]}"] td.file')
    dialog = driver.find_element(By.ID, "detail")
    wait_until(dialog.is_displayed, 10)
    assert "never sent" in dialog.text
    assert svc.stop() == 0


def _node_rows(driver: webdriver.Chrome) -> dict[str, list[str]]:
    """The nodes panel, read in one go (it is redrawn at each refresh): name -> its cells."""
    rows = driver.execute_script(
        """return [...document.querySelectorAll('#nodes tbody tr')].map(
            tr => [tr.dataset.node, [...tr.cells].map(td => td.textContent)]);"""
    )
    return {str(name): [str(c) for c in cells] for name, cells in rows}


def test_the_dashboard_lists_two_nodes_on_one_postgresql_journal(
    tmp_path: Path, browser: webdriver.Chrome, service_factory: Any, pg_url: str
) -> None:
    """Two real services on one PostgreSQL database, one dashboard: the nodes panel lists
    both nodes, their leases held, each with the shared sources it lists (the inbox both
    serve, listed by the node that started first, and one source of each node's own)."""
    from .apiutil import database_config
    from .conftest import write_config

    def config(node: str, own: str, port: int) -> Path:
        shared = {"shared": True, "settle": 0, "poll_interval": 0.2}
        for name in ("inbox", own):
            (tmp_path / name).mkdir(exist_ok=True)
        return write_config(
            tmp_path / f"{node}.yml",
            {
                "database": database_config(pg_url),
                "node": node,
                "lease": "30s",
                "sources": [
                    {"path": str(tmp_path / "inbox"), "name": "inbox", **shared},
                    {"path": str(tmp_path / own), "name": own, **shared},
                ],
                "rules": [{"glob": "*", "to": str(tmp_path / "out")}],
                "api": {"port": port, "token": TOKEN},
                "monitor": {"enabled": False},
            },
        )

    driver = browser
    ports = free_port(), free_port()
    first = service_factory(config("node-a", "east", ports[0])).start()
    wait_until(lambda: "source inbox: this node lists it now" in first.log(), 60)
    second = service_factory(config("node-b", "west", ports[1])).start()
    expected = {  # name, lease, lists, in flight, waiting
        "node-a": ["node-a", "held", "east, inbox", "0", "0"],
        "node-b": ["node-b", "held", "west", "0", "0"],
    }
    for port in ports:  # either node's dashboard shows the whole cluster
        url = f"http://127.0.0.1:{port}"
        driver.get(url + "/")
        driver.execute_script("localStorage.setItem('filedispatch-token', arguments[0])", TOKEN)
        driver.get(url + "/")

        def shown() -> dict[str, list[str]] | None:
            rows = _node_rows(driver)
            # the renewal age (third cell) changes at every refresh: not compared
            cut = {name: [c for i, c in enumerate(cells) if i != 2] for name, cells in rows.items()}
            return rows if cut == expected else None

        rows = wait_until(shown, 60)
        for cells in rows.values():
            assert 0 <= float(cells[2]) < 30  # renewed within the lease
        assert driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr.has-error") == []
    assert first.stop() == 0, first.log()
    assert second.stop() == 0, second.log()


#: a label whose examples folder is named as markup: the page must show it as text
MARKUP_LABEL = "<img src=x onerror=window.pwned=1>"


def test_the_dashboard_shows_the_label_a_learned_rule_gave_a_file(
    tmp_path: Path, browser: webdriver.Chrome, service_factory: Any
) -> None:
    from . import learn_corpus as corpus
    from .conftest import write_config
    from .test_learn import doc, learn_config

    driver = browser
    port = free_port()
    examples = corpus.examples(
        tmp_path / "examples", per_label=5, labels=["medical", "invoices"], kinds=("txt",)
    )
    for i in range(5):
        corpus.write(
            examples / MARKUP_LABEL / f"doc-{i}.txt",
            corpus.text(random.Random(i), "resumes"),
        )
    (tmp_path / "inbox").mkdir()
    data = learn_config(tmp_path, examples, api={"port": port, "token": TOKEN})
    svc = service_factory(write_config(tmp_path / "c.yml", data)).start()
    doc(tmp_path / "inbox" / "scan.txt", "medical", 11)
    doc(tmp_path / "inbox" / "cv.txt", "resumes", 12)
    doc(tmp_path / "inbox" / "note.txt", None, 13)  # no label fits: the next rule takes it
    db = tmp_path / "journal.db"
    wait_until(lambda: len(journal_rows(db, "status = 'SUCCEEDED'")) == 3, 30)
    rows = {r["filename"]: r for r in journal_rows(db)}
    assert (rows["scan.txt"]["label"], rows["cv.txt"]["label"]) == ("medical", MARKUP_LABEL)

    url = f"http://127.0.0.1:{port}"
    driver.get(url + "/")
    driver.execute_script("localStorage.setItem('filedispatch-token', arguments[0])", TOKEN)
    driver.get(url + "/")
    wait_until(lambda: len(visible_rows(driver)) == 3, 15)
    # the rule's column: the rule and, for a learned rule, the label it gave
    assert column(driver, "td:nth-child(6)") == {
        "scan.txt": "learned (medical)",
        "cv.txt": f"learned ({MARKUP_LABEL})",
        "note.txt": "rest",
    }
    # shown as text, never made into an element
    assert not driver.find_elements(By.CSS_SELECTOR, "#logs img")
    assert driver.execute_script("return window.pwned") is None

    # the detail view lists it as a field of its own
    click(driver, f'#logs tr[data-id="{rows["scan.txt"]["id"]}"] td.file')
    dialog = driver.find_element(By.ID, "detail")
    wait_until(dialog.is_displayed, 10)
    fields = dict(
        driver.execute_script(
            """return [...document.querySelectorAll('#detail-fields dt')].map(
                dt => [dt.textContent, dt.nextElementSibling.textContent]);"""
        )
    )
    assert fields["label"] == "medical" and fields["rule"] == "learned"
    assert svc.stop() == 0
