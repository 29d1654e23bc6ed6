"""``GET /favicon.ico`` and ``/favicon.svg`` (so no page logs a 404), and the demo page's own
promises that need no browser: it imports ``/client.js`` as a module and loads nothing from
another origin (the machine it runs on may have no network). Real sockets on 127.0.0.1, port 0.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib import resources

import pytest
import trio

from agentcast import Config
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings
from agentcast.server._static import FAVICON_TYPE, favicon

from .test_client_js import SECRET, get


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(lambda task_status: serve(
                ServerSettings(port=0, secret=SECRET, core=Config(shutdown_timeout=2.0)),
                stop=stop, task_status=task_status,
            ))
            yield running
            stop.set()


def test_the_favicon_is_a_packaged_svg() -> None:
    body, etag = favicon()
    assert body.startswith(b"<svg ")
    assert body.rstrip().endswith(b"</svg>")
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)


@pytest.mark.parametrize("path", ["/favicon.ico", "/favicon.svg"])
async def test_the_favicon_is_served_without_demo_mode(server: RunningServer, path: str) -> None:
    status, headers, body = await get(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == FAVICON_TYPE
    assert headers["etag"] == favicon()[1]
    assert headers["cache-control"].startswith("public, max-age=")
    assert body == favicon()[0]
    status, headers, body = await get(server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(favicon()[0]))


def test_the_demo_page_uses_the_served_client_and_no_other_origin() -> None:
    page = resources.files("agentcast.server").joinpath("demo.html").read_text()
    assert 'import { connect } from "/client.js";' in page
    assert '<script type="module">' in page
    assert 'href="/favicon.svg"' in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no CDN, no remote font
    assert "innerHTML" not in page  # data only ever through textContent
