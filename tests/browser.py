"""Chromium for the tests of the web UI: Debian's chromium and chromedriver
through Selenium, headless, with a profile of its own, its own fetching in
the background turned off, and the console kept so that every error on a
page is seen.
Waits poll for a condition; none sleeps for a fixed time."""
import time

from selenium import webdriver
from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--lang=en-US",
         # even so, Chromium looks up its search engine, updates, accounts and
         # autofill servers: nothing but localhost and 127.0.0.1 resolves, and what is not
         # loopback goes to a proxy that is not there (loopback bypasses it)
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9"]


# what a page that is still drawing may raise for a moment
TRANSIENT = (AssertionError, StaleElementReferenceException, ElementClickInterceptedException)


def eventually(check, timeout=20, step=0.1):
    """The value of check() once it returns without an AssertionError (or an
    element replaced or covered while the page draws); after timeout, its
    last error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except TRANSIENT:
            if time.monotonic() > deadline:
                raise
        time.sleep(step)


class Browser:
    """One headless Chromium, for a whole test module."""

    def __init__(self, profile, width=1600, height=1100):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.console = []       # every entry of the console read so far

    def open(self, url):
        self.driver.get(url)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def read_console(self):
        """The console's entries since the last read (and keeps them all)."""
        entries = self.driver.get_log("browser")
        self.console += entries
        return entries

    def console_errors(self):
        """The errors (level SEVERE) in the console since the last read."""
        return [e["message"] for e in self.read_console() if e["level"] == "SEVERE"]

    def viewport(self, width=None, height=None, mobile=False):
        """Show pages as on a screen of width x height CSS pixels (mobile: a
        phone's); without a size, in the window again."""
        if width is None:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        else:
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def screenshot(self, path):
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        return path

    def quit(self):
        self.driver.quit()
