"""Deployment files: compose names every service sensibly; the config example explains
every setting; settings errors name the variable and the rule; capi health answers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from capi.cli import cli
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.metrics import Metrics
from capi.metrics import serve as serve_metrics
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_names_every_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "worker", "sandbox", "intake"}
    for name in ("redis", "worker"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"]
    worker = services["worker"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["env_file"]  # secrets come from an env file, not the compose file
    assert "CAPI_API_KEY" not in str(worker.get("environment"))
    assert "container_name" not in worker and "ports" not in worker  # --scale works
    assert services["sandbox"]["profiles"] == ["sandbox"]
    intake = services["intake"]
    assert intake["command"][:2] == ["capi", "serve"] and "--port" in intake["command"]
    assert intake["depends_on"]["redis"]["condition"] == "service_healthy"
    assert intake["env_file"] and "CAPI_API_KEY" not in str(intake.get("environment"))
    assert "/readyz" in str(intake["healthcheck"]["test"]) and intake["restart"] == "unless-stopped"
    assert all(p.startswith("127.0.0.1:") for p in intake["ports"])  # loopback: TLS proxy in front
    assert "redis-data" in compose["volumes"]
    conf = (ROOT / "config" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    assert (ROOT / "Dockerfile").is_file()


def test_config_example_explains_every_setting() -> None:
    text = (ROOT / "config" / "capi.env.example").read_text()
    for name in Settings.model_fields:
        variable = f"CAPI_{name.upper()}"
        assert variable in text, variable
        line = next(i for i, row in enumerate(text.splitlines()) if variable in row)
        assert text.splitlines()[line - 1].startswith("#"), f"{variable} has no explanation"


def test_config_example_loads() -> None:
    settings = Settings.load(ROOT / "config" / "capi.env.example")
    assert settings.base_url == "https://bzr.openai.com"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CAPI_MAX_ATTEMPTS": "0"},
            "CAPI_MAX_ATTEMPTS: Input should be greater than or equal to 1",
        ),
        (
            {"CAPI_BATCH_SIZE": "5000"},
            "CAPI_BATCH_SIZE: Input should be less than or equal to 1000",
        ),
        ({"CAPI_BASE_URL": "bzr.openai.com"}, "CAPI_BASE_URL: must start with http"),
        (
            {"CAPI_RETRY_BASE_S": "10", "CAPI_RETRY_CAP_S": "1"},
            "CAPI_RETRY_CAP_S must not be below",
        ),
        (
            {"CAPI_CLAIM_IDLE_S": "5", "CAPI_REQUEST_TIMEOUT_S": "30"},
            "CAPI_CLAIM_IDLE_S must be longer",
        ),
        ({"CAPI_REDIS_URL": "localhost:6379"}, "CAPI_REDIS_URL: must start with redis://"),
    ],
)
def test_bad_settings_name_the_variable_and_rule(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.load(os.devnull)


def test_settings_repr_hides_the_key() -> None:
    settings = Settings(_env_file=None, api_key="sk-svcacct-very-secret-1234")
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings.model_dump())


def test_health_command(sandbox: SandboxThread, redis_url: str) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["health", "--url", sandbox.url + "/healthz"])
    assert ok.exit_code == ExitCode.OK and "ok" in ok.output
    down = runner.invoke(cli, ["health", "--url", "http://127.0.0.1:9/readyz"])
    assert down.exit_code == ExitCode.FAILURE
    assert "not ready: http://127.0.0.1:9/readyz cannot be reached (" in down.output
    assert "<urlopen error" not in down.output  # the reason, not the exception's repr
    missing = runner.invoke(cli, ["health", "--url", sandbox.url + "/no-such-path"])
    assert missing.exit_code == ExitCode.FAILURE and "not ready: HTTP 404" in missing.output
    no_worker = runner.invoke(
        cli, ["health"], env={"CAPI_REDIS_URL": redis_url, "CAPI_CONFIG_FILE": os.devnull}
    )
    assert no_worker.exit_code == ExitCode.FAILURE and "no live worker" in no_worker.output


def test_health_url_says_why_the_endpoint_is_not_ready(sandbox: SandboxThread) -> None:
    """A worker's /readyz says why it is not ready (a held key, a failing endpoint): capi
    health --url prints that, not only the status code."""
    metrics = Metrics()
    metrics.redis_answered()
    metrics.for_destination("default").key_ok.set(0)
    server = serve_metrics(metrics, free_port())
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
        held = CliRunner().invoke(cli, ["health", "--url", url])
        assert held.exit_code == ExitCode.FAILURE
        assert held.output == "not ready: HTTP 503: the Conversion Key is held (see capi status)\n"
        metrics.for_destination("brand-b").key_ok.set(1)
        some = CliRunner().invoke(cli, ["health", "--url", url])
        assert some.exit_code == ExitCode.OK
        assert some.output == "ok: HTTP 200: ok, but default: key held\n"
    finally:
        server.shutdown()
        server.server_close()


def test_compose_redis_requires_a_password_that_every_service_uses() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_command = services["redis"]["command"]
    assert "--requirepass" in redis_command
    password = redis_command[redis_command.index("--requirepass") + 1]
    assert password.startswith("${CAPI_REDIS_PASSWORD:?")  # compose refuses to start without
    assert "ports" not in services["redis"]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == "${CAPI_REDIS_PASSWORD}"
    for name, service in services.items():
        url = (service.get("environment") or {}).get("CAPI_REDIS_URL")
        if url is not None:
            assert url.startswith("redis://:${CAPI_REDIS_PASSWORD}@redis:"), name


def test_secret_files_are_ignored_by_git() -> None:
    patterns = (ROOT / ".gitignore").read_text().splitlines()
    assert "config/capi.env" in patterns and ".env" in patterns
    assert (
        "config/capi.env"
        not in subprocess.run(
            ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
        ).stdout.split()
    )
