"""The demo page in a real browser: headless Debian Chromium driven by Playwright.

The server runs in this test's trio loop on 127.0.0.1, port 0; Playwright's sync API runs in a
worker thread. Needs /usr/bin/chromium (``.ci/run`` installs Debian's package when missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from agentcast.server._serve import serve
from agentcast.server._settings import ServerSettings

CHROMIUM = Path("/usr/bin/chromium")
#: The README's screenshot; refreshed only with AGENTCAST_UPDATE_SCREENSHOT=1 so runs stay clean.
README_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "demo.png"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
TYPES = "els => els.map(e => e.dataset.type)"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="Debian chromium is not installed (CI installs it and then always runs this test)",
)


def drive_page(url: str, screenshot: Path) -> dict[str, list[str]]:
    """Watch a run complete, cancel a second, drop the network during a third; report."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(url)
            page.wait_for_selector("#status.open", timeout=10_000)
            page.click("#send-button")
            page.wait_for_selector("li.agent_completed", timeout=20_000)
            completed = page.eval_on_selector_all("#events li", TYPES)
            page.screenshot(path=str(screenshot), full_page=True)
            page.fill("#message", "Please take your time")
            page.click("#send-button")
            # Cancel as soon as the run has started: at speed 0.4 the run takes ~6 s, and a slow
            # headless browser can take a second to settle a click.
            page.wait_for_selector("li.agent_started >> nth=1", timeout=20_000)
            page.click("#cancel")
            page.wait_for_selector("li.agent_cancelled", timeout=20_000)
            after = page.eval_on_selector_all("#events li", TYPES)
            seqs = page.eval_on_selector_all(
                "#events li[data-seq]", "els => els.map(e => Number(e.dataset.seq))"
            )
            # Lose the network mid-run; the page reconnects with since_seq and loses nothing.
            # The cancelled run may or may not have reached its tool call, so count from here.
            tools_before = len(page.query_selector_all("li.tool_executing"))
            page.fill("#message", "Resume me")
            page.click("#send-button")
            page.wait_for_selector(f"li.tool_executing >> nth={tools_before}", timeout=20_000)
            page.click("#drop")
            page.wait_for_selector("li.notice:has-text('resumed')", timeout=20_000)
            page.wait_for_selector("li.agent_completed >> nth=1", timeout=20_000)
            answer = page.inner_text("#answer")
        finally:
            browser.close()
    return {"completed": completed, "after": after, "seqs": [json.dumps(seqs)],
            "answer": [answer]}


async def test_the_demo_page_streams_cancels_and_resumes(tmp_path: Path) -> None:
    screenshot = tmp_path / "demo.png"
    settings = ServerSettings(port=0, demo=True, demo_speed=0.4)  # slower than life: a
    # loaded machine may take seconds to settle a click, and the cancel must land mid-run
    stop = trio.Event()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            result = await trio.to_thread.run_sync(drive_page, f"{running.url}/", screenshot)
            stop.set()
    completed = result["completed"]
    assert completed[0] == "agent_started"
    assert completed.index("agent_thinking") < completed.index("tool_executing")
    assert completed.index("tool_executing") < completed.index("tool_completed")
    assert completed[-1] == "agent_completed"
    second_run = result["after"][len(completed):]
    assert second_run[0] == "agent_started"
    assert second_run[-1] == "agent_cancelled"
    assert not set(second_run) & {"agent_completed", "agent_error"}
    seqs = json.loads(result["seqs"][0])
    assert seqs == sorted(seqs)
    assert len(seqs) == len(set(seqs))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("AGENTCAST_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.write_bytes(screenshot.read_bytes())
    assert result["answer"][0].startswith("I found 3 sources about 'Resume me'")
    assert result["answer"][0].rstrip().endswith("Result 1 about Resume me.")


def reload_page(url: str) -> dict[str, Any]:
    """Start a run, reload the page while its answer streams, watch the run finish."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(url)
            page.wait_for_selector("#status.open", timeout=10_000)
            page.fill("#message", "Reload me")
            page.click("#send-button")
            page.wait_for_function(
                "document.getElementById('answer').textContent.includes('I found')",
                timeout=30_000,
            )
            before = page.inner_text("#answer")
            page.reload()
            page.wait_for_selector("li.notice:has-text('reloaded mid-run')", timeout=20_000)
            page.wait_for_selector("li.agent_completed", timeout=30_000)
            types = page.eval_on_selector_all("#events li", TYPES)
            seqs = page.eval_on_selector_all(
                "#events li[data-seq]", "els => els.map(e => Number(e.dataset.seq))"
            )
            answer = page.inner_text("#answer")
        finally:
            browser.close()
    return {"before": before, "types": types, "seqs": seqs, "answer": answer}


async def test_a_reload_mid_answer_shows_the_whole_answer_so_far() -> None:
    # Slow enough that the answer is still streaming when the reloaded page reconnects.
    settings = ServerSettings(port=0, demo=True, demo_speed=0.15)
    stop = trio.Event()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            result = await trio.to_thread.run_sync(reload_page, f"{running.url}/")
            stop.set()
    # The reloaded page rebuilt the run from its agent_started, steps and tool call included.
    types = [t for t in result["types"] if t != "notice"]
    assert types[0] == "agent_started"
    assert types.index("agent_thinking") < types.index("tool_executing")
    assert types[-1] == "agent_completed"
    assert result["seqs"] == sorted(set(result["seqs"]))
    answer = result["answer"]
    assert answer.startswith(result["before"].strip())
    assert answer.startswith("I found 3 sources about 'Reload me'")
    assert answer.rstrip().endswith("Result 1 about Reload me.")
