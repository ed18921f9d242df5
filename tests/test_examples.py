"""Every example in ``--help`` texts and every shell block of the README runs as written.

Each example block runs in bash (``-e -o pipefail``), one block per test, in a scratch
directory holding ``config/capi.env.example`` and a ``.venv`` link to this environment, with
``CAPI_*`` pointing at the test Redis and the sandbox. What an operator would have is there:
a dead letter ``order-1042`` (missing scope), and a worker serving metrics on port 9464 (for
``capi health``). A long-running command (a worker, the sandbox) is started, must become
ready, keeps running while the rest of its block runs, and must then stop cleanly.

The ports the examples name (9464, 8080, 8787: after ``--port``, ``--metrics-port`` or in an
``http://127.0.0.1:`` URL) are mapped to free ports of this run, 9464 to the worker's, so
that runs in parallel (pytest-xdist, other checkouts) never meet on a port.

Not run here, each for a stated reason: installing (``python3 -m venv``, ``pip``: the suite
runs inside the installed environment), running this suite itself, and Docker (no engine on
the build machines; ``tests/test_deploy.py`` checks the compose file).
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
from tests.conftest import free_port
from tests.helpers import spawn, wait_for
from workers.cli import cli

ROOT = Path(__file__).resolve().parents[1]
# One xdist worker runs them all, in order: one examples' worker (``services``) for all.
pytestmark = pytest.mark.xdist_group("examples")
METRICS_PORT = 9464  # the port the help texts and README name
SHOP = "https://shop.example/thanks"
PORT_NAMED = re.compile(r"(--port[ =]|--metrics-port[ =]|http://(?:127\.0\.0\.1|localhost):)(\d+)")
SKIP = {
    "python3 -m venv": "installs the package: the suite already runs inside the installed env",
    ".venv/bin/pytest": "this test suite itself",
    "bash .ci/run": "this test suite itself, plus lint",
    "docker compose": "no Docker engine on the build machines (test_deploy checks the file)",
    'echo "CAPI_REDIS_PASSWORD': "writes the .env of the Docker setup (not run here)",
    "CAPI_ENV_FILE=config/sandbox.env docker": "no Docker engine on the build machines",
}
LONG_RUNNING = {  # command prefix -> what it prints once ready
    "capi tail --follow": "delivered",
    "capi worker": "sender starting",
    "arq workers.main.WorkerSettings": "sender starting",
    "capi sandbox": "capi sandbox on",
    "capi serve": "capi serve on",
}


@dataclass(frozen=True)
class Example:
    """One block of example lines, from a help text or a README shell block."""

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


def readme_examples() -> list[Example]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [
        Example(f"README sh block {i + 1}", tuple(_joined(block.splitlines())))
        for i, block in enumerate(blocks)
    ]


def _skip_reason(line: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if line.startswith(prefix)), None)


EXAMPLES = [
    e
    for e in help_examples() + readme_examples()
    if not all(_skip_reason(line) for line in e.lines)
]


def test_examples_are_found() -> None:
    where = {e.where for e in EXAMPLES}
    assert "capi enqueue --help" in where and "capi dead-letters list --help" in where
    assert sum(w.startswith("README") for w in where) >= 3
    assert len(help_examples()) == len(_commands(cli))  # every command has examples


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory, redis_server: str
) -> Iterator[dict[str, str]]:
    """The test Redis, a sandbox, and a worker serving metrics (the examples' port 9464 is
    mapped to its port, ``PORTS["9464"]``), for every example."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    port = free_port()
    with SandboxThread() as sandbox:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update(
            CAPI_API_KEY=DEFAULT_KEY,
            CAPI_PIXEL_ID=DEFAULT_PIXEL,
            CAPI_BASE_URL=sandbox.url,
            CAPI_REDIS_URL=redis_server,
            CAPI_RETRY_BASE_S="0.05",
            CAPI_RETRY_CAP_S="0.5",
            CAPI_PROBE_CONFIRMATIONS="1",
            CAPI_ADVERTISER_KEY=DEFAULT_ADVERTISER_KEY,
            CAPI_ADS_API_BASE_URL=sandbox.url,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "--metrics-port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path_factory.mktemp("worker"),
        )
        try:
            wait_for(
                lambda: worker.poll() is not None or _ready(f"http://127.0.0.1:{port}/readyz"),
                what="worker",
            )
            assert worker.poll() is None, "the examples' worker exited"
            # A few deliveries, for the examples that show them (capi tail, capi verify).
            settings = Settings(_env_file=None, redis_url=redis_server)
            with SyncProducer.from_settings(settings) as producer:
                producer.enqueue_many(
                    purchase(f"order-{i}", amount=1000, currency="USD", source_url=SHOP)
                    for i in range(1, 4)
                )
            wait_for(lambda: len(sandbox.state.delivered_ids()) == 3, what="deliveries")
            env["_EXAMPLES_METRICS_PORT"] = str(port)
            yield env
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
            client.close()


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


def _run_block(example: Example, env: dict[str, str], cwd: Path) -> None:
    """Run a block: consecutive lines as one bash script (so ``export`` carries), each
    long-running command in the background until the block ends."""
    background: list[tuple[str, subprocess.Popen[str]]] = []
    script: list[str] = []
    ports = {str(METRICS_PORT): env["_EXAMPLES_METRICS_PORT"]}
    try:
        for named in [*example.lines, ""]:
            if _skip_reason(named):
                continue
            line = _on_free_ports(named, ports)
            ready = next((text for cmd, text in LONG_RUNNING.items() if _starts(line, cmd)), None)
            if line and not (ready and "--burst" not in line):
                script.append(line)
                continue
            if script:
                _run_script(example, script, env, cwd)
                script = []
            if line and ready:
                background.append((line, _start(line, ready, env, cwd)))
    finally:
        for line, proc in background:
            proc.send_signal(signal.SIGINT if "sandbox" in line else signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, f"{example.where}: {line} did not stop cleanly\n{output}"


def _on_free_ports(line: str, ports: dict[str, str]) -> str:
    """The line with each port it names replaced by a free one (the same one throughout a
    block), 9464 by the examples' worker's."""

    def mapped(match: re.Match[str]) -> str:
        if match[2] == "0":  # the system's choice already
            return match[0]
        port = ports.setdefault(match[2], str(free_port()))
        return match[1] + port

    return PORT_NAMED.sub(mapped, line)


def _run_script(example: Example, lines: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", "\n".join(lines)],
        check=False,
        env=env,
        cwd=cwd,
        input=f"{DEFAULT_KEY}\n{DEFAULT_PIXEL}\n",  # for the README's `read` of key and pixel
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = "\n".join(lines)
    assert proc.returncode == 0, f"{example.where}:\n{shown}\n{proc.stdout}{proc.stderr}"


def _starts(line: str, command: str) -> bool:
    return line.startswith(command) or line.startswith(".venv/bin/" + command)


def _start(line: str, ready: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    proc = spawn(
        ["bash", "-c", f"exec {line}"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = ""
    for out_line in proc.stdout:
        seen += out_line
        if ready in out_line:
            return proc
    raise AssertionError(f"{line} exited before it was ready:\n{seen}")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_example_runs_as_written(
    example: Example, services: dict[str, str], workdir: Path, redis_server: str
) -> None:
    seed_dead_letter(redis_server)
    _run_block(example, services, workdir)


def test_examples_keep_the_key_off_the_command_line() -> None:
    for example in help_examples() + readme_examples():
        for line in example.lines:
            assert not re.search(r"CAPI_API_KEY=\S", line), f"{example.where}: {line}"


def test_readme_points_nowhere_outside_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    assert "../" not in text
    for path in re.findall(r"`((?:capi|docs|config|tests|workers)/[\w./-]+)`", text):
        assert (ROOT / path).exists() or path in ("config/capi.env", "config/destinations.toml"), (
            path
        )  # the user's copies
    doc = (ROOT / "docs" / "api-format.md").read_text()
    from capi import schema

    for model in (schema.Event, schema.User, schema.Item):
        for field in model.model_fields:
            assert f"`{field}`" in doc, field
    for event_type in schema.DATA_TYPE_OF:
        assert f"`{event_type}`" in doc, event_type


def test_the_profiling_command_says_how_to_install_what_it_needs() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "profile_sender` profiles the hot path; it needs pyinstrument" in text
    assert "pip install -e '.[dev,profile]'" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^profile = \["pyinstrument', pyproject, re.M)
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.profile_sender", "--events", "1"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "pip install -e '.[dev,profile]'" in proc.stderr
