"""The console against another site, in a real browser (Debian's chromium): a page on another port
of the same host (same-site, so SameSite cookies are sent) that loads the console's addresses as
images and a frame and posts a sign-in form to it. The console is the application served by its
real web server (`consumer.review.web.WebServer`); the broker is not involved (the decision
writer is the unit tests'), so nothing here needs Kafka."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from consumer.config.console import ConsoleSettings
from tests.browser import chromium
from tests.unit.console.test_console import item
from tests.unit.console.test_console_http import REVIEWERS, Served


class OtherSite:
    """Serves one HTML page on 127.0.0.1, another port than the console's."""

    def __init__(self, page: str):
        body = page.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_another_site_takes_no_item_and_signs_nobody_in_through_the_reviewers_browser():
    console = Served(ConsoleSettings(reviewers=REVIEWERS), item(1), item(2, minutes_ago=3))
    target = console.server.url
    other = OtherSite(f"""<!doctype html><title>cute cats</title>
<img src="{target}item/rv-1"><img src="{target}next"><iframe src="{target}next"></iframe>
<form id="f" method="post" action="{target}login"><input name="token" value="t-bob"><input name="next" value="/"></form>
<script>setTimeout(function () {{ document.getElementById("f").submit(); }}, 500)</script>""")
    browser = chromium()
    try:
        browser.get(target)
        browser.find_element(By.ID, "token").send_keys("t-alice")
        browser.find_element(By.ID, "sign-in").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "reviewer"))

        browser.get(other.url)  # alice, signed in, visits another site
        WebDriverWait(browser, 10).until(lambda d: d.current_url.startswith(target))  # its form was posted
        assert browser.find_element(By.ID, "problem").text.startswith("This form was not sent from this console")
        time.sleep(0.5)
        assert console.app.leases.live() == 0  # the images and the frame took nothing in alice's name
        browser.get(target)
        assert browser.find_element(By.ID, "reviewer").text == "alice"  # still alice: the site did not sign in bob

        browser.get(target + "next")  # alice herself asks: the oldest item is hers
        assert browser.find_element(By.ID, "item").get_attribute("data-review-id") == "rv-2"
        assert console.app.leases.holder("rv-2").reviewer_id == "alice"
    finally:
        browser.quit()
        other.close()
        console.close()


def test_bidi_controls_reach_the_reviewers_screen_as_marked_text_in_reading_order():
    """"evil" written with U+202E (right-to-left override) would show reversed; the browser shows
    the control as a visible mark and the words in the order they were typed."""
    console = Served(ConsoleSettings(reviewers=REVIEWERS), item(1, content="I love this \u202eevil\u202c reversed"))
    browser = chromium()
    try:
        browser.get(console.server.url)
        browser.find_element(By.ID, "token").send_keys("t-alice")
        browser.find_element(By.ID, "sign-in").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.ID, "reviewer"))
        browser.get(console.server.url + "next")
        browser.find_element(By.TAG_NAME, "summary").click()  # a sensitive policy's content is shown on a click
        shown = browser.find_element(By.ID, "content").text  # the text as displayed, the controls as marks
        assert shown == "I love this [U+202E]evil[U+202C] reversed"
        assert "\u202e" not in browser.page_source
    finally:
        browser.quit()
        console.close()
