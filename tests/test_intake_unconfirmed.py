"""A 503 from capi serve says `not_queued` only for events Redis does not hold.

Found by the fault campaign against the grouped intake: events answered 503 `not_queued`
(with "no event was queued") were in Redis and were delivered: the answer was lost to a
frozen Redis (its timeout), the durability wait did not confirm the write in time, or
Redis died after taking the write (redis-py sends the call again on a new connection,
whose refused connect is what is reported). Such events are `unconfirmed`: sending them
again is safe (the id dedups), but a client must not take them as not queued.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from capi.queue import ENQUEUE_LUA
from capi.settings import Settings
from tests.helpers import capi, events, http_get, wait_for
from tests.intake_helpers import IntakeProcess, start_intake
from tests.redisproc import RedisProcess
from tests.servers import valkey
from tests.test_intake import queued_ids
from tests.test_intake_grouping import replicate

ENV = {
    "frozen": {},
    "full": {},
    # No replica: WAIT 1 answers 0 after 100 ms.
    "wait-unconfirmed": {"CAPI_ENQUEUE_DURABILITY": "replica", "CAPI_DURABILITY_TIMEOUT_MS": "100"},
    # Redis dies while the wait holds the request.
    "killed-in-wait": {
        "CAPI_ENQUEUE_DURABILITY": "replica",
        "CAPI_DURABILITY_TIMEOUT_MS": "20000",
        "CAPI_REDIS_TIMEOUT_S": "30",
    },
}


def blocked(rp: RedisProcess) -> bool:
    with rp.client() as client:
        return int(client.info("clients")["blocked_clients"]) >= 1


def post_through(
    outage: str, rp: RedisProcess, server: IntakeProcess, batch: list[Any]
) -> httpx.Response:
    """POST ``batch`` through ``outage``; Redis is back (with its data) on return."""
    if outage == "frozen":
        rp.freeze()
        try:
            return server.post(batch)
        finally:
            rp.thaw()
    if outage == "full":
        rp.fill(200_000)
        try:
            return server.post(batch)
        finally:
            rp.unfill()
    if outage == "wait-unconfirmed":
        return server.post(batch)
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(server.post(batch, timeout=60)))
    sender.start()
    wait_for(lambda: blocked(rp), 20, "the request's WAIT to block")
    rp.kill()  # the write is in the AOF (appendfsync always); no answer comes
    sender.join(60)
    rp.start()
    return answer[0]


@pytest.mark.parametrize("outage", list(ENV))
def test_a_503_says_not_queued_only_for_events_redis_does_not_hold(
    tmp_path: Path, outage: str
) -> None:
    with RedisProcess(tmp_path, persist=True) as rp:
        server = start_intake(tmp_path, rp.url, **{"CAPI_REDIS_TIMEOUT_S": "1", **ENV[outage]})
        try:
            batch = events(3, prefix=f"{outage}-")
            if outage in ("frozen", "full"):  # connected (and the script loaded) before
                assert server.post(batch[:1]).status_code == 200
            else:  # loaded, so that the first call writes, then waits
                with rp.client() as client:
                    client.script_load(ENQUEUE_LUA)
            resp = post_through(outage, rp, server, batch[1:])
            assert resp.status_code == 503, resp.text
            body = resp.json()
            held = set(queued_ids(rp.url))
            for result in body["results"]:
                if result["status"] == "not_queued":
                    assert result["id"] not in held, (result, body["error"])
            if outage == "full":
                assert [r["status"] for r in body["results"]] == ["not_queued"] * 2
                assert "no event was queued" in body["error"]["message"]
            else:
                assert [r["status"] for r in body["results"]] == ["unconfirmed"] * 2
                assert "no event was queued" not in body["error"]["message"]
            if outage != "full":
                assert {e["id"] for e in batch[1:]} <= held  # Redis did take them
        finally:
            server.stop()


def test_readyz_and_status_say_when_no_replica_confirms_writes(tmp_path: Path) -> None:
    """Under CAPI_ENQUEUE_DURABILITY=replica a frozen replica fails every request (503):
    /readyz says not ready and capi status says why, within seconds (the campaign found
    both saying all was well while every POST got 503)."""
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    with RedisProcess(tmp_path / "master") as master, RedisProcess(tmp_path / "replica") as rep:
        replicate(rep, master)
        env = {"CAPI_ENQUEUE_DURABILITY": "replica", "CAPI_DURABILITY_TIMEOUT_MS": "200"}
        server = start_intake(tmp_path, master.url, **env)
        settings = Settings(_env_file=None, redis_url=master.url, enqueue_durability="replica")
        try:
            assert http_get(server.url + "/readyz")[0] == 200
            assert server.post(events(1)).status_code == 200
            rep.freeze()
            try:
                wait_for(lambda: http_get(server.url + "/readyz")[0] == 503, 15, "not ready")
                assert "replica" in http_get(server.url + "/readyz")[1]
                assert server.post(events(1, start=1)).status_code == 503  # as foretold
                shown = capi(settings, "status", "--json")
                assert shown.returncode == 0, shown.stderr
                assert orjson.loads(shown.stdout)["redis"]["confirming_replicas"] == 0
                assert "NO REPLICA CONFIRMS WRITES" in capi(settings, "status").stdout
            finally:
                rep.thaw()
            wait_for(lambda: http_get(server.url + "/readyz")[0] == 200, 15, "ready again")
            shown = capi(settings, "status", "--json")
            assert orjson.loads(shown.stdout)["redis"]["confirming_replicas"] == 1
        finally:
            server.stop()


def test_readyz_says_not_ready_while_the_server_cannot_honour_aof_durability(
    tmp_path: Path,
) -> None:
    """Under CAPI_ENQUEUE_DURABILITY=aof, a Redis without an append-only file, or with
    appendfsync everysec, fails every POST (500, misconfigured): /readyz said ready all the
    same, so a load balancer kept sending it traffic. It now says why not, and is ready
    once the server is set as the setting needs."""
    kind = valkey()  # WAITAOF (Redis 7.2+); the machine's redis-server is 7.0
    if kind.missing:
        pytest.skip(kind.missing)
    args = ["--appendfsync", "everysec"]  # and appendonly no
    with RedisProcess(tmp_path, binary=kind.binary, extra_args=args) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_ENQUEUE_DURABILITY="aof")
        try:
            for fix, needs in [
                (("appendfsync", "always"), "appendfsync always"),  # it is everysec
                (("appendonly", "yes"), "appendonly yes"),  # the file is off
                (None, None),
            ]:
                status, body = http_get(server.url + "/readyz")
                if needs is None:
                    assert status == 200, body
                    assert server.post(events(1, prefix="aof-")).status_code == 200
                    break
                assert status == 503 and needs in body, body
                assert server.post(events(1)).status_code == 500  # as foretold
                with rp.client() as client:
                    client.config_set(*fix)
                    if fix[0] == "appendonly":
                        wait_for(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
        finally:
            server.stop()


def test_a_post_that_cannot_be_made_durable_says_its_events_may_be_delivered(
    tmp_path: Path,
) -> None:
    """Under CAPI_ENQUEUE_DURABILITY=aof on a server with appendfsync everysec, Redis takes
    each event and the durability check then refuses the promise: the 500 answer said only
    "misconfigured", so a client could not tell that its events were in the queue (and are
    delivered). Each event is answered ``unconfirmed``, as when a wait does not confirm."""
    kind = valkey()
    if kind.missing:
        pytest.skip(kind.missing)
    args = ["--appendonly", "yes", "--appendfsync", "everysec"]
    with RedisProcess(tmp_path, binary=kind.binary, extra_args=args) as rp:
        server = start_intake(tmp_path, rp.url, CAPI_ENQUEUE_DURABILITY="aof")
        try:
            sent = events(2, prefix="aof500-")
            reply = server.post([*sent, {"id": "broken"}])
            assert reply.status_code == 500, reply.text
            answer = reply.json()
            assert answer["error"]["code"] == "misconfigured"
            assert "may be delivered" in answer["error"]["message"]
            statuses = [(r["id"], r["status"]) for r in answer["results"]]
            assert statuses == [
                (sent[0]["id"], "unconfirmed"),
                (sent[1]["id"], "unconfirmed"),
                ("broken", "refused"),
            ]
            assert queued_ids(rp.url) == [e["id"] for e in sent]  # as said: in the queue
        finally:
            server.stop()


def test_events_after_a_failed_chunk_were_never_sent_and_say_so(tmp_path: Path) -> None:
    """The producer sends a body 500 events at a time (its chunk) and stops at the first
    chunk whose durability fails. The events of the chunks after it never reached Redis:
    they were answered ``unconfirmed`` ("Redis may hold them, and they may be delivered")
    both on a 500 misconfigured and on a 503 whose wait did not confirm; they are
    ``not_queued``, and Redis holds only the first chunk."""
    kind = valkey()
    if kind.missing:
        pytest.skip(kind.missing)
    args = ["--appendonly", "yes", "--appendfsync", "everysec"]
    cases = [
        ("aof500-", 500, {"CAPI_ENQUEUE_DURABILITY": "aof"}),
        ("wait503-", 503, ENV["wait-unconfirmed"]),
    ]
    for prefix, status, env in cases:
        where = tmp_path / prefix  # a Redis of its own: its append-only file is its own
        where.mkdir()
        with RedisProcess(where, binary=kind.binary, extra_args=args) as rp:
            server = start_intake(where, rp.url, **env)
            try:
                sent = events(600, prefix=prefix)
                reply = server.post(sent)
                assert reply.status_code == status, reply.text
                statuses = [r["status"] for r in reply.json()["results"]]
                assert statuses == ["unconfirmed"] * 500 + ["not_queued"] * 100, prefix
                assert queued_ids(rp.url) == [e["id"] for e in sent[:500]]
            finally:
                server.stop()
