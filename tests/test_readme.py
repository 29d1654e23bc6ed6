"""The README stays true: its commands are the ones CI runs, its example is the example file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(block for block in shell_blocks() if "pytest" in block)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_is_the_demo_server() -> None:
    # tests/test_server_process.py runs `agentcast serve --demo` and fetches its page.
    assert shell_blocks()[0].endswith(".venv/bin/agentcast serve --demo")


def test_readme_demo_command_runs_the_stream_demo() -> None:
    demo = next(block for block in shell_blocks() if "examples/" in block)
    assert "examples/stream_demo.py" in demo
    assert (ROOT / "examples" / "stream_demo.py").exists()


def test_readme_embedding_example_is_the_example_file() -> None:
    example = (ROOT / "examples" / "embed_server.py").read_text()
    body = example[example.index("import trio"):].strip()
    assert body in README
