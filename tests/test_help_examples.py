"""Every example in the ``--help`` texts runs as written.

The examples under ``Example:`` in every command's ``--help`` run with ``capi`` on the PATH
and ``CAPI_*`` pointing at a Redis of their own and a sandbox, with what an operator would
have: a dead letter ``order-1042`` (missing scope), a delivered event, and a worker serving
metrics (for ``capi health``). The ports they name are mapped to free ones
(:class:`tests.docrun.Ports`). A long-running command (a worker, the sandbox, the intake,
``capi tail --follow``) is started, must become ready, keeps running while the rest of its
block runs, then must stop cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import redis
from click.testing import CliRunner

from capi import deadletters
from capi.events import prepare, purchase
from capi.failures import Reason
from capi.guidance import diagnose
from capi.producer import SyncProducer
from capi.queue import Entry
from capi.sandbox import SandboxThread
from capi.sandbox.monitoring import DEFAULT_ADVERTISER_KEY
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from tests import docrun
from tests.helpers import wait_for
from tests.redisproc import RedisProcess
from workers.cli import cli

ROOT = docrun.ROOT

HELP_NOT_RUN = {  # lines of help examples not run here, and why
    "capi verify --destination brand-a --json": "no brand-a here: tests/test_verify.py",
}
LONG_RUNNING = {  # command prefix in a help text -> what it prints once ready
    "capi tail --follow": "",  # new outcomes only: nothing to wait for
    "capi worker": "sender starting",
    "arq workers.main.WorkerSettings": "sender starting",
    "capi sandbox": "capi sandbox on",
    "capi serve": "capi serve on",
    "capi console --": "capi console on",
}


@dataclass(frozen=True)
class Example:
    """The example lines of one command's ``--help``."""

    where: str
    lines: tuple[str, ...]


def _joined(raw: list[str]) -> list[str]:
    """Lines with backslash continuations joined, blank lines dropped."""
    lines: list[str] = []
    pending = ""
    for line in raw:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            lines.append((pending + line).strip())
        pending = ""
    return lines


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def help_examples() -> list[Example]:
    examples = []
    for path in _commands(cli):
        text = CliRunner().invoke(cli, [*path, "--help"], terminal_width=200).output
        raw: list[str] = []
        taking = False
        for line in text.splitlines():
            if re.match(r"^\s*Examples?\b.*:\s*$", line):
                taking = True
            elif taking and line.startswith("    "):
                raw.append(line)
            elif taking and line.strip():
                taking = False
        if raw:
            examples.append(Example("capi " + " ".join(path) + " --help", tuple(_joined(raw))))
    return examples


EXAMPLES = help_examples()


def test_every_command_has_help_examples() -> None:
    where = {e.where for e in EXAMPLES}
    assert "capi enqueue --help" in where and "capi dead-letters list --help" in where
    assert len(EXAMPLES) == len(_commands(cli))


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], docrun.Ports]]:
    """A Redis of their own (no other test flushes it), a sandbox (also the Advertiser
    API's event monitoring), a worker serving metrics and one event it delivered, for every
    help example."""
    ports = docrun.Ports()
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server, SandboxThread() as sandbox:
        env = docrun.fresh_env()
        env.update(
            CAPI_API_KEY=DEFAULT_KEY,
            CAPI_PIXEL_ID=DEFAULT_PIXEL,
            CAPI_BASE_URL=sandbox.url,
            CAPI_REDIS_URL=server.url,
            CAPI_RETRY_BASE_S="0.05",
            CAPI_RETRY_CAP_S="0.5",
            CAPI_PROBE_CONFIRMATIONS="1",
            CAPI_ADVERTISER_KEY=DEFAULT_ADVERTISER_KEY,
            CAPI_ADS_API_BASE_URL=sandbox.url,
            CAPI_CONSOLE_TOKENS_SHA256="viewer:" + "0" * 64,  # a token for capi console
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        )
        metrics = ports.port(9464)
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--metrics-port", str(metrics)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path_factory.mktemp("worker"),
        )
        try:
            wait_for(lambda: _ready(f"http://127.0.0.1:{metrics}/readyz"), what="worker")
            settings = Settings(_env_file=None, redis_url=server.url)
            with SyncProducer.from_settings(settings) as producer:
                producer.enqueue(
                    purchase(
                        "order-1041",
                        amount=4200,
                        currency="USD",
                        email="ada@example.com",
                        source_url="https://shop.example/thanks",
                    )
                )
            wait_for(lambda: "order-1041" in sandbox.state.delivered_ids(), what="a delivery")
            yield env, ports
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.communicate(timeout=30)
            finally:
                worker.kill()
                worker.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def seed_dead_letter(redis_url: str, event_id: str = "order-1042") -> None:
    """A dead letter as a worker leaves it when the key lacks its scope."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    event = prepare(
        purchase(event_id, amount=12999, currency="USD", source_url="https://shop.example/t")
    )
    now = int(time.time() * 1000)
    entry = Entry(b"0-1", event.json, event.id, event.timestamp_ms)
    record = deadletters.build(
        entry,
        reason=Reason.MISSING_SCOPE,
        guidance=diagnose(Reason.MISSING_SCOPE).text,
        error=None,
        key_fingerprint="…0001 (sha256:00000000)",
        pixel_id=DEFAULT_PIXEL,
        now_ms=now,
        attempted=True,
    )
    client = redis.Redis.from_url(redis_url)
    client.hset(settings.keys.deadletters, record.key, record.to_json())
    client.zadd(settings.keys.deadletter_index, {record.key: now})
    client.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "capi.env.example", tmp_path / "config" / "capi.env.example")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_help_example_runs_as_written(
    example: Example, services: tuple[dict[str, str], docrun.Ports], workdir: Path
) -> None:
    env, ports = services
    seed_dead_letter(env["CAPI_REDIS_URL"])
    lines = [ports.mapped(line) for line in example.lines if line not in HELP_NOT_RUN]
    _run_help_block(example, lines, env, workdir)


def _run_help_block(example: Example, lines: list[str], env: dict[str, str], cwd: Path) -> None:
    """Consecutive lines as one bash script (so ``export`` carries), each long-running
    command in the background until the block ends."""
    background: list[docrun.Background] = []
    script: list[str] = []
    try:
        for line in [*lines, ""]:
            ready = next((text for cmd, text in LONG_RUNNING.items() if line.startswith(cmd)), None)
            if line and not (ready is not None and "--burst" not in line):
                script.append(line)
                continue
            if script:
                _run_script(example, script, env, cwd)
                script = []
            if line and ready is not None:
                before = set(_heartbeats(env))
                background.append(docrun.Background(f"{example.where}: {line}", line, env, cwd))
                background[-1].wait_ready(ready)
                if "worker" in line.lower():
                    _wait_past_startup(env, before)
    finally:
        complaints = [c for bg in reversed(background) if (c := bg.stop())]
        assert not complaints, "\n".join(complaints)


def _heartbeats(env: dict[str, str]) -> dict[bytes, float]:
    """Each live worker's last heartbeat, by name."""
    with redis.Redis.from_url(env["CAPI_REDIS_URL"]) as client:
        return dict(client.zrange("capi:workers", 0, -1, withscores=True))


def _wait_past_startup(env: dict[str, str], before: set[bytes]) -> None:
    """Until the new worker has sent two heartbeats (a second apart): a signal that comes
    while arq is still starting is not heeded (SIGINT or SIGTERM just after the startup
    hook leaves ``arq workers.main.WorkerSettings`` running)."""
    first: dict[bytes, float] = {}

    def beat_twice() -> bool:
        for name, score in _heartbeats(env).items():
            if name not in before and first.setdefault(name, score) != score:
                return True
        return False

    wait_for(beat_twice, what="the new worker's second heartbeat")


def _run_script(example: Example, lines: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", "\n".join(lines)],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = "\n".join(lines)
    assert proc.returncode == 0, f"{example.where}:\n{shown}\n{proc.stdout}{proc.stderr}"


def test_help_examples_keep_the_key_off_the_command_line() -> None:
    for example in help_examples():
        for line in example.lines:
            assert not re.search(r"CAPI_API_KEY=\S", line), f"{example.where}: {line}"
