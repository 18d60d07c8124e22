"""The chat page in a real headless browser (Debian's chromium driven by playwright): send a message, watch the
reply stream in with its end kept above the composer, stop a reply, keep the conversation across a reload, start a
new chat, render Markdown safely; screenshots at phone and desktop widths. Skipped when chromium or playwright is
not installed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from test_serve_api import slowed, start

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"), pytest.mark.slow,
              pytest.mark.timeout(180)]
# Offline and quiet: no sandbox (runs as root in CI), no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("LLAMA3_SCREENSHOTS", "/tmp/llama3-screenshots"))
PHONE, DESKTOP = {"width": 390, "height": 700}, {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


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


def open_page(browser, server, viewport):
    """A fresh browser context (empty local storage) on the page; yields it, then checks it stayed clean."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))  # a 404 (favicon!) logs one
    page.on("response", lambda r: r.status >= 400 and errors.append(f"{r.status} {r.url}"))
    # Anything not served by our server would be an external dependency: fail it, and remember it.
    outside = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
               else (outside.append(route.request.url), route.abort()))
    page.goto(server.url + "/")
    yield page
    context.close()
    assert errors == [] and outside == []


@pytest.fixture
def page(browser, server):
    yield from open_page(browser, server, {"width": 1000, "height": 800})


def in_view(page, selector: str) -> bool:
    """The element's bottom is inside the window and not under the sticky composer (unless it is in it)."""
    return page.evaluate("""(sel) => {
        const r = document.querySelector(sel).getBoundingClientRect();
        const dock = document.querySelector('#dock');
        const limit = dock.contains(document.querySelector(sel)) ? innerHeight : dock.getBoundingClientRect().top;
        return r.bottom <= limit + 1 && r.bottom > 0;
    }""", selector)


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
    assert "Paris" in expected and reply.text_content() == page.evaluate(
        "(t) => { const d = document.createElement('div'); d.append(renderMarkdown(t)); return d.textContent; }",
        expected)
    assert page.locator(".message.user").text_content() == "What is the capital of France?"
    stored = page.evaluate("JSON.parse(localStorage.getItem('llama3.conversation'))")
    assert stored == [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": expected}]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)
    # A reload keeps the conversation.
    page.reload()
    sync_api.expect(page.locator(".message.assistant")).to_have_text(reply.text_content())
    sync_api.expect(page.locator(".message.user")).to_have_text("What is the capital of France?")
    # A second turn carries the first one as history.
    page.fill("#input", "And of Italy?")
    page.click("#send")
    sync_api.expect(page.locator(".message.assistant")).to_have_count(2)
    sync_api.expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    # New chat clears the conversation, for good.
    page.click("#new-chat")
    sync_api.expect(page.locator(".message")).to_have_count(0)
    page.reload()
    sync_api.expect(page.locator(".empty")).to_have_count(1)
    sync_api.expect(page.locator(".message")).to_have_count(0)
    assert page.request.get(server_url(page) + "/favicon.ico").status == 200


def server_url(page) -> str:
    return page.url.rstrip("/")


def test_streaming_keeps_the_end_above_the_composer_until_the_user_scrolls_up(browser, server):
    engine = server.server.config.app.state.engine
    for page in open_page(browser, server, PHONE):
        with slowed(engine, 0.03):
            page.click("#settings summary")
            page.fill("#max-tokens", "300")
            page.click("#settings summary")
            page.fill("#input", "Tell me a long story about a lighthouse keeper.")
            page.click("#send")
            streaming = ".message.assistant.streaming"
            page.wait_for_function("document.documentElement.scrollHeight > innerHeight + 200", timeout=90_000)
            for _ in range(5):  # the page follows the text as it grows
                assert page.locator(streaming).count() == 1 and in_view(page, streaming)
                page.wait_for_timeout(300)
            page.mouse.wheel(0, -600)  # the user scrolls up to read: the page stops following
            page.wait_for_timeout(300)
            top = page.evaluate("scrollY")
            page.wait_for_timeout(1500)
            assert page.evaluate("scrollY") == top and not in_view(page, streaming)
            page.mouse.wheel(0, 100_000)  # back at the bottom: following again
            page.wait_for_timeout(1500)
            assert in_view(page, streaming)
            page.click("#stop")
            sync_api.expect(page.locator("#status")).to_have_text("Stopped.")
            assert in_view(page, "#status")


def send_greedy(page, text: str, max_tokens: int) -> None:
    """Set greedy sampling and a token limit in Settings, then send `text`."""
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.click("#settings summary")
    page.fill("#input", text)
    page.click("#send")


def test_status_line_is_visible_after_a_long_reply(browser, server, llm):
    for page in open_page(browser, server, PHONE):
        send_greedy(page, "Write a poem about the sea.", max_tokens=120)
        sync_api.expect(page.locator("#status")).to_have_text("Stopped at the token limit.", timeout=120_000)
        assert in_view(page, "#status") and in_view(page, ".message.assistant")


MARKDOWN = """# Plan
Some **bold**, *italic* and `code`, a [link](https://example.com/x) and [no link](javascript:alert(1)).

1. first
2. second
   continued

- a
- b <img src=x onerror="window.pwned=1">

> quoted

```python
print("<script>window.pwned=1</script>")
```
<b>not bold</b><script>window.pwned=1</script>"""


def test_markdown_is_rendered_as_elements_never_as_html(page):
    html = page.evaluate("""(text) => {
        const d = document.createElement('div');
        d.append(renderMarkdown(text));
        document.body.append(d);
        return {tags: [...d.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                code: d.querySelector('pre code').textContent, lang: d.querySelector('pre code').dataset.language,
                links: [...d.querySelectorAll('a')].map(a => a.href), items: d.querySelectorAll('li').length,
                text: d.textContent};
    }""", MARKDOWN)
    assert html["tags"] == ["h3", "p", "strong", "em", "code", "a", "ol", "li", "li", "ul", "li", "li", "blockquote",
                            "pre", "code", "p"]
    assert html["code"] == 'print("<script>window.pwned=1</script>")' and html["lang"] == "python"
    assert html["links"] == ["https://example.com/x"]  # a javascript: URL stays text
    assert '<img src=x onerror="window.pwned=1">' in html["text"] and "<b>not bold</b>" in html["text"]
    assert page.evaluate("window.pwned") is None


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_screenshots_at_phone_and_desktop_widths(browser, server, llm, viewport):
    for page in open_page(browser, server, viewport):
        send_greedy(page, "Write a Python function that reverses a string, with a short explanation.", max_tokens=160)
        sync_api.expect(page.locator(".message.assistant.streaming")).to_have_count(0, timeout=120_000)
        assert page.locator(".message.assistant pre code").count() >= 1  # the model's code block, rendered
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")  # nothing wider than a phone
        assert in_view(page, "#status") and in_view(page, "#input")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"chat-{'phone' if viewport is PHONE else 'desktop'}.png"))


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
