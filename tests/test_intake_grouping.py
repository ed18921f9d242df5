"""capi serve groups concurrent requests' events into one Redis round trip (capi.grouping).

Each test holds Redis's writes (``CLIENT PAUSE WRITE``) so that the first round trip stays in
flight while many requests arrive; the intake's ``capi_intake_events_waiting`` gauge says
when every event has reached the group queue, and only then are writes let go. Redis itself
counts the round trips (under ``CAPI_ENQUEUE_DURABILITY=replica`` each one ends with one
``WAIT``) and the script calls in them (one per destination: the events of a destination's
requests go in one call).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from capi.settings import Settings
from tests.helpers import events, http_get, wait_for
from tests.intake_helpers import TOKEN, IntakeProcess, start_intake
from tests.redisproc import RedisProcess
from tests.test_intake import TOKENS, queued_ids, write_destinations

HOLD_S = "60"  # the intake's Redis timeout: a round trip held by CLIENT PAUSE must not time out


def waiting(server: IntakeProcess) -> int:
    """The intake's capi_intake_events_waiting gauge."""
    status, text = http_get(server.url + "/metrics")
    assert status == 200
    found = re.search(r"^capi_intake_events_waiting (\S+)$", text, re.M)
    assert found, text
    return int(float(found[1]))


def calls(client: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def post_all(
    server: IntakeProcess, requests: list[tuple[list[Any], str, str | None]]
) -> tuple[list[threading.Thread], list[httpx.Response | None]]:
    """Send each (events, token, destination) on its own thread and connection, at once."""
    answers: list[httpx.Response | None] = [None] * len(requests)

    def one(i: int) -> None:
        body, token, destination = requests[i]
        answers[i] = server.post(body, token=token, destination=destination, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    return threads, answers


def held(
    client: redis.Redis, server: IntakeProcess, requests: list[Any], events_in_redis: int
) -> tuple[list[threading.Thread], list[httpx.Response | None]]:
    """Send ``requests`` while Redis's writes are paused; return once ``events_in_redis``
    events wait in the intake (the first round trip in flight, the others queued)."""
    client.execute_command("CLIENT", "PAUSE", 120_000, "WRITE")
    threads, answers = post_all(server, requests)
    wait_for(lambda: waiting(server) == events_in_redis, 60, "every event to wait for Redis")
    return threads, answers


def joined(
    threads: list[threading.Thread], answers: list[httpx.Response | None]
) -> list[httpx.Response]:
    for t in threads:
        t.join(90)
    assert all(a is not None for a in answers), answers
    return [a for a in answers if a is not None]


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    with RedisProcess(tmp_path / "master") as master, RedisProcess(tmp_path / "replica") as rep:
        replicate(rep, master)
        yield master, rep


def replicate(replica: RedisProcess, master: RedisProcess) -> None:
    """Make ``replica`` a replica of ``master``; return once it is in sync and confirms
    writes (a replica that has just synced may confirm its first WAIT only at its next
    once-a-second acknowledgement: a 100 ms wait in that second finds it unconfirmed)."""
    with replica.client() as client:
        client.replicaof("127.0.0.1", master.port)
        wait_for(
            lambda: client.info("replication").get("master_link_status") == "up",
            30,
            "the replica to sync",
        )
    with master.client() as client:

        def confirmed() -> bool:
            client.incr("capi-test:replication-probe")
            return int(client.execute_command("WAIT", 1, 200)) == 1

        wait_for(confirmed, 30, "the replica to confirm a write")


def test_concurrent_requests_share_round_trips_and_each_gets_its_own_answer(
    tmp_path: Path, replicated: tuple[RedisProcess, RedisProcess]
) -> None:
    master, _ = replicated
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    server = start_intake(
        tmp_path,
        master.url,
        CAPI_DESTINATIONS_FILE=str(path),
        CAPI_ENQUEUE_DURABILITY="replica",
        CAPI_REDIS_TIMEOUT_S=HOLD_S,
    )
    b_stream = Settings(_env_file=None).keys.for_destination("b").stream
    try:
        with master.client() as client:
            warm = server.post(events(1, prefix="warm-"), token=TOKENS["a"])
            assert warm.status_code == 200 and warm.json()["queued"] == 1  # the script loaded
            client.set(b_stream, "not a stream")  # every write to destination b fails
            alone = server.post(events(1, prefix="alone-"), token=TOKENS["b"])
            assert alone.status_code >= 500
            waits, scripts = calls(client, "wait"), calls(client, "evalsha")

            good = events(30, prefix="g-")
            bad = {"id": "no-type"}  # refused by prepare(): never reaches Redis
            requests: list[tuple[list[Any], str, str | None]] = [
                ([e], TOKENS["a"], None) for e in good
            ]
            requests += [([good[i]], TOKENS["a"], None) for i in range(3)]  # sent twice
            requests += [([bad, events(1, prefix="nb-")[0]], TOKENS["a"], None)]
            requests += [([bad], TOKENS["a"], None)]  # refused before Redis: never waits
            requests += [(events(1, prefix=f"b{i}-"), TOKENS["b"], "b") for i in range(3)]
            in_redis = 30 + 3 + 1 + 3
            threads, sent = held(client, server, requests, in_redis)
            client.execute_command("CLIENT", "UNPAUSE")
            answers = joined(threads, sent)

            round_trips = calls(client, "wait") - waits
            assert round_trips <= 2  # the round trip held, then one more
            # in each, one script call per destination: a's events share one, b's another
            assert calls(client, "evalsha") - scripts <= 2 * round_trips
    finally:
        server.stop()

    statuses = [a.status_code for a in answers]
    assert statuses == [200] * 35 + [alone.status_code] * 3, statuses
    results = [[r["status"] for r in a.json()["results"]] for a in answers[:35]]
    firsts = {}  # the first of each twice-sent event is queued, in whichever request
    for (body, _, _), got in zip(requests[:33], results, strict=False):
        firsts.setdefault(body[0]["id"], []).append(got[0])
    assert all(sorted(s) == ["duplicate", "queued"] for s in list(firsts.values())[:3]), firsts
    assert all(s == ["queued"] for s in list(firsts.values())[3:])
    assert results[33] == ["refused", "queued"] and results[34] == ["refused"]
    for answer in answers[35:]:
        assert answer.json()["error"] == alone.json()["error"]
    queued = queued_ids(master.url, "a")
    assert sorted(queued) == sorted(["warm-p-0", "nb-p-0", *(e["id"] for e in good)])


def test_redis_killed_mid_group_answers_each_request_503_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    with RedisProcess(tmp_path, persist=True) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_REDIS_TIMEOUT_S=HOLD_S)
        try:
            first = events(10, prefix="ack-")
            assert all(server.post([e]).status_code == 200 for e in first)
            batch = events(20, prefix="lost-")
            with rp.client() as client:
                threads, sent = held(client, server, [([e], TOKEN, None) for e in batch], 20)
            rp.kill()  # the group in flight, the rest waiting: no write was run
            for answer in joined(threads, sent):
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"] == "3"
                body = answer.json()
                assert body["error"]["code"] == "queue_unavailable"
                # unconfirmed: the intake cannot tell that the paused writes never ran
                assert [r["status"] for r in body["results"]] == ["unconfirmed"]
            rp.start()
            assert sorted(queued_ids(rp.url)) == sorted(e["id"] for e in first)  # acknowledged

            again = [server.post([e]) for e in batch]
            assert [a.json()["results"][0]["status"] for a in again] == ["queued"] * 20
            assert sorted(queued_ids(rp.url)) == sorted(e["id"] for e in first + batch)
        finally:
            server.stop()


def test_an_unconfirmed_replica_wait_answers_every_request_of_its_group_503(
    tmp_path: Path,
) -> None:
    """CAPI_ENQUEUE_DURABILITY=replica with no replica: the group's one WAIT confirms
    nothing, so no request of the group is acknowledged; with a replica, all are."""
    (tmp_path / "replica").mkdir()
    with RedisProcess(tmp_path) as rp, RedisProcess(tmp_path / "replica") as replica:
        server = start_intake(
            tmp_path,
            rp.url,
            CAPI_ENQUEUE_DURABILITY="replica",
            CAPI_DURABILITY_TIMEOUT_MS="100",
            CAPI_REDIS_TIMEOUT_S=HOLD_S,
        )
        try:
            batch = events(12, prefix="w-")
            assert server.post(batch[:1]).status_code == 503  # the script loaded, unconfirmed
            with rp.client() as client:
                waits = calls(client, "wait")
                threads, sent = held(client, server, [([e], TOKEN, None) for e in batch], 12)
                client.execute_command("CLIENT", "UNPAUSE")
                answers = joined(threads, sent)
                assert calls(client, "wait") - waits <= 2
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"] == "3"
                assert answer.json()["results"][0]["status"] == "unconfirmed"  # Redis has it
            replicate(replica, rp)
            again = [server.post([e]) for e in batch]
            assert [a.status_code for a in again] == [200] * 12
            assert [a.json()["results"][0]["status"] for a in again] == ["duplicate"] * 12
            assert sorted(queued_ids(rp.url)) == sorted(e["id"] for e in batch)
        finally:
            server.stop()


def test_group_events_0_sends_a_round_trip_per_request(
    tmp_path: Path, replicated: tuple[RedisProcess, RedisProcess]
) -> None:
    master, _ = replicated
    server = start_intake(
        tmp_path, master.url, CAPI_ENQUEUE_DURABILITY="replica", CAPI_INTAKE_GROUP_EVENTS="0"
    )
    try:
        assert server.post(events(1, prefix="warm-")).status_code == 200
        with master.client() as client:
            waits = calls(client, "wait")
            threads, sent = post_all(server, [([e], TOKEN, None) for e in events(20)])
            answers = joined(threads, sent)
            assert [a.status_code for a in answers] == [200] * 20
            assert calls(client, "wait") - waits == 20
        assert waiting(server) == 0
    finally:
        server.stop()


def test_a_connection_dropped_mid_group_is_sent_again_and_each_event_queued_once(
    tmp_path: Path,
) -> None:
    """Redis drops the intake's connection while a group waits in it (CLIENT KILL): the
    round trip is sent again on a new connection, and every event is queued exactly once."""
    with RedisProcess(tmp_path) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_REDIS_TIMEOUT_S=HOLD_S)
        try:
            assert server.post(events(1, prefix="warm-")).status_code == 200
            batch = events(16, prefix="drop-")
            with rp.client() as client:
                threads, sent = held(client, server, [([e], TOKEN, None) for e in batch], 16)
                assert client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                client.execute_command("CLIENT", "UNPAUSE")
                answers = joined(threads, sent)
            assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers]
            assert [a.json()["results"][0]["status"] for a in answers] == ["queued"] * 16
            assert sorted(queued_ids(rp.url)) == sorted(["warm-p-0", *(e["id"] for e in batch)])
        finally:
            server.stop()


def counter(server: IntakeProcess, name: str, **labels: str) -> float:
    """A sample of the intake's /metrics (0 when it has none)."""
    status, text = http_get(server.url + "/metrics")
    assert status == 200
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith(name + "{") and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


def test_a_destination_whose_stream_redis_refuses_keeps_nothing_of_its_failed_requests(
    tmp_path: Path,
) -> None:
    """Destination b's stream key holds a string, so Redis refuses every write to it; its
    concurrent requests share one script call, mixed with a's, and fail alone. Redis keeps
    nothing of them: the same requests sent again once the key is repaired queue every
    event (no dedup record was left without its event), and b's skipped count, in its stats
    and on /metrics, is what the answers said was skipped, as it is for a."""
    path = tmp_path / "destinations.toml"
    write_destinations(path)
    with RedisProcess(tmp_path) as rp:
        server = start_intake(
            tmp_path, rp.url, CAPI_DESTINATIONS_FILE=str(path), CAPI_REDIS_TIMEOUT_S=HOLD_S
        )
        keys = {d: Settings(_env_file=None).keys.for_destination(d) for d in "ab"}
        try:
            with rp.client() as client:
                warm = server.post(events(1, prefix="warm-"), token=TOKENS["a"])
                assert warm.status_code == 200 and warm.json()["queued"] == 1
                client.set(keys["b"].stream, "not a stream")

                denied = [dict(e, consent="denied") for e in events(6, prefix="no-")]
                sent = events(5, prefix="b-")
                b_requests: list[tuple[list[Any], str, str | None]] = [
                    ([e], TOKENS["b"], "b") for e in sent[:4]
                ]
                b_requests += [([sent[4], denied[0]], TOKENS["b"], "b")]
                # events skipped alone: answered 200 if their call ran apart from the failing
                # one, else 500 with it; either way the counts below must agree with the answers
                b_requests += [([d], TOKENS["b"], "b") for d in denied[1:4]]
                shared = events(3, prefix="a-")
                a_requests = [
                    ([shared[i % 3], denied[4 + i % 2]], TOKENS["a"], None) for i in range(6)
                ]
                threads, answered = held(client, server, b_requests + a_requests, 5 + 6)
                client.execute_command("CLIENT", "UNPAUSE")
                answers = joined(threads, answered)

                b_answers, a_answers = answers[: len(b_requests)], answers[len(b_requests) :]
                assert [a.status_code for a in b_answers[:5]] == [500] * 5
                assert [a.status_code for a in a_answers] == [200] * 6
                assert (
                    sorted(a.json()["results"][0]["status"] for a in a_answers)
                    == ["duplicate"] * 3 + ["queued"] * 3
                )
                a_stats = client.hgetall(keys["a"].stats)
                assert (int(a_stats[b"enqueued"]), int(a_stats[b"duplicates"])) == (1 + 3, 3)
                for name, got in (("a", a_answers), ("b", b_answers)):
                    skipped = sum(a.json()["skipped"] for a in got if a.status_code == 200)
                    stats = client.hgetall(keys[name].stats)
                    assert int(stats.get(b"skipped", 0)) == skipped, (name, stats)
                    assert counter(server, "capi_events_skipped_total", destination=name) == skipped
                    assert (
                        counter(
                            server, "capi_intake_events_total", outcome="skipped", destination=name
                        )
                        == skipped
                    )

                client.delete(keys["b"].stream)  # repaired: the same requests again
                again = [
                    server.post(body, token=token, destination=d) for body, token, d in b_requests
                ]
            assert [a.status_code for a in again] == [200] * len(b_requests)
            assert [r["status"] for a in again[:5] for r in a.json()["results"]] == [
                "queued"
            ] * 5 + ["skipped"]
            assert sorted(queued_ids(rp.url, "b")) == sorted(e["id"] for e in sent)
        finally:
            server.stop()
