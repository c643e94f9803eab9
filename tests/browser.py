"""A real headless browser for the console's end-to-end tests: Debian's chromium and
chromium-driver (scripts/bootstrap installs them), driven by Selenium. Nothing is downloaded at
run time: the driver and the browser are given by path, and Selenium Manager is told to stay
offline. A machine without them fails the tests with the reason (they are never skipped)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("SAFEGUARD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAFEGUARD_CHROMEDRIVER", "/usr/bin/chromedriver")


def chromium(width: int = 1360, height: int = 940):
    """A new browser with a profile of its own (its own cookies: a separate reviewer session)."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(path)):
            raise AssertionError(f"{path} is missing: install Debian's chromium and chromium-driver (scripts/bootstrap "
                                 "does when run as root)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", "--lang=en-GB", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver
