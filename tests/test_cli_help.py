"""Every command has --help with an example; the replay audit log is readable."""

from __future__ import annotations

import os

import click
import pytest
from click.testing import CliRunner

from capi.sandbox import SandboxThread
from tests.helpers import make_settings
from workers.cli import cli


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("path", commands(cli), ids=lambda p: " ".join(p) or "capi")
def test_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output, " ".join(path)
    # A docstring's reST markup is for the API docs; a terminal shows it as is.
    assert "``" not in result.output, " ".join(path)


def test_replay_audit_log(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    env = {"CAPI_REDIS_URL": settings.redis_url, "CAPI_CONFIG_FILE": os.devnull}
    runner = CliRunner()
    assert "No replays yet" in runner.invoke(cli, ["dead-letters", "replays"], env=env).output
    runner.invoke(cli, ["dead-letters", "replay", "--reason", "missing_scope"], env=env)
    log = runner.invoke(cli, ["dead-letters", "replays"], env=env).output
    assert "completed" in log and "started" in log and "missing_scope" in log
