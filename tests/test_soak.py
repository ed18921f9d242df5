"""A shortened soak: kill -9s, a Redis connection drop and every fault; nothing is lost."""

from __future__ import annotations

from capi.sandbox import Fault, SandboxThread
from tests.benchmarks.soak import soak
from tests.helpers import make_settings


def test_soak_accounts_for_every_event(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(
        sandbox,
        redis_url,
        batch_size=100,
        max_attempts=30,
        retry_base_s=0.02,
        retry_cap_s=0.5,
    )
    faults = [  # every kind, on a fixed rhythm so each surely happens in a short run
        Fault("missing_scope", every=23),
        Fault("rbac", every=29),
        Fault("rate_limit", every=13, retry_after_s=0.05),
        Fault("server_error", every=17, status=503),
        Fault("drop", every=19),
        Fault("latency", every=2, latency_ms=100),
    ]
    report = soak(
        sandbox, settings, n_events=4000, workers=2, kills=3, doomed=3, timeout_s=120, faults=faults
    )
    assert report.ok, (report.lost[:10], report.wrongly_dead_lettered[:10])
    assert report.delivered == 4000 - 3
    assert report.dead_letter_reasons == {"invalid_event": 3}
    assert report.kills == 3 and report.redis_drops == 1
    for status in ("401", "403", "429", "503", "0"):
        assert report.statuses.get(status, 0) > 0, report.statuses
