"""Headless Chromium driving Open WebUI's web interface, for e2e/test_browser.py.

Debian's ``chromium`` and ``chromium-driver`` (scripts/services.sh installs
them) through selenium; nothing is downloaded: the driver's path is given, so
Selenium Manager never runs. Each window has a fresh profile, so a second user
signs in with no cookie or local storage of the first. Elements are found the
way a person finds them: by ARIA label, placeholder or visible text; every wait
is an explicit condition with a deadline.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)
TIMEOUT = 20.0  # seconds for any one condition: a reply shows in ~1 s, a generated title in ~2.5 s
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-features=Translate,OptimizationHints,MediaRouter",
                  "--no-default-browser-check", "--password-store=basic")

T = TypeVar("T")

_VISIBLE_BY_XPATH = """
const found = document.evaluate(arguments[0], document, null, XPathResult.ORDERED_NODE_SNAPSHOT_TYPE, null);
const shown = [];
for (let i = 0; i < found.snapshotLength; i++) {
  const e = found.snapshotItem(i);
  if (e.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}) && e.getClientRects().length) shown.push(e);
}
return shown;
"""


def xpath_literal(text: str) -> str:
    """``text`` as an XPath string literal, whatever quotes it holds."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ", \"'\", ".join(f"'{part}'" for part in text.split("'")) + ")"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class Browser:
    """One Chromium window on Open WebUI, with the helpers a test needs."""

    driver: WebDriver
    base_url: str
    artifacts: Path
    name: str
    profile: Path
    shots: list[Path] = field(default_factory=list)
    spent: dict[str, float] = field(default_factory=dict)  # seconds, by kind of wait: for the timings

    # -- waiting ----------------------------------------------------------------------------

    def until(self, condition: Callable[[WebDriver], T], what: str, timeout: float = TIMEOUT) -> T:
        """``condition`` once it returns something truthy; else a TimeoutException naming ``what``,
        with a screenshot of the moment."""
        started = time.monotonic()
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(condition)
        except TimeoutException as exc:
            path = self.shot(f"timeout {what}")
            raise TimeoutException(f"{self.name}: waited {timeout:.0f} s for {what} (screenshot {path})") from exc
        finally:
            took = time.monotonic() - started
            self.spent["waits"] = self.spent.get("waits", 0.0) + took
            if took > 1.0:
                self.spent[f"wait: {what[:50]}"] = self.spent.get(f"wait: {what[:50]}", 0.0) + took

    def visible(self, xpath: str) -> list[WebElement]:
        """Elements matching ``xpath`` that are rendered and visible (one round trip to the page)."""
        return self.driver.execute_script(_VISIBLE_BY_XPATH, xpath)

    def element(self, xpath: str, what: str, timeout: float = TIMEOUT) -> WebElement:
        """The first displayed element matching ``xpath``."""
        return self.until(lambda _: next(iter(self.visible(xpath)), None), what, timeout)

    def by_label(self, label: str, timeout: float = TIMEOUT) -> WebElement:
        return self.element(f"//*[@aria-label={xpath_literal(label)}]", f"aria-label {label!r}", timeout)

    def by_placeholder(self, placeholder: str, timeout: float = TIMEOUT) -> WebElement:
        return self.element(f"//*[@placeholder={xpath_literal(placeholder)}]", f"placeholder {placeholder!r}",
                            timeout)

    def by_text(self, text: str, tag: str = "*", timeout: float = TIMEOUT) -> WebElement:
        """The innermost displayed ``tag`` whose text contains ``text``."""
        lit = xpath_literal(text)
        xpath = f"//{tag}[contains(normalize-space(.), {lit})][not(.//*[contains(normalize-space(.), {lit})])]"
        if tag != "*":
            xpath = f"//{tag}[contains(normalize-space(.), {lit})]"
        return self.element(xpath, f"{tag} with text {text!r}", timeout)

    def button(self, text: str, timeout: float = TIMEOUT) -> WebElement:
        """A displayed button whose visible text is ``text`` (or contains it)."""
        lit = xpath_literal(text)
        return self.element(f"//button[normalize-space(.)={lit}] | //button[contains(normalize-space(.), {lit})]",
                            f"button {text!r}", timeout)

    def page_text(self) -> str:
        """The page's rendered text (``innerText``: what CSS shows, whitespace as laid out)."""
        return self.driver.execute_script("return document.body ? document.body.innerText : ''")

    def shows(self, text: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``text`` is part of the page's visible text."""
        self.until(lambda _: text in self.page_text(), f"the page to show {text!r}", timeout)

    def hides(self, text: str, timeout: float = TIMEOUT) -> None:
        self.until(lambda _: text not in self.page_text(), f"the page to stop showing {text!r}", timeout)

    # -- acting -------------------------------------------------------------------------------

    def go(self, path: str) -> None:
        started = time.monotonic()
        self.driver.get(self.base_url + path)
        self.spent["page loads"] = self.spent.get("page loads", 0.0) + time.monotonic() - started

    def click(self, element: WebElement, what: str = "element") -> None:
        """Click ``element``, through an overlay's fade-out if need be."""
        def clicked(_: WebDriver) -> bool:
            try:
                element.click()
            except ElementClickInterceptedException:
                return False
            return True
        self.until(clicked, f"a click on {what}")

    def type_into(self, element: WebElement, text: str, submit: bool = False) -> None:
        element.click()
        element.send_keys(text)
        if submit:
            element.send_keys(Keys.ENTER)

    def replace_text(self, element: WebElement, text: str) -> None:
        """Select what an input holds and type ``text`` over it, as a person does (key events, so the
        page's bindings see it; ``clear()`` would not)."""
        element.click()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(text)

    def attach(self, path: Path) -> None:
        """Give a file to the message input's (hidden) file picker, as "Upload Files" would."""
        self.chat_input()
        self.driver.find_element(By.CSS_SELECTOR, "input[type=file][multiple]").send_keys(str(path))

    def settles(self, condition: Callable[[WebDriver], object], timeout: float) -> bool:
        """Whether ``condition`` comes true within ``timeout`` (no exception: for what may never come)."""
        try:
            WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                          ignored_exceptions=(StaleElementReferenceException,)).until(condition)
        except TimeoutException:
            return False
        return True

    def escape(self) -> None:
        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def shot(self, step: str) -> Path:
        """A screenshot of the window under artifacts/, numbered in the order taken."""
        path = self.artifacts / f"{len(list(self.artifacts.glob('*.png'))):02d}-{self.name}-{slug(step)[:60]}.png"
        started = time.monotonic()
        try:
            self.driver.save_screenshot(str(path))
        except WebDriverException:
            return path
        finally:
            self.spent["screenshots"] = self.spent.get("screenshots", 0.0) + time.monotonic() - started
        self.shots.append(path)
        return path

    # -- Open WebUI ---------------------------------------------------------------------------

    def sign_up_first_user(self, name: str, email: str, password: str) -> None:
        """The landing page's "Get started", then the form that makes the first account the admin."""
        self.go("/")
        self.click(self.by_label("Get started"), "Get started")
        self.type_into(self.by_placeholder("Enter Your Full Name"), name)
        self.type_into(self.by_placeholder("Enter Your Email"), email)
        self.type_into(self.by_placeholder("Enter Your Password"), password)
        self.click(self.button("Create Admin Account"), "Create Admin Account")
        self.until(lambda d: "/auth" not in d.current_url, "the sign-up to leave /auth")

    def sign_in(self, email: str, password: str) -> None:
        self.go("/auth")
        self.type_into(self.by_placeholder("Enter Your Email"), email)
        self.type_into(self.by_placeholder("Enter Your Password"), password)
        self.click(self.button("Sign in"), "Sign in")
        self.until(lambda d: "/auth" not in d.current_url, "the sign-in to leave /auth")
        self.chat_input()

    def dismiss_whats_new(self) -> None:
        """Open WebUI shows an admin "What's New" once per version; it is gone for good when dismissed."""
        self.click(self.button("Okay, Let's Go!"), "Okay, Let's Go!")
        self.hides("What's New in Open WebUI")

    def chat_input(self) -> WebElement:
        return self.element("//*[@id='chat-input'][@contenteditable='true']", "the message input")

    def open_sidebar(self) -> None:
        """The sidebar is closed in a fresh profile; opening it is remembered in the profile."""
        toggle = self.element("//button[@aria-label='Close Sidebar' or @aria-label='Open Sidebar']",
                              "the sidebar's toggle")
        if toggle.get_attribute("aria-label") == "Open Sidebar":
            self.click(toggle, "Open Sidebar")
        self.by_label("Close Sidebar")

    def expand(self, section: str) -> None:
        """Open a sidebar section ("Channels", "Folders"): a fresh profile starts with them collapsed."""
        self.open_sidebar()
        toggle = self.element(f"//button[@aria-expanded][normalize-space(.)={xpath_literal(section)}]",
                              f"the sidebar's {section}")
        if toggle.get_attribute("aria-expanded") == "false":
            self.click(toggle, section)
        self.until(lambda _: toggle.get_attribute("aria-expanded") == "true", f"{section} to open")

    def send(self, text: str) -> None:
        """Type ``text`` into the message input and press Enter (the reply streams over socket.io)."""
        self.type_into(self.chat_input(), text, submit=True)

    def new_chat(self, text: str) -> str:
        """A new chat with ``text`` as its first message; returns the chat id once the URL has it."""
        self.go("/")
        self.send(text)
        url = self.until(lambda d: d.current_url if "/c/" in d.current_url else None, "the new chat's URL")
        return url.rsplit("/c/", 1)[1].split("?")[0]

    def open_settings(self, section: str) -> None:
        """User menu > Settings > ``section``."""
        menu = self.element("//button[@aria-label='User menu'] | //button[.//*[@aria-label='Open User Profile Menu']]",
                            "the user menu (rail or sidebar)")
        self.click(menu, "the user menu")
        self.click(self.button("Settings"), "Settings")
        self.click(self.button(section), section)

    def api(self, path: str) -> Any:
        """GET ``path`` as the signed-in user (the page's own token), as JSON; for waits on a save."""
        return self.driver.execute_async_script(
            "const [path, done] = arguments;"
            "fetch(path, {headers: {Authorization: 'Bearer ' + localStorage.token}})"
            ".then(r => r.json()).then(done, e => done({error: String(e)}));", path)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


class BrowserFactory:
    """Opens Chromium windows with fresh profiles; remembers them to quit them all."""

    def __init__(self, artifacts: Path, scratch: Path) -> None:
        self.artifacts = artifacts
        self.scratch = scratch
        self.opened: list[Browser] = []

    def open(self, base_url: str, name: str) -> Browser:
        profile = Path(tempfile.mkdtemp(prefix=f"profile-{slug(name)}-", dir=self.scratch))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(executable_path=CHROMEDRIVER, log_output=str(self.scratch / f"chromedriver-{slug(name)}.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(60)
        browser = Browser(driver, base_url, self.artifacts, name, profile)
        self.opened.append(browser)
        return browser

    def quit_all(self) -> None:
        while self.opened:
            self.opened.pop().quit()
