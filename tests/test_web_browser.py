"""The web chat in a real headless Chromium: load the page, send a message, watch the answer stream in.

Uses the system's Chromium (Debian: `apt-get install -y chromium fonts-wqy-microhei`, which `make test`'s set-up
runs when Chromium is missing and apt-get can) driven by Playwright's Python package; no browser is downloaded.
The screenshot goes to test-output/web.png (path printed). Where there is no Chromium, the same conversation
and the same checks go through Streamlit's own server protocol, the websocket the page's JavaScript speaks
(tests/streamlit_client.py); the second test runs that client everywhere, so both paths stay tested.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import REPO, free_port, running_server
from streamlit_client import last_chat_message_texts, streamlit_session

from minimind.infer import Engine
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT

pytestmark = pytest.mark.slow  # a Streamlit server and a browser start

CHROMIUM = os.environ.get("MINIMIND_CHROMIUM", "/usr/bin/chromium")
SEED = 1
SCREENSHOT = REPO / "test-output" / "web.png"

# Records the text of the last chat message each time the page changes, to prove the answer streamed in.
WATCH = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const messages = document.querySelectorAll('[data-testid="stChatMessage"]');
    if (messages.length >= 2) window.__seen.push(messages[messages.length - 1].innerText);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def expected_answer(model: Path):
    """The engine's own answer to "hello" with the page's default settings and SEED: what the page must show."""
    engine = Engine.from_pretrained(model)
    prompt = engine.chat_prompt([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                 {"role": "user", "content": "hello"}])
    expected = engine.completions([prompt], temperature=0.85, top_p=0.85, max_new_tokens=128, seed=SEED)[0]
    assert expected.completion_tokens > 32, "pick a seed with a longer answer"
    return expected


@pytest.fixture(scope="module")
def web(tmp_path_factory, model_dir):
    runs = tmp_path_factory.mktemp("web-runs")
    shutil.copytree(model_dir, runs / "chat")
    port = free_port()
    with running_server(["web", "--models-dir", str(runs), "--port", str(port), "--device", "cpu"],
                        f"http://127.0.0.1:{port}/_stcore/health"):
        yield f"http://127.0.0.1:{port}", runs / "chat"


def test_browser_sends_a_message_and_sees_a_streamed_answer(web):
    from playwright.sync_api import sync_playwright

    url, model = web
    expected = expected_answer(model)
    if not Path(CHROMIUM).is_file():
        print(f"\nno Chromium at {CHROMIUM} (make test installs it where apt-get can): the page is driven "
              "through Streamlit's server protocol instead")
        check_streamed_answer(*converse_over_protocol(url), expected)
        return

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            seed = page.get_by_label("Seed", exact=True)
            seed.wait_for(timeout=120_000)
            seed.fill(str(SEED))
            # Enter commits the value to the page's widget state, which every later rerun sends along (the chat
            # message's too), so nothing needs to wait for the seed's own rerun; the token count below shows
            # the seed was used
            seed.press("Enter")
            page.evaluate(WATCH)
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill("hello")
            box.press("Enter")
            caption = page.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stCaptionContainer")
            caption.wait_for(timeout=120_000)
            stats = caption.inner_text()
            seen = page.evaluate("window.__seen")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"\nweb UI screenshot: {SCREENSHOT}")
        finally:
            browser.close()

    assert f"{expected.completion_tokens} tokens" in stats and "tokens/s" in stats
    answers = [text for text in dict.fromkeys(seen) if "tokens/s" not in text and text.strip()]
    # streamed: the message was drawn part-written before its end. The page redraws at most every 50 ms by
    # design, so this needs the answer to take longer than that to write (over 32 tokens, checked above)
    assert len(answers) >= 2, f"the answer did not stream: {answers}"
    assert all(len(a) < len(answers[-1]) for a in answers[:-1]), answers


def converse_over_protocol(url: str) -> tuple[str, list[str]]:
    """Set the seed and send "hello" as the browser test does, over the page's websocket protocol;
    -> (the answer's stats caption, the last chat message's text after each redraw)."""
    with streamlit_session(url) as session:
        drawn = session.set_number(session.rerun(), "Seed", SEED)
        answer = session.send_chat(drawn, "hello")
    stats = [d.element.body for d in answer if d.kind == "markdown" and "tokens/s" in d.element.body]
    return stats[-1], last_chat_message_texts(answer)


def check_streamed_answer(stats: str, seen: list[str], expected) -> None:
    """The answer is the engine's for this seed and was drawn part-written before its end."""
    assert f"{expected.completion_tokens} tokens" in stats and "tokens/s" in stats
    answers = [text for text in dict.fromkeys(seen) if "tokens/s" not in text and text.strip()]
    assert len(answers) >= 2 and all(len(a) < len(answers[-1]) for a in answers[:-1]), answers
    assert answers[-1].strip() == expected.text.strip()


def test_streamlit_protocol_sends_a_message_and_sees_a_streamed_answer(web):
    url, model = web
    check_streamed_answer(*converse_over_protocol(url), expected_answer(model))
