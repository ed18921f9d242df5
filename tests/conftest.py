"""Fixtures: a private redis-server on a free port, and the sandbox in a thread."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from tests.helpers import stop_spawned, terminate, wait_for

# CI runs reproducibly (a fixed seed); local runs keep exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


# The modules whose tests take longest, run first (pytest-xdist hands tests out in collection
# order): the parallel workers then finish together instead of waiting on one late long test.
LONG_FIRST = (
    "test_faults.py",
    "test_destinations_scale.py",
    "test_fuzz_hostile.py",
    "test_worker_process.py",
    "test_intake.py",
    "test_prepare_fast.py",
    "test_examples.py",
    "test_help_examples.py",
    "test_destinations.py",
    "test_redis_connections.py",
    "test_sentinel_failover.py",
    "test_cluster.py",
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once beside a destinations file: every capi a test starts (in this process
    or its own) reads config/destinations.toml from the current directory and would serve
    its destinations instead of the test's one ("destination: name one", hundreds of
    failures); the tests name their own files with CAPI_DESTINATIONS_FILE."""
    found = Path("config/destinations.toml")
    if found.exists():
        pytest.exit(
            f"{found.absolute()} is in the current directory: every capi the tests start "
            "would read it and serve its destinations instead of the test's own. Move it "
            "aside for the run (mv config/destinations.toml config/destinations.toml.mine, "
            "then back), or run the tests from another checkout.",
            returncode=4,
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def stop_spawned_processes() -> Iterator[None]:
    """Every process a test started through ``tests.helpers.spawn`` (workers, ``capi
    serve``, ...) is stopped when the test ends, passed or failed: none outlives its test
    to eat the next test's events."""
    yield
    stop_spawned()


REDIS_DATABASES = 4096
_databases = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own (never the machine's shared one), for the whole session of
    this process (each pytest-xdist worker has its own); its database 0."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            str(REDIS_DATABASES),
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: proc.poll() is not None or _pings(client), 10, "redis-server to start")
        if proc.poll() is not None:
            pytest.fail("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        terminate(proc)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The private Redis, emptied before each test, in a database of the test's own: what
    an earlier test may have left running (a thread that did not stop) never meets this
    test's keys."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    database = next(_databases) % REDIS_DATABASES or 1
    yield redis_server.rsplit("/", 1)[0] + f"/{database}"


@pytest.fixture
def sandbox() -> Iterator[SandboxThread]:
    """A fresh sandbox on a free port, served from a thread."""
    with SandboxThread() as sb:
        yield sb


@pytest.fixture
def capi_env(
    monkeypatch: pytest.MonkeyPatch, sandbox: SandboxThread, redis_url: str
) -> dict[str, str]:
    """CAPI_* settings pointing at the sandbox and the private Redis."""
    env = {
        "CAPI_API_KEY": DEFAULT_KEY,
        "CAPI_PIXEL_ID": DEFAULT_PIXEL,
        "CAPI_BASE_URL": sandbox.url,
        "CAPI_REDIS_URL": redis_url,
        "CAPI_CONFIG_FILE": os.devnull,
    }
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless chromium driven by Selenium, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="capi-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")  # a fresh profile each time
        chrome = webdriver.Chrome(service=Service(driver), options=options)
        try:
            yield chrome
        finally:
            chrome.quit()
