"""Micro-benchmark of :func:`capi.events.prepare` beside its floor, on one core.

    python -m tests.benchmarks.prepare_bench              # best of 5 rounds of 20,000 events
    python -m tests.benchmarks.prepare_bench --profile    # plus a cProfile of one round

The events are the full benchmark's signup/purchase mix
(:func:`tests.benchmarks.bench.sample_events`): half signups, half purchases with one item,
each with one raw email and a source URL. Each round prepares every event once; the best
round is reported, because this machine's two cores are shared and slower rounds measure
the neighbours.

The floor is the work no validator can avoid for the same events: normalizing and hashing
the email (SHA-256), the producer's dedup digest of ``name:id`` (:func:`capi.dedup.digest`),
and ``orjson.dumps`` of the event as it will be sent.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

import orjson

from capi import dedup
from capi.events import prepare
from capi.hashing import sha256_hex
from tests.benchmarks.bench import sample_events


def floor_inputs(events: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(raw email, dedup key, the event as sent) for each event, built outside the timing."""
    out = []
    for event in events:
        sent = orjson.loads(prepare(event).json)
        out.append((event["user"]["email"], f"{event['type']}:{event['id']}", sent))
    return out


def floor_round(inputs: list[tuple[str, str, dict[str, Any]]]) -> None:
    """The unavoidable work: two hashes and the JSON of each event."""
    for email, key, sent in inputs:
        sha256_hex(email.strip().lower())
        dedup.digest(key)
        orjson.dumps(sent)


def prepare_round(events: list[dict[str, Any]]) -> None:
    """prepare() of every event once."""
    for event in events:
        prepare(event)


def best_us(run: Callable[[], None], n: int, rounds: int) -> float:
    """Microseconds per event of the fastest of ``rounds`` runs of ``n`` events."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile one round as well")
    args = parser.parse_args()
    events = sample_events(args.events, "bench")  # timestamps now: built just before timing
    inputs = floor_inputs(events)
    prepare_round(events[:1000])  # warm caches (pycountry, pydantic) before timing
    us = best_us(lambda: prepare_round(events), len(events), args.rounds)
    floor = best_us(lambda: floor_round(inputs), len(inputs), args.rounds)
    print(
        f"prepare() benchmark: {len(events):,} events (signup/purchase mix), best of "
        f"{args.rounds} rounds, one core"
    )
    print(f"prepare():          {us:6.2f} us/event  {1e6 / us:>10,.0f} events/s")
    print(f"floor (hash+JSON):  {floor:6.2f} us/event  {1e6 / floor:>10,.0f} events/s")
    print(f"prepare() / floor:  {us / floor:6.1f}x")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(prepare_round, events)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
