"""Configuration mistakes end in one line naming the setting and the fix, with a named exit
code, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from capi.exitcodes import ExitCode
from capi.sandbox import SandboxThread
from tests.conftest import REDIS_DATABASES
from tests.helpers import spawn
from workers.cli import cli


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No CAPI_* variable in the environment; returns the extra variables of a run that
    reads no config file."""
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    return {"CAPI_CONFIG_FILE": os.devnull}


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def one_line_error(result: object, code: ExitCode) -> str:
    output: str = result.output  # type: ignore[attr-defined]
    assert result.exit_code == code, output  # type: ignore[attr-defined]
    assert "Traceback" not in output and output.count("\n") == 1, output
    return output


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://localhost:abc/0", "the port 'abc' must be a number from 1 to 65535"),
        ("redis://localhost:99999/0", "the port '99999' must be a number from 1 to 65535"),
        ("redis://:pw@localhost:0/0", "the port '0' must be a number from 1 to 65535"),
        ("redis://localhost:6379/abc", "the database 'abc' must be a number"),
    ],
)
def test_a_bad_redis_url_names_the_setting(env: dict[str, str], url: str, needle: str) -> None:
    result = CliRunner().invoke(cli, ["status"], env={**env, "CAPI_REDIS_URL": url})
    output = one_line_error(result, ExitCode.CONFIG)
    assert "CAPI_REDIS_URL" in output and needle in output


def test_a_database_the_server_lacks_names_the_setting(env: dict[str, str], redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DATABASES}"  # 0 to REDIS_DATABASES - 1
    result = CliRunner().invoke(cli, ["status"], env={**env, "CAPI_REDIS_URL": url})
    output = one_line_error(result, ExitCode.CONFIG)
    assert "CAPI_REDIS_URL: that Redis has no such database" in output


def test_redis_url_naming_the_sandboxs_port_says_it_may_not_be_redis(
    env: dict[str, str], sandbox: SandboxThread
) -> None:
    """A newcomer's wrong port: CAPI_REDIS_URL at an HTTP server (the sandbox, a worker's
    metrics) waits out the timeout; 'is it frozen or overloaded?' sent them to the wrong
    place."""
    url = sandbox.url.replace("http://", "redis://") + "/0"
    extra = {"CAPI_REDIS_URL": url, "CAPI_REDIS_TIMEOUT_S": "0.5"}
    result = CliRunner().invoke(cli, ["status"], env={**env, **extra})
    output = one_line_error(result, ExitCode.REDIS)
    assert "not Redis" in output and "CAPI_REDIS_URL" in output


def test_base_url_with_the_events_path_is_refused(env: dict[str, str]) -> None:
    result = CliRunner().invoke(
        cli, ["check-key"], env={**env, "CAPI_BASE_URL": "https://bzr.openai.com/v1/events"}
    )
    output = one_line_error(result, ExitCode.CONFIG)
    assert "CAPI_BASE_URL: must be the base URL without /v1/events" in output


def test_a_missing_key_says_which_config_file_was_looked_for(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no CAPI_* variable (env), no config file here
    result = CliRunner().invoke(cli, ["check-key"])
    output = one_line_error(result, ExitCode.CONFIG)
    assert "CAPI_API_KEY and CAPI_PIXEL_ID must be set" in output
    assert str(tmp_path / "config" / "capi.env") in output and "looked for" in output


def test_a_missing_pixel_id_says_where_to_find_the_pixel_id(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no CAPI_* variable (env), no config file here
    monkeypatch.setenv("CAPI_API_KEY", "sk-svcacct-sandbox-conversion-key-0001")
    output = one_line_error(CliRunner().invoke(cli, ["check-key"]), ExitCode.CONFIG)
    assert "CAPI_PIXEL_ID must be set" in output
    assert "the pixel id is in Ads Manager -> Conversions" in output
    assert "Conversion Key" not in output  # the key is set: nothing to say about it


def test_a_missing_named_config_file_is_named_in_full(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--config", "prod.env", "status"])
    output = one_line_error(result, ExitCode.CONFIG)
    assert f"config file {tmp_path / 'prod.env'} does not exist" in output


def sandbox_process(*args: str) -> subprocess.Popen[str]:
    return spawn(
        [sys.executable, "-m", "workers.cli", "sandbox", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sandbox_on_a_taken_port_says_so_without_claiming_to_listen(taken_port: int) -> None:
    proc = sandbox_process("--port", str(taken_port))
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.CONFIG, output
    assert "capi sandbox on" not in output and "Traceback" not in output
    assert f"--port {taken_port}: the sandbox cannot listen" in output


def test_sandbox_on_port_0_prints_the_port_it_got() -> None:
    proc = sandbox_process("--port", "0")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("capi sandbox on http://127.0.0.1:"), first
        url = first.split()[-1]
        assert not url.endswith(":0")
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"CAPI_REDIS_URL": "redis://localhost:abc/0"}, "CAPI_REDIS_URL"),
        ({"CAPI_PIXEL_ID": "p"}, "CAPI_API_KEY must be set"),
        ({"CAPI_API_KEY": "sk-a\nSup3rSecret", "CAPI_PIXEL_ID": "p"}, "line break"),
    ],
)
def test_arq_entry_point_with_a_bad_setting_exits_in_one_line(
    settings: dict[str, str], needle: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update(CAPI_CONFIG_FILE=os.devnull, **settings)
    proc = subprocess.run(
        [sys.executable, "-m", "arq", "workers.main.WorkerSettings"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr
    assert "Sup3rSecret" not in proc.stderr + proc.stdout
