"""The built-in page in headless Chromium while a job streams: every domain drawn, live redraws."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mixer.client import MixerClient
from mixer.server.auth import create_token
from mixer.store import Store
from tests.monitoring.conftest import DOMAINS, binary, make_report, store_derived

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = binary("/usr/bin/chromium", "chromium")
    driver_path = binary("/usr/bin/chromedriver", "chromium-driver")
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager would phone home; this network is closed
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    # Without the background-networking flags Chromium's own connections hang in a closed network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path, log_output=str(tmp_path / "chromedriver.log")), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(what: str, fn, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def chart_state(driver, chart: str) -> tuple[str | None, dict[str, str]]:
    """The chart's newest drawn version and, per domain, the shape of its series."""
    return driver.execute_script(
        "const svg = document.getElementById(arguments[0]);"
        "const paths = {}; for (const p of svg.querySelectorAll('[data-domain]')) paths[p.dataset.domain] = p.getAttribute('d');"
        "return [svg.dataset.version || null, paths];",
        chart,
    )


def test_job_page_draws_every_domain_and_redraws_on_new_versions(stream, browser, tmp_path):
    stream.wait_steps(40)
    base = f"http://127.0.0.1:{stream.server.http_port}"
    browser.get(f"{base}/jobs/{stream.job}")

    def drawn():
        version, paths = chart_state(browser, "weights")
        return (version, paths) if version is not None and set(paths) == set(stream.domains) else None

    v1, weights1 = wait_for("every domain in the weights chart", drawn)
    loss = wait_for("every domain in the loss chart", lambda: (p := chart_state(browser, "loss")[1]).keys() == set(stream.domains) and p)
    assert all(d.count("L") > 5 for d in loss.values()), f"the loss lines should have many points: {loss}"
    assert browser.find_elements("css selector", "#versions tbody tr[data-version]"), "the versions table is empty"

    # The stream keeps producing versions (one every 10 steps): the chart must follow without a reload.
    _, weights2 = wait_for("a newer version in the weights chart", lambda: (s := drawn()) and int(s[0]) > int(v1) and s)
    assert weights2 != weights1, "the weights chart did not change after a new version"

    wait_for("an applied-version lag", lambda: browser.execute_script(
        "return [...document.querySelectorAll('#versions tbody tr')].some(r => r.cells[4].textContent !== '–')"))
    wait_for("the lag chart", lambda: browser.find_elements("css selector", "#lag .lines path"))
    shot = tmp_path / "job-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    browser.get(base + "/")
    row = wait_for("the job on the index page", lambda: browser.find_elements("css selector", f'#jobs tr[data-job="{stream.job}"]'))
    bars = row[0].find_elements("css selector", "[data-domain]")
    assert {b.get_attribute("data-domain") for b in bars} == set(stream.domains)
    browser.save_screenshot(str(tmp_path / "index-page.png"))

    # A derived job (replayed with another strategy, versions only) shows like any job, with its source's loss.
    store_derived(stream.server.db, "watched-run-static", source=stream.job, domains=stream.domains)
    browser.get(f"{base}/jobs/watched-run-static")
    _, paths = wait_for("the derived job's weights", lambda: (st := chart_state(browser, "weights"))[0] == "3" and st)
    assert set(paths) == set(stream.domains)
    wait_for("the source's loss in the derived job's page", lambda: len(chart_state(browser, "loss")[1]) == len(stream.domains))
    assert "watched-run" in browser.find_element("id", "loss-note").text
    assert len(browser.find_elements("css selector", "#topics tbody tr")) == 10
    browser.save_screenshot(str(tmp_path / "derived-page.png"))


def test_page_asks_for_a_reader_token_when_auth_is_on(server_factory, sqlite_url, browser):
    srv = server_factory(sqlite_url, "--auth")
    store = Store(sqlite_url)
    admin = create_token(store, "*", "admin")
    with MixerClient(srv.address, token=admin) as c:
        c.create_job({"name": "guarded", "domains": DOMAINS, "strategy": "odm", "cadence": {"update_every": 5}})
        rng = np.random.default_rng(1)
        for s in range(12):
            c.report("guarded", make_report(s, -1, rng))
    reader = create_token(store, "guarded", "reader")
    store.close()
    browser.get(f"http://127.0.0.1:{srv.http_port}/jobs/guarded")
    form = wait_for("the token form", lambda: (f := browser.find_element("id", "login")).is_displayed() and f)
    assert "bearer token" in form.text
    assert chart_state(browser, "weights")[0] is None, "no data may be drawn without a token"
    form.find_element("name", "token").send_keys(reader)
    form.find_element("tag name", "button").click()
    version, paths = wait_for("the weights chart after the token", lambda: (st := chart_state(browser, "weights"))[0] and st)
    assert version == "2" and set(paths) == set(DOMAINS)
    assert not browser.find_element("id", "login").is_displayed()
