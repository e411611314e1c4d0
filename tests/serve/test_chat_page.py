"""The chat page in a real headless Chromium: type a message, watch the reply stream in."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("ELMTUNE_ARTIFACTS", REPO_ROOT / "test-artifacts"))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_chat_page_streams_a_reply(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["base", "alpha", "beta"]
        page.select_option("#model", "base")
        page.fill("#max_tokens", "24")
        # record every change of the reply bubble, to see that it grows piece by piece (streaming)
        page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
            const out = document.querySelector('.msg.assistant'); if (out) window.seen.push(out.textContent);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
        # each decode step paced at 20 ms, so the page gets the tokens apart even when the whole reply would
        # otherwise be decoded before the browser renders once (a tiny model on a loaded machine)
        engine = server.state.engine
        step = engine._step
        engine._step = lambda batch: (time.sleep(0.02), step(batch))[-1]
        try:
            page.fill("#text", "say a b")
            page.press("#text", "Enter")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
        finally:
            del engine._step
        reply = page.text_content(".msg.assistant")
        seen = page.evaluate("window.seen")
        assert page.text_content(".msg.user") == "say a b"
        assert reply and len({s for s in seen if s}) >= 2, seen  # several partial states: it streamed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page.png"))
        browser.close()
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_chat_page_sends_the_system_message_and_the_whole_conversation(server):
    from tests.serve.conftest import submitted_prompts

    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p, submitted_prompts(server) as seen:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless=new", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "alpha")
        page.fill("#max_tokens", "6")
        page.fill("#system", "answer")
        for n, text in enumerate(["say a", "say b"], 1):
            page.fill("#text", text)
            page.press("#text", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant[data-state=done]').length === {n}")
        first = page.text_content(".msg.assistant")
        browser.close()
    assert first.strip() and "empty reply" not in first
    system = {"role": "system", "content": "answer"}
    conversation = [system, {"role": "user", "content": "say a"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "say b"}]
    prompter = server.state.prompters["alpha"]
    assert seen == [prompter.conversation(conversation[:2]).input_ids, prompter.conversation(conversation).input_ids]
