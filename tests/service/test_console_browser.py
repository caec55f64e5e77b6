"""The operator's console in a real browser (Debian's Chromium, headless, driven by Selenium
over chromedriver) against the gateway of the service tests' real chain: sign in, find a
message by its sender, open the quarantine, release a message and see it delivered, on a
desktop's width and a phone's. Screenshots go to artifacts/ (kept by CI as test artefacts).
"""

from __future__ import annotations

import shutil
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit import mail
from tests.service.test_gateway_service import ADMIN, HOSTS, Stack, stack  # noqa: F401

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PHONE = (390, 844)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(bash scripts/install-deps.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or ""),
                              options=options)
    driver.implicitly_wait(5)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def base(stack: Stack) -> str:  # noqa: F811
    # localhost: a browser keeps the Secure cookie over plain HTTP only there.
    return f"http://localhost:{stack.gateway_port}"


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"console-{name}.png"))


def fits_the_width(driver: Any) -> bool:
    return bool(driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_an_admin_finds_a_message_and_releases_one_from_quarantine(
        browser: Any, stack: Stack) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    marker = uuid.uuid4().hex[:8]
    with smtplib.SMTP(HOSTS["clamav"], stack.ports["clamav"], timeout=60) as smtp:
        smtp.sendmail(f"web.{marker}@remote.test", ["bob@secumail.test"],
                      mail.plain(subject=f"web {marker}"))
        smtp.sendmail(f"kept.{marker}@remote.test", ["bob@secumail.test"], mail.eicar())
        smtp.sendmail(f"gone.{marker}@remote.test", ["bob@secumail.test"], mail.eicar())

    browser.get(base(stack) + "/console/quarantine")
    assert "Sign in" in browser.title  # no session: the form, not the quarantine
    assert f"kept.{marker}" not in browser.page_source
    browser.find_element(By.NAME, "token").send_keys(ADMIN)
    browser.find_element(By.CSS_SELECTOR, "form button").click()
    # A click does not wait for the page it opens (find_element does, current_url does not).
    WebDriverWait(browser, 10).until(
        lambda driver: driver.current_url.endswith("/console/tracking"))

    deadline = time.monotonic() + 30  # the gateway collects events every 0.5 s here
    while True:
        browser.get(base(stack) + f"/console/tracking?sender=web.{marker}%40remote.test")
        text = browser.find_element(By.TAG_NAME, "main").text
        if "spamd" in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "1 message" in text and "clamav" in text and "spamd" in text, text
    shot(browser, "tracking")

    browser.find_element(By.LINK_TEXT, "Quarantine").click()
    row = browser.find_element(By.XPATH, f"//tr[contains(., 'kept.{marker}')]")
    assert row.find_elements(By.TAG_NAME, "td")[6].text == "eicar"  # the Subject column
    row.find_element(By.LINK_TEXT, "Open").click()
    assert "Eicar" in browser.find_element(By.TAG_NAME, "main").text
    assert browser.find_element(By.CSS_SELECTOR, "pre.preview").text.startswith(
        "The test virus:")  # the body, as plain text
    shot(browser, "quarantined-message")
    before = len(stack.sink.envelopes)
    browser.find_element(By.XPATH, "//button[text()='Release']").click()
    assert "Released" in browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    deadline = time.monotonic() + 30
    while len(stack.sink.envelopes) == before:
        assert time.monotonic() < deadline, "the released message never reached the sink"
        time.sleep(0.3)
    assert stack.sink.envelopes[-1].mail_from == f"kept.{marker}@remote.test"
    assert f"kept.{marker}" not in browser.page_source  # gone from the list

    # Learning a kept message keeps it; Delete asks first (a page: no JavaScript).
    row = browser.find_element(By.XPATH, f"//tr[contains(., 'gone.{marker}')]")
    row.find_element(By.LINK_TEXT, "Open").click()
    browser.find_element(By.XPATH, "//button[text()='Learn as spam, keep it']").click()
    assert "as spam, kept:" in browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    assert f"gone.{marker}" in browser.find_element(By.TAG_NAME, "main").text  # still here
    browser.find_element(By.XPATH, "//button[text()='Delete']").click()
    # A click does not wait for the page it opens (find_element does, title does not).
    WebDriverWait(browser, 10).until(lambda driver: "Delete quarantined message"
                                     in driver.title)
    browser.find_element(By.LINK_TEXT, "Cancel").click()
    assert f"gone.{marker}" in browser.find_element(By.TAG_NAME, "main").text
    browser.find_element(By.XPATH, "//button[text()='Delete']").click()
    browser.find_element(By.XPATH, "//button[text()='Delete for good']").click()
    assert "Deleted" in browser.find_element(By.CSS_SELECTOR, "[role=status]").text
    assert f"gone.{marker}" not in browser.page_source

    browser.set_window_size(*PHONE)
    for page in ("tracking?sender=web." + marker + "%40remote.test", "quarantine",
                 "greylist", "health"):
        browser.get(base(stack) + "/console/" + page)
        assert fits_the_width(browser), page
        shot(browser, "phone-" + page.split("?")[0])
    browser.set_window_size(1280, 900)

    browser.find_element(By.XPATH, "//button[text()='Sign out']").click()
    WebDriverWait(browser, 10).until(lambda driver: driver.current_url.endswith("/login"))
    browser.get(base(stack) + "/console/quarantine")
    assert "Sign in" in browser.title
