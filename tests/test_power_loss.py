"""What an acknowledged enqueue survives, shown by crashing real servers (tests/powerloss.py):
a power loss under CAPI_ENQUEUE_DURABILITY=aof, a failover under replica."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tests.powerloss import failover, fsynced_length, power_loss
from tests.servers import ServerKind, aof_kinds, redis_system, valkey


def _seed() -> int:
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown on failure: python -m tests.powerloss --seed reruns it
    return seed


def _runnable(kind: ServerKind, *, traced: bool = True) -> ServerKind:
    if kind.missing:
        pytest.skip(f"{kind.name}: {kind.missing}")
    if traced and shutil.which("strace") is None:
        pytest.skip("strace is not installed (tests/install_test_servers.sh)")
    return kind


@pytest.mark.parametrize("kind", aof_kinds(), ids=lambda k: k.name)
def test_aof_durability_loses_nothing_acknowledged_in_a_power_loss(
    kind: ServerKind, tmp_path: Path
) -> None:
    outcome = power_loss(_runnable(kind), tmp_path, fsync="always", durability="aof", seed=_seed())
    assert outcome.acked, outcome.line()
    assert len(outcome.lost) == 0, outcome.line()


@pytest.mark.parametrize("kind", aof_kinds(), ids=lambda k: k.name)
def test_aof_durability_under_everysec_acknowledges_nothing_a_power_loss_takes(
    kind: ServerKind, tmp_path: Path
) -> None:
    """Under everysec the server confirms WAITAOF before the fsync: capi refuses the mode
    (before issue 18 it acknowledged thousands of events a power loss then took)."""
    outcome = power_loss(
        _runnable(kind), tmp_path, fsync="everysec", durability="aof", seed=_seed()
    )
    assert len(outcome.lost) == 0, outcome.line()
    assert not outcome.acked
    assert outcome.refused and "appendfsync always" in outcome.refused[0]


def test_the_power_loss_harness_sees_what_a_power_loss_takes(tmp_path: Path) -> None:
    """The control: in memory mode under everysec, a power loss takes acknowledged events,
    and the harness finds them missing. A crash that comes when everything written is
    already synced (producers starved on a loaded machine since the last fsync), or whose
    unsynced writes were not acknowledged yet, takes nothing to find: the power goes again,
    up to three times (a harness that cannot see a loss fails all three)."""
    kind = _runnable(valkey())
    for attempt in range(3):
        (workdir := tmp_path / str(attempt)).mkdir()
        outcome = power_loss(kind, workdir, fsync="everysec", durability="memory", seed=_seed())
        if outcome.lost:
            break
    assert outcome.synced < outcome.written, outcome.line()
    assert outcome.lost, outcome.line()


@pytest.mark.parametrize("kind", [*aof_kinds(), redis_system()], ids=lambda k: k.name)
def test_replica_durability_loses_nothing_acknowledged_in_a_failover(
    kind: ServerKind, tmp_path: Path
) -> None:
    outcome = failover(_runnable(kind, traced=False), tmp_path, durability="replica", seed=_seed())
    assert outcome.acked, outcome.line()
    assert len(outcome.lost) == 0, outcome.line()


def test_the_fsynced_length_is_what_was_written_before_the_last_completed_fsync_began() -> None:
    trace = "\n".join(
        [
            '4964  write(9</d/a.aof>, "*2\\r\\n"..., 50) = 50',
            "4965  fdatasync(9</d/a.aof> <unfinished ...>",
            '4964  write(9</d/a.aof>, "*3\\r\\n"..., 27) = 27',  # after the fsync began
            "4965  <... fdatasync resumed>) = 0",
            '12345 write(9</d/a.aof>, "*3\\r\\n"..., 30 <unfinished ...>',
            "4965  fdatasync(9</d/a.aof>) = 0",  # the write above had not returned
            "12345 <... write resumed>) = 30",
            "4965  fdatasync(9</d/a.aof> <unfinished ...>",  # never returned: the crash
        ]
    )
    assert fsynced_length(trace) == (107, 77)
