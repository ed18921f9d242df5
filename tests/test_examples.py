"""Every example of README.md, docs/*.md and the ``--help`` texts runs as written.

Documents: each of README.md and docs/*.md is one test that runs its ``sh`` and ``python``
blocks in order, in a fresh shell and a scratch working copy, against the Redis and the
sandbox its own blocks start (see :mod:`tests.docrun` for the markers a block may carry:
skip with a reason, background, file, slow). The README's run ends by checking that the
events its blocks queued were delivered.

Help texts: the examples under ``Example:`` in every command's ``--help`` run with
``capi`` on the PATH and ``CAPI_*`` pointing at the test Redis and a sandbox, with what an
operator would have: a dead letter ``order-1042`` (missing scope) and a worker serving
metrics (for ``capi health``). A long-running command (a worker, the sandbox, the intake)
is started, must become ready, keeps running while the rest of its block runs, then must
stop cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import redis
import yaml
from click.testing import CliRunner

from capi import deadletters, destinations
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
}


# --- documents ------------------------------------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> Iterator[docrun.Session]:
    """A scratch working copy; every background block is stopped whatever happens."""
    started = docrun.Session(tmp_path)
    try:
        yield started
    finally:
        started.close()


# Events a document's blocks queue in the sandbox set-up (its Redis on 6390), all delivered.
QUEUED = {"README.md": 103, "intake.md": 3}


@pytest.mark.parametrize("doc", docrun.DOCUMENTS, ids=lambda p: p.name)
def test_document_runs_as_written(doc: Path, session: docrun.Session) -> None:
    for block in [*docrun.setup_of(doc), *docrun.blocks(doc)]:
        session.run(block)
    print(*(f"{where}: {s:.1f} s" for where, s in session.took.items()), sep="\n")
    if doc.name in QUEUED:
        _all_delivered(session, QUEUED[doc.name])


def _all_delivered(session: docrun.Session, queued: int) -> None:
    """What the blocks queued, the worker of the README's terminal 3 delivered."""
    client = redis.Redis(port=session.port(6390), socket_timeout=5)
    stats: dict[str, int] = {}
    try:

        def drained() -> bool:
            stats.update({k.decode(): int(v) for k, v in client.hgetall("capi:stats").items()})
            return stats.get("enqueued") == queued == stats.get("delivered")

        wait_for(drained, timeout_s=30, what=f"{queued} events queued and delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {stats}") from None
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "doc",
    [d for d in docrun.DOCUMENTS if any(b.verb == "slow" for b in docrun.blocks(d))],
    ids=lambda p: p.name,
)
def test_slow_blocks_run_as_written(
    doc: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The blocks marked slow (benchmarks), only when ``-m slow`` asks for them."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("benchmarks run with pytest -m slow")
    started = docrun.Session(tmp_path, slow=True)
    try:
        for block in [*docrun.setup_of(doc), *docrun.blocks(doc)]:
            started.run(block)
        print(*(f"{where}: {s:.1f} s" for where, s in started.took.items()), sep="\n")
    finally:
        started.close()


def test_every_document_block_is_run_or_says_why() -> None:
    for doc in docrun.DOCUMENTS:
        for block in docrun.blocks(doc):
            assert block.lang not in ("bash", "shell", "console", "zsh"), (
                f"{block.where}: a shell block is ```sh, which the tests run"
            )
            if block.verb == "skip":
                assert len(block.arg) > 10, f"{block.where}: say why it is not run"


def test_documents_name_no_issues_and_the_readme_is_short() -> None:
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        found = re.search(r"\b(issues?|seed) #?\d+|(?:^|\s)#\d+\b", text, re.I)
        assert not found, f"{doc.name}: {found.group(0)}"
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_documented_options_exist() -> None:
    """Every ``capi ...`` command line in the documents names options its command has."""
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        spans = re.findall(r"`((?:\.venv/bin/)?capi [^`]+)`", text)
        lines = [ln for b in docrun.blocks(doc) if b.lang == "sh" for ln in b.text.splitlines()]
        for line in [*spans, *lines]:
            for part in re.split(r"\||&&|;|\$\(", line):
                words = part.split("#")[0].split()
                if words and words[0] in ("capi", ".venv/bin/capi"):
                    _check_options(doc.name, words[1:])


def _check_options(where: str, words: list[str]) -> None:
    command: click.Command = cli
    options = {o for p in cli.params for o in getattr(p, "opts", [])} | {"--help"}
    for word in words:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            options |= {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        elif word.startswith("-") and word not in ("-", "--"):
            name = word.split("=")[0]
            assert name in options, f"{where}: capi {' '.join(words)}: no option {name}"


def test_compose_profiles_are_named_where_compose_is_shown() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    readme = (ROOT / "README.md").read_text()
    assert profiles and all(f"--profile {p} up" in readme for p in profiles), profiles


def test_config_blocks_are_valid(tmp_path: Path) -> None:
    """A destinations file shown in the documents is one capi accepts."""
    shown = [b for doc in docrun.DOCUMENTS for b in docrun.blocks(doc) if b.lang == "toml"]
    assert shown
    for block in shown:
        path = tmp_path / "destinations.toml"
        path.write_text(block.text)
        tomllib.loads(block.text)
        settings = Settings(_env_file=None, destinations_file=path)
        environ = {n: DEFAULT_KEY for n in re.findall(r'api_key_env = "(\w+)"', block.text)}
        for n in re.findall(r'api_key_file = "([^"]+)"', block.text):
            environ[n] = ""
        assert destinations.parse_file(settings, environ), block.where


def test_documents_point_nowhere_outside_the_repository() -> None:
    users_copies = ("config/capi.env", "config/destinations.toml")
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        if doc.name == "README.md":
            assert "../" not in text
        for path in re.findall(r"`((?:capi|docs|config|tests|workers)/[\w./-]+)`", text):
            assert (ROOT / path).exists() or path in users_copies, f"{doc.name}: {path}"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).resolve().exists(), f"{doc.name}: link {link}"


def test_the_event_format_page_names_every_field() -> None:
    from capi import schema

    doc = (ROOT / "docs" / "api-format.md").read_text()
    for model in (schema.Event, schema.User, schema.Item):
        for field in model.model_fields:
            assert f"`{field}`" in doc, field
    for event_type in schema.DATA_TYPE_OF:
        assert f"`{event_type}`" in doc, event_type


def test_the_profiling_command_says_how_to_install_what_it_needs() -> None:
    text = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert "pip install -e '.[dev,profile]'" in text and "profile_sender" in text
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


def test_examples_keep_the_key_off_the_command_line() -> None:
    lines = [line for e in help_examples() for line in e.lines]
    for doc in docrun.DOCUMENTS:
        lines += [ln for b in docrun.blocks(doc) if b.lang == "sh" for ln in b.text.splitlines()]
    for line in lines:
        assert not re.search(r"CAPI_API_KEY=\S", line), line


# --- help texts -------------------------------------------------------------------------


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
