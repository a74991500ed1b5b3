"""The README followed from a fresh clone: the documented commands, as written, work.

The test clones this repository (its committed HEAD) into a temporary folder and runs, in the clone,
what the README tells a new user to run:

- ``scripts/start`` (install into ``.venv``, then ``localchat serve``), here with ``--port 0``, a
  fresh test database (``--database-url``) and the data directory of the test suite's model cache
  (``--data-dir``), so the already prepared default model is reused;
- the client commands ``.venv/bin/localchat chat --prompt ...`` and a prompt piped on stdin;
- ``.venv/bin/localchat users list`` against the same database;
- Ctrl+C (SIGINT) ends the service with exit status 0.

A fresh install downloads torch-free dependencies for minutes, too slow for CI. So the clone's
``.venv`` is a real venv (``python -m venv --without-pip``) whose ``site-packages`` holds a ``.pth``
line naming this checkout's venv: pip, run by ``scripts/install`` exactly as on a fresh machine, finds
every dependency already satisfied and installs only the project itself, editable, from the clone
(with ``PIP_NO_BUILD_ISOLATION=0`` so that building it downloads nothing). The clone's
``.venv/bin/localchat`` is therefore the one its own ``pyproject.toml`` declares, running the clone's
code.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from service.engine.models.registry import PreparedModel
from tests.conftest import CACHE_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

_LISTENING = re.compile(rb"listening on http://[\d.]+:(\d+)/")
_STEP_TIMEOUT_S = 300.0
# What the README must say, word for word, for the steps this test runs.
_DOCUMENTED = (
    "scripts/start",
    ".venv/bin/localchat chat --prompt",
    ".venv/bin/localchat users list",
    "source .venv/bin/activate",
)


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "localchat"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    parent = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "_localchat_test_parent_venv.pth").write_text("\n".join(sorted(parent)) + "\n")
    return clone


def _env() -> dict[str, str]:
    drop = {"DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH", "LOCALCHAT_URL", "LOCALCHAT_TOKEN"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONUNBUFFERED="1", PIP_NO_BUILD_ISOLATION="0", PIP_NO_INDEX="1")
    return env


def _run(clone: Path, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        cwd=clone,
        env=_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_STEP_TIMEOUT_S,
        check=False,
    )


async def test_the_readme_commands_work_from_a_fresh_clone(
    tmp_path: Path, database_url: str, default_model: PreparedModel
) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for command in _DOCUMENTED:
        assert command in readme, f"the README no longer documents {command!r}"
    assert default_model.directory.is_relative_to(CACHE_DIR)
    clone = await asyncio.to_thread(_clone, tmp_path)

    service = await asyncio.create_subprocess_exec(
        "scripts/start",
        "--port",
        "0",
        "--threads",
        "2",
        "--database-url",
        database_url,
        "--data-dir",
        str(CACHE_DIR),
        cwd=clone,
        env=_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    assert service.stderr is not None
    log: list[bytes] = []
    try:
        while True:
            line = await asyncio.wait_for(service.stderr.readline(), _STEP_TIMEOUT_S)
            assert line, b"".join(log).decode(errors="replace")
            log.append(line)
            if match := _LISTENING.search(line):
                break
        url = f"ws://127.0.0.1:{int(match.group(1))}/ws"
        localchat = str(clone / ".venv" / "bin" / "localchat")
        installed = await asyncio.to_thread(Path(localchat).is_file)
        assert installed, "scripts/install did not install the localchat command"

        chat = await asyncio.to_thread(
            _run, clone, localchat, "chat", "--url", url, "--prompt", "Say hello.", "--max-tokens", "8"
        )
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip(), "the one-shot client printed no reply"

        piped = await asyncio.to_thread(
            _run, clone, localchat, "chat", "--url", url, "--max-tokens", "4", stdin="What is 2 + 2?"
        )
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout.strip()

        users = await asyncio.to_thread(
            _run, clone, localchat, "users", "list", "--database-url", database_url
        )
        assert users.returncode == 0, users.stderr
        assert "local" in users.stdout

        usage = await asyncio.to_thread(_run, clone, localchat, "--help")
        assert usage.returncode == 0
        assert all(name in usage.stdout for name in ("serve", "chat", "users", "models"))

        service.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(service.stderr.read(), _STEP_TIMEOUT_S)
        log.append(rest)
        assert await service.wait() == 0, b"".join(log).decode(errors="replace")
        assert b" stopped" in rest
    finally:
        if service.returncode is None:
            service.kill()
            await service.wait()
