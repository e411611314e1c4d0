"""The chat page in a real headless Chromium: type a message, watch the reply stream in."""

from __future__ import annotations

import os
import shutil
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
        page.fill("#text", "say a b")
        page.press("#text", "Enter")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
        reply = page.text_content(".msg.assistant")
        seen = page.evaluate("window.seen")
        assert page.text_content(".msg.user") == "say a b"
        assert reply and len({s for s in seen if s}) >= 2, seen  # several partial states: it streamed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page.png"))
        browser.close()
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 1000
