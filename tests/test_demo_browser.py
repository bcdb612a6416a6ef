"""`scalevae demo` in a real browser: the command starts the server on a free loopback port with tests/demo_model.py's
tiny model; headless Chromium (Debian's package, driven by Selenium through /usr/bin/chromedriver) opens the page,
types two sentences, runs Interpolate and Edit, reads the texts from the page and compares them with `LatentText`'s for
the same inputs, and screenshots every tab (into SCALEVAE_DEMO_SCREENSHOTS when set: docs/demo.md's pictures). The
test fails if the page shows an error toast, and checks that it would: an empty sentence must show one.

Slow (a server and a browser start): `python -m pytest -m slow tests/test_demo_browser.py`. Without Chromium or
Selenium it skips, unless SCALEVAE_REQUIRE_BROWSER is set (CI sets it after installing them): then it fails."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scalevae import LatentText
from scalevae.demo import GREEDY, Limits, class_direction
from tests.data_guard import shared_file
from tests.demo_model import build_demo_folder, short_reviews

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium's own connections (updates, sync, field trials) are refused on these machines and stall the page without
# the background-networking flags.
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1100,1250"
).split()
STARTUP_SECONDS, ANSWER_SECONDS = 180, 60
DECODING = dict(GREEDY, max_new_tokens=Limits().max_new_tokens)


def browser_or_skip():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("SCALEVAE_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], cwd: Path, log_path: Path, port: int):
    """A demo server process, until it answers on 127.0.0.1:`port` (its URL is yielded); stopped on exit."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_SERVER_PORT=str(port))
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the demo server exited ({process.returncode}): {log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the demo server did not answer within {STARTUP_SECONDS} s")
                time.sleep(1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def yelp():
    return shared_file("yelp_sentiment.train.txt"), shared_file("yelp_sentiment.train.label")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, yelp):
    pytest.importorskip("gradio")
    return build_demo_folder(tmp_path_factory.mktemp("demo") / "model", *yelp)


@pytest.fixture(scope="module")
def served(tmp_path_factory, folder, yelp):
    """(url, folder, the reviews): the demo command serving the tiny model, stopped after the module."""
    browser_or_skip()
    port = free_port()
    command = [sys.executable, "-m", "scalevae.cli", "demo", str(folder), "--port", str(port)]
    command += ["--sentences", str(yelp[0]), "--labels", str(yelp[1]), "--max_sentences", "400"]
    with server(command, REPO, tmp_path_factory.mktemp("server") / "server.log", port) as url:
        yield url, folder, short_reviews(*yelp)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The demo page in the browser, by the elem_ids scalevae.demo gives its widgets."""

    def __init__(self, driver, screenshots: Path):
        from selenium.webdriver.common.by import By

        self.driver, self.by, self.screenshots = driver, By, screenshots

    def tab(self, name: str):
        buttons = [b for b in self.driver.find_elements(self.by.CSS_SELECTOR, "button[role=tab]") if b.text == name]
        assert buttons, f"no tab {name!r} on the page"
        buttons[0].click()
        time.sleep(0.5)

    def wait_for(self, elem_id: str):
        """Wait until the page's script has drawn the widget."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, ANSWER_SECONDS).until(
            lambda _: self.driver.find_elements(self.by.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
        )

    def field(self, elem_id: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")

    def type(self, elem_id: str, text: str):
        box = self.field(elem_id)
        box.clear()
        box.send_keys(text)

    def run(self, elem_id: str, output_id: str | None = None) -> str:
        """Click a button; with `output_id`, wait for that text box to change and return its text."""
        from selenium.webdriver.support.ui import WebDriverWait

        before = self.field(output_id).get_attribute("value") if output_id else None
        self.driver.find_element(self.by.ID, elem_id).click()
        if output_id is None:
            time.sleep(2)
            return ""
        WebDriverWait(self.driver, ANSWER_SECONDS).until(
            lambda _: self.errors() or self.field(output_id).get_attribute("value") not in ("", before)
        )
        assert not self.errors(), f"the page shows an error: {self.errors()}"
        return self.field(output_id).get_attribute("value")

    def errors(self) -> list[str]:
        toasts = self.driver.find_elements(self.by.CSS_SELECTOR, ".toast-body.error")
        return [toast.text for toast in toasts if toast.is_displayed()]

    def shoot(self, name: str) -> Path:
        path = self.screenshots / f"demo_{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def test_interpolate_and_edit_in_a_browser_match_latent_text(served, browser, tmp_path):
    url, folder, (texts, labels) = served
    screenshots = Path(os.environ.get("SCALEVAE_DEMO_SCREENSHOTS") or tmp_path)
    screenshots.mkdir(parents=True, exist_ok=True)
    text = LatentText.from_pretrained(folder)
    negative = [t for t, y in zip(texts, labels) if y == "0"]
    a, b = negative[0], next(t for t, y in zip(texts, labels) if y == "1")
    browser.get(url)
    page = Page(browser, screenshots)
    page.wait_for("reconstruct-input")

    page.type("reconstruct-input", a)
    assert page.run("reconstruct-run", "reconstruct-output") == text.reconstruct([a], **DECODING)[0]
    page.shoot("reconstruct")

    page.tab("Interpolate")
    page.type("interpolate-a", a)
    page.type("interpolate-b", b)
    shown = page.run("interpolate-run", "interpolate-output").split("\n")
    assert shown == text.interpolate(a, b, steps=5, **DECODING)
    time.sleep(1)  # the path's plot draws after the texts
    page.shoot("interpolate")

    page.tab("Edit")
    page.type("edit-input", negative[1])
    edited = page.run("edit-run", "edit-output")  # default: towards class "1", strength 1
    direction = class_direction(text.classes, "0", "1")
    assert edited == text.edit([negative[1]], direction, 1.0, **DECODING)[0]
    page.shoot("edit")

    page.tab("Sample")
    page.run("sample-run")
    assert not page.errors(), page.errors()
    page.shoot("sample")

    page.tab("Map")
    page.type("map-typed", f"{a}\n{b}")
    page.run("map-run")
    assert not page.errors(), page.errors()
    map_shot = page.shoot("map")
    assert map_shot.stat().st_size > 10_000

    # The error check above can fail: an empty sentence shows the handler's message on the page.
    page.tab("Reconstruct")
    page.type("reconstruct-input", " ")
    page.driver.find_element(page.by.ID, "reconstruct-run").click()
    time.sleep(3)
    assert any("sentence is empty" in error for error in page.errors()), page.errors()


def test_the_server_hands_out_no_file(served, yelp):
    """Gradio's file route serves only what the page itself produced: not a system file, not the sentence files, not
    the model folder's weights."""
    url, folder, _ = served
    for path in ("/etc/passwd", str(yelp[0]), str(folder / "model.safetensors"), str(REPO / "setup.py")):
        for route in ("gradio_api/file=", "file="):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{url}{route}{path}", timeout=30)
            assert refused.value.code in (403, 404), (route, path, refused.value.code)


def test_a_folder_saved_as_a_space_serves_the_page_from_its_app(folder, yelp, tmp_path):
    """`save_model(space=True)`'s folder runs as it is: `python app.py` inside it serves the page (on the port a Space
    gives it in GRADIO_SERVER_PORT), whose answers are LatentText's."""
    from gradio_client import Client

    from scalevae.hub import save_model

    text = LatentText.from_pretrained(folder)
    space = save_model(tmp_path / "space", text.model, text.encoder_tokenizer, text.decoder_tokenizer, space=True)
    port = free_port()
    with server([sys.executable, "app.py"], space, tmp_path / "space.log", port) as url:
        client = Client(url, verbose=False)
        review = short_reviews(*yelp)[0][0]
        assert client.predict(review, api_name="/reconstruct")[0] == text.reconstruct([review], **DECODING)[0]
