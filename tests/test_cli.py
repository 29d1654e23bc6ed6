"""``agentcast serve`` as an operator meets it: every mistake is one line on stderr and exit
status 2, the ``listening`` line comes first on stdout, and ``--help`` says every default.

Process tests run ``python -m agentcast`` for real; each is bounded (``timeout=`` or
``fail_after``) and stops the server it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from agentcast.server._cli import main

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ADMIN = "an-admin-token-that-is-at-least-32-bytes-long"
COMMAND = [sys.executable, "-m", "agentcast"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCAST_")}
    return {**env, **extra}


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, env=clean_env(**env), timeout=60,
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


SERVE = ["serve", "--secret", SECRET]


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--port", "99999"], {}, "--port (or AGENTCAST_PORT) must be an integer between 0 and "
                                  "65535, got '99999'"),
        (["--port", "-1"], {}, "between 0 and 65535, got '-1'"),
        (["--port", "http"], {}, "--port (or AGENTCAST_PORT) must be an integer"),
        ([], {"AGENTCAST_PORT": "eighty"}, "got 'eighty'"),
        ([], {"AGENTCAST_MAX_CONNECTIONS_PER_USER": "ten"},
         "--max-connections-per-user (or AGENTCAST_MAX_CONNECTIONS_PER_USER) must be an integer"),
        ([], {"AGENTCAST_DEMO_SPEED": "fast"}, "--demo-speed (or AGENTCAST_DEMO_SPEED) must be "
                                               "a number"),
        ([], {"AGENTCAST_WORKERS": "0"}, "--workers (or AGENTCAST_WORKERS) must be an integer "
                                         "of at least 1, got '0'"),
        (["--log-level", "LOUD"], {}, "--log-level (or AGENTCAST_LOG_LEVEL) must be one of"),
        ([], {"AGENTCAST_LOG_LEVEL": "verbose"}, "got 'verbose'"),
        (["--host", "no-such-host.invalid", "--port", "0"], {}, "cannot listen on "
                                                                "no-such-host.invalid:0"),
        (["--admin-token", "short"], {}, "at least 32 bytes"),
    ],
)
def test_a_mistake_is_one_line_on_stderr_and_exit_status_2(
    args: list[str], env: dict[str, str], says: str
) -> None:
    done = run([*SERVE, *args], **env)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("agentcast serve: ")
    assert says in lines[0]
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line_and_exit_status_2(busy_port: int) -> None:
    done = run([*SERVE, "--port", str(busy_port)])
    assert done.returncode == 2
    assert done.stderr == (
        f"agentcast serve: cannot listen on 127.0.0.1:{busy_port}: Address already in use\n"
    )
    assert done.stdout == ""


def test_a_port_in_use_with_workers_is_the_workers_line_and_exit_status_2(
    busy_port: int,
) -> None:
    # No Redis listens on port 1: the workers start not-ready and then fail to listen.
    done = run([*SERVE, "--port", str(busy_port), "--workers", "2",
                "--redis-url", "redis://127.0.0.1:1/0"])
    assert done.returncode == 2
    assert done.stdout == ""
    # Both workers write to the same stderr at once, so their lines may interleave.
    reason = f"cannot listen on 127.0.0.1:{busy_port}: Address already in use"
    assert reason in done.stderr
    assert "failed to start" not in done.stderr  # the parent adds no line of its own
    assert "Traceback" not in done.stderr


async def test_the_listening_line_is_first_on_stdout_whatever_is_logged_before() -> None:
    # Nothing listens on port 1: the Redis broker logs its failed first connection before the
    # server reports started, so something is on stderr before the listening line.
    env = clean_env(AGENTCAST_LOG_LEVEL="DEBUG", AGENTCAST_ADMIN_TOKEN=ADMIN,
                    AGENTCAST_REDIS_URL="redis://:hunter2-password@127.0.0.1:1/0")
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [*COMMAND, "serve", "--demo", "--port", "0"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            output = b""
            while output.count(b"\n") < 4:  # listening, demo page, demo token, admin token
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the server exited early: {output!r}"
                output += chunk
            lines = output.decode().splitlines()
            assert lines[0].startswith("agentcast listening on http://127.0.0.1:")
            assert f"admin token: {ADMIN}" in lines
            process.send_signal(signal.SIGTERM)
            errors = b""
            while chunk := await process.stderr.receive_some(65536):
                errors += chunk
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert b"redis unavailable" in errors or b"Redis backplane" in errors  # logs: stderr only
    assert b"hunter2" not in errors + output


@pytest.mark.parametrize("command", [[], ["serve"], ["token"]])
def test_help_has_no_rest_markup_a_default_for_every_option_and_no_secret(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTCAST_SECRET", SECRET)
    monkeypatch.setenv("AGENTCAST_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("AGENTCAST_REDIS_URL", "redis://:hunter2-password@127.0.0.1:6379/0")
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text
    for credential in (SECRET, ADMIN, "hunter2-password"):
        assert credential not in text
    if command:
        options = text.split("options:", 1)[1]
        # One entry per option (argparse indents the flags by two spaces), -h aside.
        entries = [e for e in options.split("\n  -") if e.strip() and not e.startswith("h,")]
        assert entries
        for entry in entries:
            assert "default" in entry or "(required)" in entry, entry
