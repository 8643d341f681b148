"""Issue 32: the chat page `serve` answers at GET /, driven in real headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run) through selenium, against `serve` on the embedded demo model."""
import base64
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cogvlm2_lite.demo.embedded import SAMPLE_IMAGE
from test_server import KEY, Server, image_message

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=(
    "no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
    ".ci/run does)"))
MAX_BODY_MB = 0.05          # the demo server's --max-body-mb: the sample fits, a 200 kB image gets 413
LAPTOP, PHONE = (1100, 760), (390, 844)


@pytest.fixture(scope="module")
def demo_server(demo_bundle):
    s = Server(demo_bundle, "--api-key", KEY, "--max-body-mb", MAX_BODY_MB)
    s.model = Path(demo_bundle).name
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
                "--force-color-profile=srgb", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})   # requests, console
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def sent_urls(driver) -> list[str]:
    """The URLs of the requests the page made since the last call (Chrome's DevTools Network events)."""
    events = (json.loads(e["message"])["message"] for e in driver.get_log("performance"))
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def only_own_origin(driver, server) -> list[str]:
    """The URLs the page requested since it was opened, checked to be all on its own server (or data: URLs),
    with no request elsewhere that the page's Content-Security-Policy had to block."""
    urls = sent_urls(driver)
    assert all(u.startswith(server.url + "/") or u.startswith("data:") for u in urls), urls
    blocked = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, blocked
    return urls


def open_page(driver, server, key=KEY):
    """The page, loaded fresh, with `key` already given in this tab (None: none kept)."""
    sent_urls(driver), driver.get_log("browser")   # the logs start here
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('cogvlm2-lite.api-key', "
                          "arguments[0]);", key)
    driver.refresh()
    wait(driver).until(lambda d: d.find_element("id", "model").text or d.find_element("id", "key-dialog").is_displayed())


def wait(driver, seconds=60, poll=0.05):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds, poll_frequency=poll)


def text_of(element) -> str:
    return element.parent.execute_script("return arguments[0].textContent", element)


def set_field(driver, field_id, value):
    field = driver.find_element("id", field_id)
    field.clear()
    field.send_keys(str(value))


def last_answer(driver):
    return driver.find_elements("css selector", "#messages .assistant")[-1]


def ask(driver, question):
    """Type the question, Enter; -> the answer's element once it has ended (done, stopped or error)."""
    from selenium.webdriver.common.keys import Keys
    before = len(driver.find_elements("css selector", "#messages .assistant"))
    driver.find_element("id", "prompt").send_keys(question, Keys.ENTER)
    wait(driver).until(lambda d: len(d.find_elements("css selector", "#messages .assistant")) > before)
    answer = last_answer(driver)
    wait(driver).until(lambda d: answer.get_attribute("data-state") in ("done", "stopped", "error"))
    return answer


def count_text_updates(driver):
    """From now on, record each text the last answer shows (to see it arrive in pieces)."""
    driver.execute_script("""
        window.shownTexts = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#messages .assistant .text');
            if (answers.length) window.shownTexts.push(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def api(server, messages, max_tokens, key=KEY, **fields):
    return server.post({"messages": messages, "max_tokens": max_tokens, **fields},
                       {"authorization": f"Bearer {key}"} if key else None)


def test_the_page_and_its_assets_are_served_with_their_types(demo_server):
    page = httpx.get(demo_server.url + "/")   # no key needed: the page asks for it
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(linked) == ["data:,", "ui/chat.css", "ui/chat.js"]
    for path, kind in (("ui/chat.js", "text/javascript; charset=utf-8"), ("ui/chat.css", "text/css; charset=utf-8")):
        r = httpx.get(f"{demo_server.url}/{path}")
        assert r.status_code == 200 and r.headers["content-type"] == kind and r.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in r.text and "https://" not in r.text
    assert httpx.get(demo_server.url + "/ui/missing.js").status_code == 404


def test_no_ui_serves_the_api_only(tiny_bundle_b4):
    s = Server(tiny_bundle_b4, "--no-ui")
    try:
        assert httpx.get(s.url + "/").status_code == 404
        assert httpx.get(s.url + "/ui/chat.js").status_code == 404
        assert httpx.get(s.url + "/v1/models").status_code == 200
    finally:
        assert s.stop() == 0


@needs_browser
def test_the_key_is_asked_once_per_tab(browser, demo_server):
    open_page(browser, demo_server, key=None)
    dialog = browser.find_element("id", "key-dialog")
    assert dialog.is_displayed() and not browser.find_element("id", "model").text
    browser.find_element("id", "key").send_keys("wrong", "\n")
    wrong = api(demo_server, [{"role": "user", "content": "hi"}], 1, key="wrong").json()["error"]["message"]
    wait(browser).until(lambda d: d.find_element("id", "key-why").text == wrong)   # the server's sentence, as written
    assert dialog.is_displayed()
    browser.find_element("id", "key").send_keys(KEY, "\n")
    wait(browser).until(lambda d: d.find_element("id", "model").text == demo_server.model)
    assert not dialog.is_displayed()
    browser.refresh()                              # kept in this tab: not asked again
    wait(browser).until(lambda d: d.find_element("id", "model").text == demo_server.model)
    assert not browser.find_element("id", "key-dialog").is_displayed()
    only_own_origin(browser, demo_server)


@needs_browser
def test_an_image_question_is_answered_as_the_api_answers_it(browser, demo_server, tmp_path):
    from selenium.webdriver.common.keys import Keys
    open_page(browser, demo_server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 48)
    browser.find_element("id", "file").send_keys(str(SAMPLE_IMAGE))
    wait(browser).until(lambda d: d.find_element("id", "thumb").is_displayed())
    assert browser.find_element("id", "thumb").get_attribute("src") == data_url(SAMPLE_IMAGE)
    count_text_updates(browser)
    answer = ask(browser, "Describe the image.")
    first = [image_message("Describe the image.", data_url(SAMPLE_IMAGE))]
    want = api(demo_server, first, 48, temperature=0).json()
    assert answer.get_attribute("data-state") == "done"
    assert text_of(answer.find_element("class name", "text")) == want["choices"][0]["message"]["content"]
    assert len(set(browser.execute_script("return window.shownTexts"))) > 2     # it arrived token by token
    n = want["usage"]["completion_tokens"]
    assert re.fullmatch(rf"{n} tokens · TTFT \d+ ms · \d+\.\d tokens/s", answer.find_element("class name", "stats").text)
    assert browser.find_element("id", "attach").get_attribute("disabled")   # one image per conversation
    assert not browser.find_element("id", "thumb").is_displayed()
    browser.save_screenshot(str(tmp_path / "chat-page.png"))
    browser.set_window_size(*PHONE)
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        browser.save_screenshot(str(tmp_path / "chat-page-phone.png"))
    finally:
        browser.set_window_size(*LAPTOP)
    print(f"screenshots: {tmp_path}")

    prompt = browser.find_element("id", "prompt")          # Shift+Enter is a new line, Enter sends
    prompt.send_keys("How many shapes", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "are there?")
    assert prompt.get_attribute("value") == "How many shapes\nare there?"
    second = ask(browser, "")
    history = first + [{"role": "assistant", "content": want["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "How many shapes\nare there?"}]
    want2 = api(demo_server, history, 48, temperature=0).json()["choices"][0]["message"]["content"]
    assert text_of(second.find_element("class name", "text")) == want2
    set_field(browser, "max-tokens", 2)                    # the third turn is cut where the page says
    third = ask(browser, "Describe the image.")
    history += [{"role": "assistant", "content": want2}, {"role": "user", "content": "Describe the image."}]
    want3 = api(demo_server, history, 2, temperature=0).json()
    assert want3["choices"][0]["finish_reason"] == "length"
    assert text_of(third.find_element("class name", "text")) == want3["choices"][0]["message"]["content"]
    assert third.find_element("class name", "stats").text.startswith("2 tokens")
    assert third.find_element("class name", "stats").text.endswith("· cut at max tokens")

    urls = only_own_origin(browser, demo_server)
    assert {demo_server.url + p for p in ("/", "/ui/chat.js", "/ui/chat.css", "/v1/models", "/v1/chat/completions")} <= set(urls)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(demo_server.url + "/") for u in resources), resources


@needs_browser
def test_server_errors_are_shown_as_written(browser, demo_server, tmp_path):
    open_page(browser, demo_server)
    set_field(browser, "temperature", 3)
    prompt = browser.find_element("id", "prompt")
    prompt.send_keys("What colour is the circle?\n")
    error = browser.find_element("id", "error")
    wait(browser).until(lambda d: error.is_displayed())
    said = api(demo_server, [{"role": "user", "content": "What colour is the circle?"}], 256, temperature=3)
    assert said.status_code == 400 and error.text == said.json()["error"]["message"]
    assert prompt.get_attribute("value") == "What colour is the circle?"    # taken back, to fix and send again
    assert not browser.find_elements("css selector", "#messages li")

    noise = tmp_path / "noise.png"                         # ~200 kB: over the server's --max-body-mb
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(noise)
    set_field(browser, "temperature", 0)
    browser.find_element("id", "file").send_keys(str(noise))
    wait(browser).until(lambda d: d.find_element("id", "thumb").is_displayed())
    prompt.send_keys("\n")
    limit = int(MAX_BODY_MB * (1 << 20))
    wait(browser).until(lambda d: "bytes" in error.text)
    size = int(re.search(r"\d+", error.text).group())
    assert error.text == f"the request body is {size} bytes, more than the {limit} allowed (--max-body-mb)." and size > limit
    assert browser.find_element("id", "thumb").is_displayed()    # the image is kept with the question
    only_own_origin(browser, demo_server)


@pytest.fixture(scope="module")
def tiny_server(tiny_bundle_b4):
    """The random tiny model: its greedy answers run to the end of its cache (a long answer to stop)."""
    s = Server(tiny_bundle_b4)
    yield s
    assert s.stop() == 0


@needs_browser
def test_stop_frees_the_row_and_the_next_turn_is_answered(browser, tiny_server):
    question, n = "tell me", 200
    full = api(tiny_server, [{"role": "user", "content": question}], n, temperature=0).json()
    assert full["usage"]["completion_tokens"] >= 40, full    # long enough to stop midway
    full = full["choices"][0]["message"]["content"]
    cancelled = tiny_server.metric("cogvlm2_requests_total", '{outcome="cancel"}')
    open_page(browser, tiny_server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", n)
    browser.find_element("id", "prompt").send_keys(question, "\n")
    wait(browser, poll=0.005).until(lambda d: d.find_elements("css selector", "#messages .assistant .text")
                                    and text_of(last_answer(d).find_element("class name", "text")))
    browser.find_element("id", "stop").click()
    answer = last_answer(browser)
    wait(browser).until(lambda d: answer.get_attribute("data-state") == "stopped")
    assert answer.find_element("class name", "stats").text.endswith("· stopped")
    assert browser.find_element("id", "send").is_displayed() and not browser.find_element("id", "stop").is_displayed()
    wait(browser, 20, 0.1).until(lambda d: tiny_server.metric("cogvlm2_requests_total", '{outcome="cancel"}') > cancelled,
                                 "the server cancelled no request: did the answer end before Stop was clicked?")
    assert tiny_server.metric("cogvlm2_rows_in_use") == 0
    partial = text_of(answer.find_element("class name", "text"))
    assert partial and full.startswith(partial) and len(partial) < len(full)

    second = ask(browser, "and then?")
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": partial},
               {"role": "user", "content": "and then?"}]
    want = api(tiny_server, history, n, temperature=0).json()["choices"][0]["message"]["content"]
    assert second.get_attribute("data-state") == "done" and text_of(second.find_element("class name", "text")) == want
    only_own_origin(browser, tiny_server)
