"""The demo page in a real browser: headless Debian Chromium driven by Playwright.

The server runs in this test's trio loop on 127.0.0.1, port 0; Playwright's sync API runs in a
worker thread. Needs /usr/bin/chromium (``.ci/run`` installs Debian's package when missing).
Every test also fails on any failed request or 4xx/5xx answer (the favicon included).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agentcast.server._serve import serve
from agentcast.server._settings import ServerSettings

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parent.parent / "docs"
#: The README's screenshots; refreshed only with AGENTCAST_UPDATE_SCREENSHOT=1 so runs stay clean.
SCREENSHOTS = {"desktop": DOCS / "demo.png", "narrow": DOCS / "demo-narrow.png"}
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
DESKTOP = {"width": 1200, "height": 860}
NARROW = {"width": 360, "height": 740}
#: Playwright waits, ms: generous, a loaded 2-core machine settles a click slowly.
WAIT = 30_000
STEP_TYPES = "els => els.map(e => e.dataset.type)"
#: The (from_seq, seq) ranges the page applied, as its onEvent recorded them.
APPLIED = "() => window.agentcastDemo.applied"
RUN = "article.run"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="Debian chromium is not installed (CI installs it and then always runs this test)",
)


class Failures:
    """Failed requests and 4xx/5xx responses of every page of a context."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page: Any) -> Any:
        page.on("requestfailed", lambda r: self.seen.append(f"failed {r.url} {r.failure}"))
        def response(r: Any) -> None:
            if r.status >= 400:
                self.seen.append(f"{r.status} {r.url}")

        page.on("response", response)
        page.on("pageerror", lambda e: self.seen.append(f"page error {e}"))
        return page


@contextmanager
def browser_context() -> Iterator[tuple[Any, Failures]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser, Failures()
        finally:
            browser.close()


def open_page(browser: Any, failures: Failures, url: str, viewport: dict[str, int],
              context: Any = None) -> Any:
    ctx = context or browser.new_context(viewport=viewport)
    page = failures.watch(ctx.new_page())
    page.goto(url)
    page.wait_for_selector("#conn[data-state='open']", timeout=WAIT)
    return page


def ask(page: Any, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def covered(ranges: list[list[int]]) -> list[int]:
    """Every seq the applied events stand for (a compacted frame covers from_seq..seq)."""
    return [seq for first, last in ranges for seq in range(first, last + 1)]


def answer_of(page: Any, nth: int = 0) -> str:
    return str(page.inner_text(f"{RUN} >> nth={nth} >> .answer"))


async def drive(settings: ServerSettings, scenario: Callable[[str], dict[str, Any]],
                limit: float = 120) -> dict[str, Any]:
    """Run ``scenario(url)`` in a worker thread against a demo server in this trio loop."""
    stop = trio.Event()
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            try:
                result = await trio.to_thread.run_sync(scenario, f"{running.url}/")
            finally:
                stop.set()
    return result


def end_to_end(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        page = open_page(browser, failures, url, DESKTOP)
        ask(page, "What is structured concurrency?")
        page.wait_for_selector(f"{RUN}[data-status='completed']", timeout=WAIT)
        page.click(f"{RUN} details.timeline summary")  # collapsed when done: open it again
        shot = page.screenshot(full_page=True)
        result = {
            "user": page.inner_text(".msg.user"),
            "steps": page.eval_on_selector_all(f"{RUN} ol.steps > li", STEP_TYPES),
            "tool_args": page.inner_text(f"{RUN} li[data-type='tool_executing'] dl.kv"),
            "tool_result": page.inner_text(f"{RUN} li[data-type='tool_completed']"),
            "durations": page.eval_on_selector_all(
                f"{RUN} li[data-type='tool_completed'] .dur", "els => els.map(e => e.textContent)"),
            "bars": len(page.query_selector_all(f"{RUN} li[data-type='agent_thinking'] .bar")),
            "answer": answer_of(page),
            "pill": page.inner_text(f"{RUN} .pill"),
            "thread_title": page.inner_text("#threads li.current"),
            "events": int(page.inner_text("#stat-events")),
            "seq": int(page.inner_text("#stat-seq")),
            "epoch": page.inner_text("#stat-epoch"),
            "applied": page.evaluate(APPLIED),
            "favicon": page.evaluate(
                "fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])"),
            "html_in_answer": page.evaluate(f"document.querySelector('{RUN} .answer').innerHTML"),
            "paragraphs": page.evaluate(
                "window.agentcastDemo.paragraphs("
                "'One\\nline two\\n\\n<img src=x onerror=alert(1)>')"
                ".map(p => [p.tagName, p.textContent, p.children.length])"),
            "shot": shot,
            "failures": failures.seen,
        }
    return result


async def test_a_run_end_to_end_chat_and_timeline() -> None:
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=2.0), end_to_end)
    assert result["failures"] == []
    assert result["user"] == "What is structured concurrency?"
    steps = result["steps"]
    assert steps[0] == "agent_started"
    assert steps[-1] == "agent_completed"
    assert steps.index("agent_thinking") < steps.index("tool_executing")
    assert steps.index("tool_executing") < steps.index("tool_completed")
    assert None not in steps
    assert "agent_text" not in steps  # the answer is the chat bubble, not timeline noise
    assert result["bars"] == 4  # every thinking step shows its progress
    # Arguments and results as key/value lists, not a JSON dump.
    assert "query" in result["tool_args"]
    assert "limit" in result["tool_args"]
    assert "{" not in result["tool_args"]
    assert "{" not in result["tool_result"]
    assert "Result 1 about What is structured concurrency?" in result["tool_result"]
    assert result["durations"][0].endswith(" ms") or result["durations"][0].endswith(" s")
    assert result["answer"].startswith("I found 3 sources about 'What is structured concurrency?'")
    assert result["html_in_answer"].startswith("<p>I found")
    # Paragraphs kept, markup shown as text (textContent), never parsed.
    assert result["paragraphs"] == [
        ["P", "One\nline two", 0], ["P", "<img src=x onerror=alert(1)>", 0]]
    assert result["pill"] == "completed"
    assert result["thread_title"].startswith("What is structured")
    assert covered(result["applied"]) == list(range(1, result["seq"] + 1))
    assert result["events"] == len(result["applied"])
    assert result["epoch"] not in ("", "\N{EN DASH}")
    assert result["favicon"] == [200, "image/svg+xml"]
    assert result["shot"].startswith(b"\x89PNG")
    if os.environ.get("AGENTCAST_UPDATE_SCREENSHOT") == "1":
        SCREENSHOTS["desktop"].write_bytes(result["shot"])


def cancel_after_reload(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        page = open_page(browser, failures, url, DESKTOP)
        ask(page, "Please take your time")
        page.wait_for_selector(f"{RUN} li[data-type='agent_thinking']", timeout=WAIT)
        page.reload()
        page.wait_for_selector("#conn[data-state='open']", timeout=WAIT)
        page.wait_for_selector(f"{RUN}[data-status='running'] button.cancel", timeout=WAIT)
        user = page.inner_text(".msg.user")
        page.click(f"{RUN} button.cancel")
        page.wait_for_selector(f"{RUN}[data-status='cancelled']", timeout=WAIT)
        steps = page.eval_on_selector_all(f"{RUN} ol.steps > li", STEP_TYPES)
        return {"user": user, "steps": steps, "cancel_buttons": len(page.query_selector_all(
            "button.cancel")), "failures": failures.seen}


async def test_cancel_works_after_a_reload() -> None:
    # Slow: the reload and the click land while the agent is still thinking.
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=0.1), cancel_after_reload)
    assert result["failures"] == []
    assert result["user"] == "Please take your time"  # the question survives the reload
    assert result["steps"][0] == "agent_started"
    assert result["steps"][-1] == "agent_cancelled"
    assert "agent_completed" not in result["steps"]
    assert result["cancel_buttons"] == 0


def reload_mid_answer(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        page = open_page(browser, failures, url, DESKTOP)
        ask(page, "First question")
        page.wait_for_selector(f"{RUN}[data-status='completed']", timeout=WAIT)
        first = answer_of(page)
        ask(page, "Reload me")
        page.wait_for_function(
            "document.querySelectorAll('article.run')[1]?.querySelector('.answer')"
            "?.textContent.includes('sources about')", timeout=WAIT,
        )
        before = answer_of(page, 1)
        page.reload()
        page.wait_for_selector("#conn[data-state='open']", timeout=WAIT)
        page.wait_for_function(
            f"document.querySelectorAll('article.run')[1]?.textContent.length >= {len(before)}",
            timeout=WAIT,
        )
        after_reload = answer_of(page, 1)
        page.wait_for_selector(f"{RUN}[data-status='completed'] >> nth=1", timeout=WAIT)
        return {
            "first": first, "first_again": answer_of(page, 0), "before": before,
            "after_reload": after_reload, "answer": answer_of(page, 1),
            "users": page.eval_on_selector_all(".msg.user", "els => els.map(e => e.textContent)"),
            "steps": page.eval_on_selector_all(f"{RUN} >> nth=1 >> ol.steps > li", STEP_TYPES),
            "applied": page.evaluate(APPLIED), "seq": int(page.inner_text("#stat-seq")),
            "failures": failures.seen,
        }


async def test_a_reload_mid_answer_shows_the_whole_conversation_so_far() -> None:
    # Slow enough that the answer is still streaming when the reloaded page reconnects.
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=0.15), reload_mid_answer)
    assert result["failures"] == []
    assert result["users"] == ["First question", "Reload me"]
    assert result["first_again"] == result["first"]  # the finished run came back too
    assert result["after_reload"].startswith(result["before"].strip())
    assert result["answer"].startswith(result["before"].strip())
    assert result["answer"].startswith("I found 3 sources about 'Reload me'")
    assert result["answer"].rstrip().endswith("Result 1 about Reload me.")
    steps = result["steps"]
    assert steps[0] == "agent_started"
    assert steps[-1] == "agent_completed"
    assert "tool_executing" in steps
    assert "tool_completed" in steps
    # The reloaded page applied the whole stream once, no gap (compacted frames counted whole).
    assert covered(result["applied"]) == list(range(1, result["seq"] + 1))


def drop_and_resume(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        page = open_page(browser, failures, url, DESKTOP)
        # Every state the status badge shows, as the user would see it.
        page.evaluate("""() => { const conn = document.getElementById('conn');
            window.connStates = [];
            new MutationObserver(() => window.connStates.push(
                conn.dataset.state + ' ' + conn.textContent)).observe(
                conn, {childList: true, attributes: true}); }""")
        ask(page, "Resume me")
        page.wait_for_selector(f"{RUN} li[data-type='tool_executing']", timeout=WAIT)
        page.click("#drop")
        page.wait_for_selector("#resume-log li:has-text('resuming after')", timeout=WAIT)
        page.wait_for_selector("#resume-log li:has-text('nothing lost')", timeout=WAIT)
        page.wait_for_selector(f"{RUN}[data-status='completed']", timeout=WAIT)
        reconnects = int(page.inner_text("#stat-reconnects"))
        applied = page.evaluate(APPLIED)
        seq = int(page.inner_text("#stat-seq"))
        # The browser loses the network altogether: the badge says so, then recovers.
        page.context.set_offline(True)
        page.wait_for_selector("#conn[data-state='offline']", timeout=WAIT)
        offline = page.inner_text("#conn")
        page.context.set_offline(False)
        page.wait_for_selector("#conn[data-state='open']", timeout=WAIT)
        return {
            "offline": offline,
            "states": page.evaluate("window.connStates"), "log": page.inner_text("#resume-log"),
            "applied": applied, "seq": seq, "reconnects": reconnects,
            "steps": page.eval_on_selector_all(f"{RUN} ol.steps > li", STEP_TYPES),
            "answer": answer_of(page), "failures": failures.seen,
        }


async def test_a_dropped_connection_resumes_with_no_gap() -> None:
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=0.3), drop_and_resume)
    assert result["failures"] == []
    assert any(s.startswith("reconnecting reconnecting (4000)") for s in result["states"])
    assert result["states"][-1] == "open connected"
    assert result["reconnects"] == 1  # the drop, before the network went away
    resumed = re.search(r"resumed: #(\d+)(?:\.\.\d+)? follows #(\d+), nothing lost", result["log"])
    assert resumed is not None, result["log"]
    assert int(resumed[1]) == int(resumed[2]) + 1  # the first event after the drop is the next
    assert result["offline"].startswith("offline")
    assert covered(result["applied"]) == list(range(1, result["seq"] + 1))
    assert result["steps"].count("tool_completed") == 1
    assert result["answer"].startswith("I found 3 sources about 'Resume me'")
    assert result["answer"].rstrip().endswith("Result 1 about Resume me.")


def two_tabs(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        context = browser.new_context(viewport=DESKTOP)
        first = open_page(browser, failures, url, DESKTOP, context)
        second = open_page(browser, failures, url, DESKTOP, context)
        ask(first, "Seen in both tabs")
        for page in (first, second):
            page.wait_for_selector(f"{RUN}[data-status='completed']", timeout=WAIT)
        second.wait_for_function(
            "document.querySelector('.msg.user').textContent === 'Seen in both tabs'",
            timeout=WAIT,
        )
        ask(second, "Asked from the second")
        for page in (first, second):
            page.wait_for_selector(f"{RUN}[data-status='completed'] >> nth=1", timeout=WAIT)
        first.wait_for_function(
            "document.querySelectorAll('.msg.user')[1]?.textContent === 'Asked from the second'",
            timeout=WAIT,
        )
        seen = [{"users": p.eval_on_selector_all(".msg.user", "els => els.map(e => e.textContent)"),
                 "answers": [answer_of(p, 0), answer_of(p, 1)],
                 "steps": p.eval_on_selector_all("ol.steps > li", STEP_TYPES)}
                for p in (first, second)]
        return {"seen": seen, "failures": failures.seen}


async def test_two_tabs_on_one_thread_stay_in_sync() -> None:
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=1.0), two_tabs)
    assert result["failures"] == []
    first, second = result["seen"]
    assert first == second
    assert first["users"] == ["Seen in both tabs", "Asked from the second"]
    assert first["answers"][1].startswith("I found 3 sources about 'Asked from the second'")


def narrow(url: str) -> dict[str, Any]:
    with browser_context() as (browser, failures):
        page = open_page(browser, failures, url, NARROW)
        ask(page, "Fits on a phone?")
        page.wait_for_selector(f"{RUN}[data-status='completed']", timeout=WAIT)
        page.click(f"{RUN} details.timeline summary")
        boxes = {sel: page.locator(sel).bounding_box()
                 for sel in ("#send", "#message", "#drop", "#conn", RUN, "#stat-seq")}
        return {
            "scroll_width": page.evaluate("document.documentElement.scrollWidth"),
            "boxes": boxes, "answer": answer_of(page),
            "shot": page.screenshot(full_page=True), "failures": failures.seen,
        }


async def test_a_360px_viewport_is_usable() -> None:
    result = await drive(ServerSettings(port=0, demo=True, demo_speed=2.0), narrow)
    assert result["failures"] == []
    assert result["scroll_width"] <= NARROW["width"]  # nothing scrolls sideways
    for selector, box in result["boxes"].items():
        assert box is not None, selector
        assert box["x"] >= 0, selector
        assert box["x"] + box["width"] <= NARROW["width"] + 0.5, selector
        assert box["width"] > 0, selector
        assert box["height"] > 0, selector
    assert result["boxes"]["#send"]["width"] >= 44  # a tappable button
    assert result["answer"].startswith("I found 3 sources about 'Fits on a phone?'")
    if os.environ.get("AGENTCAST_UPDATE_SCREENSHOT") == "1":
        SCREENSHOTS["narrow"].write_bytes(result["shot"])
