"""A shortened soak: every fault of issue 9 injected for real, on a schedule of time and
phases (never of request counts), so each surely happens in every run; nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from capi.sandbox import SandboxThread
from tests.benchmarks.soak import Phases, soak, soak_settings
from tests.redisproc import RedisProcess


@pytest.mark.slow
def test_soak_accounts_for_every_event(tmp_path: Path, sandbox: SandboxThread) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "logs").mkdir()
    with RedisProcess(tmp_path / "redis", persist=True) as server:
        settings = soak_settings(sandbox, server.url)
        report = soak(
            sandbox,
            server,
            settings,
            tmp_path / "logs",
            n_events=3000,
            workers=2,
            kills=3,
            doomed=3,
            phases=Phases().scaled(0.5),
            drain_timeout_s=60,
        )
    figures = report.figures()
    assert report.lost == [], figures
    assert report.worker_exits == [], figures
    assert report.delivered == 3000 - 3, figures
    assert report.queued == 0, figures  # the finishing worker took over what was left
    assert report.dead_letter_reasons == {"invalid_event": 3}, figures  # the doomed, only
    assert not report.wrongly_dead_lettered and not report.doomed_not_dead_lettered
    # Every fault happened.
    assert report.kills == 3 and report.redis_restarts == 1, figures
    assert report.client_kills > 0, figures
    assert report.full_refusals > 0, figures
    assert report.freeze_s > 0 and report.outage_s > 0 and report.slow_s > 0, figures
    for status in ("401", "403", "429", "503", "0"):
        assert report.statuses.get(status, 0) > 0, figures
