"""The chat page in a real headless browser (Debian's chromium driven by playwright): send a message, watch the
reply stream in, stop a reply, start a new chat. Skipped when chromium or playwright is not installed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_serve_api import default_llm, slowed, start

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"), pytest.mark.slow,
              pytest.mark.timeout(180)]
# Offline and quiet: no sandbox (runs as root in CI), no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("LLAMA3_SCREENSHOTS", "/tmp/llama3-screenshots"))


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return default_llm()


@pytest.fixture(scope="module")
def server(llm):
    with start(llm, max_batch=4) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Anything not served by our server would be an external dependency: fail it, and remember it.
    outside = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
               else (outside.append(route.request.url), route.abort()))
    page.goto(server.url + "/")
    yield page
    context.close()
    assert errors == [] and outside == []


def test_chat_streams_a_reply(page, llm):
    sync_api.expect(page.locator("#model")).to_have_text(llm.name)
    page.click("#settings summary")
    page.fill("#system", "You answer in one short sentence.")
    page.locator("#system").dispatch_event("change")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "32")
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant")
    sync_api.expect(reply).to_have_count(1)
    sync_api.expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    expected = llm.chat([{"role": "system", "content": "You answer in one short sentence."},
                         {"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert reply.text_content() == expected and "Paris" in expected
    assert page.locator(".message.user").text_content() == "What is the capital of France?"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)
    # A second turn carries the first one as history.
    page.fill("#input", "And of Italy?")
    page.click("#send")
    sync_api.expect(page.locator(".message.assistant")).to_have_count(2)
    sync_api.expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    # New chat clears the conversation.
    page.click("#new-chat")
    sync_api.expect(page.locator(".message")).to_have_count(0)


def test_stop_button_cancels_the_reply(page, server, llm):
    engine = server.server.config.app.state.engine
    with slowed(engine, 0.05):
        page.click("#settings summary")
        page.fill("#max-tokens", "400")
        page.fill("#input", "tell me a long story")
        page.click("#send")
        streaming = page.locator(".message.assistant.streaming")
        sync_api.expect(streaming).not_to_have_text("")  # text is arriving
        assert engine.num_running == 1
        page.click("#stop")
        sync_api.expect(streaming).to_have_count(0)
        sync_api.expect(page.locator("#status")).to_have_text("Stopped.")
        deadline = time.monotonic() + 5
        while engine.num_running and time.monotonic() < deadline:  # the server cancelled the generation
            time.sleep(0.02)
        assert engine.num_running == 0
        assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
