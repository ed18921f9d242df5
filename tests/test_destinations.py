"""Destinations: several pixels and keys in one deployment, each isolated from the others."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from capi import destinations
from capi.errors import ConfigError, EventRejected, QueueUnavailable
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.helpers import events, ids, make_settings, start_worker, wait_for
from tests.helpers import stop_worker as stop

KEYS = {"a": "sk-conv-key-brand-a-0001", "b": "sk-conv-key-brand-b-0002", "c": "sk-conv-key-c-3"}
PIXELS = {"a": "pix_a", "b": "pix_b", "c": "pix_c"}
ENV = {f"CAPI_KEY_{n.upper()}": k for n, k in KEYS.items()}

TOML = """
[destinations.a]
pixel_id = "pix_a"
api_key_env = "CAPI_KEY_A"
integration_source = "src-a"

[destinations.b]
pixel_id = "pix_b"
api_key_env = "CAPI_KEY_B"
integration_source = "src-b"

[destinations.c]
pixel_id = "pix_c"
api_key_env = "CAPI_KEY_C"
"""


@pytest.fixture
def multi(
    tmp_path: Path, sandbox: SandboxThread, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings for three destinations; the sandbox knows their keys and pixels."""
    state = sandbox.state
    state.conversion_keys |= set(KEYS.values())
    state.pixels |= set(PIXELS.values())
    state.key_pixels = {KEYS[n]: {PIXELS[n]} for n in KEYS}
    path = tmp_path / "destinations.toml"
    path.write_text(TOML)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    # Exactly once is asserted: sends wait 30 s for an answer, not a loaded machine's 1.5 s.
    return make_settings(
        sandbox,
        redis_url,
        destinations_file=path,
        reprobe_interval_s=0.2,
        request_timeout_s=30,
        claim_idle_s=40,
    )


def worker(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return start_worker(settings, *args, **ENV)


def per_pixel(sandbox: SandboxThread) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for (pid, _, event_id), _n in sandbox.state.delivered_counts().items():
        out.setdefault(pid, set()).add(event_id)
    return out


def enqueue_to(settings: Settings, destination: Any, evts: list[dict[str, Any]]) -> None:
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(evts, destination=destination)
    assert report.ok and report.queued > 0, report


def test_three_destinations_each_deliver_once_to_their_own_pixel_with_their_own_key(
    multi: Settings, sandbox: SandboxThread
) -> None:
    batches = {n: events(60, prefix=f"{n}-") for n in KEYS}
    for name, evts in batches.items():
        enqueue_to(multi, name, evts)
    proc = worker(multi)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 180, 60, "three destinations")
    stop(proc)
    assert per_pixel(sandbox) == {PIXELS[n]: ids(e) for n, e in batches.items()}
    assert dict(sandbox.state.senders) == {
        ("pix_a", KEYS["a"], "src-a"): 60,
        ("pix_b", KEYS["b"], "src-b"): 60,
        ("pix_c", KEYS["c"], None): 60,
    }
    assert max(sandbox.state.delivered_ids().values()) == 1


def test_a_broken_key_is_held_from_the_start_while_the_others_deliver(
    multi: Settings, sandbox: SandboxThread
) -> None:
    sandbox.state.conversion_keys.discard(KEYS["b"])
    sandbox.state.scopeless_keys.add(KEYS["b"])  # b's key lacks the scope
    batches = {n: events(40, prefix=f"{n}-") for n in KEYS}
    for name, evts in batches.items():
        enqueue_to(multi, name, evts)
    proc = worker(multi)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 80, 60, "a and c delivered")
    b_keys = multi.keys.for_destination("b")
    with redis.Redis.from_url(multi.redis_url) as c:
        wait_for(lambda: c.hget(b_keys.key_state, "state") == b"held", 20, "b held")
        assert c.xlen(b_keys.stream) == 40  # waiting, not dead-lettered
        assert not c.hlen(b_keys.deadletters)
    sandbox.state.scopeless_keys.discard(KEYS["b"])
    sandbox.state.conversion_keys.add(KEYS["b"])  # fixed: a re-probe passes
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 120, 60, "b after its key is fixed")
    output = stop(proc)
    assert "destination b is held" in output
    assert all(k not in output for k in KEYS.values())
    assert per_pixel(sandbox)[PIXELS["b"]] == ids(batches["b"])


def test_strict_key_check_refuses_the_start(multi: Settings, sandbox: SandboxThread) -> None:
    sandbox.state.conversion_keys.discard(KEYS["b"])
    sandbox.state.scopeless_keys.add(KEYS["b"])
    settings = multi.model_copy(update={"strict_key_check": True, "probe_confirmations": 1})
    proc = worker(settings)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 10, output


def test_fan_out_delivers_one_copy_to_each_destination(
    multi: Settings, sandbox: SandboxThread
) -> None:
    evts = events(20, prefix="both-")
    enqueue_to(multi, ["a", "b"], evts)
    with SyncProducer.from_settings(multi) as producer:
        again = producer.enqueue(evts[0], destination=["a", "b", "c"])
    assert again == {"a": False, "b": False, "c": True}  # deduped per destination
    proc = worker(multi)
    wait_for(lambda: sum(sandbox.state.delivered_ids().values()) == 41, 60, "fan-out")
    stop(proc)
    pixels = per_pixel(sandbox)
    assert pixels[PIXELS["a"]] == pixels[PIXELS["b"]] == ids(evts)
    assert pixels[PIXELS["c"]] == {evts[0]["id"]}


def test_an_unknown_destination_is_refused_at_enqueue(multi: Settings) -> None:
    with SyncProducer.from_settings(multi) as producer:
        with pytest.raises(EventRejected, match="'nope' is not configured"):
            producer.enqueue(events(1)[0], destination="nope")
        with pytest.raises(EventRejected, match="name one"):
            producer.enqueue(events(1)[0])  # several destinations: which?


def test_a_destination_added_to_the_file_is_served_without_a_restart(
    multi: Settings, sandbox: SandboxThread
) -> None:
    path = Path(str(multi.destinations_file))
    path.write_text(TOML.split("[destinations.b]", maxsplit=1)[0])  # a only
    proc = worker(multi)
    enqueue_to(multi, "a", events(10, prefix="a-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 10, 30, "a delivered")
    path.write_text("[destinations.a\n")  # broken: refused, a goes on
    time.sleep(3)
    path.write_text(TOML)  # b and c appear
    time.sleep(0.1)
    enqueue_to(multi, "b", events(10, prefix="b-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 20, 30, "b served after reload")
    output = stop(proc)
    assert "destinations not reloaded" in output and "is not valid TOML" in output
    assert "destination b: serving" in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[destinations.a\n", "is not valid TOML"),
        ("", "names no destination"),
        ("[other]\nx = 1\n", "unknown top-level table 'other'"),
        ('\n\n[destinations.Bad]\npixel_id = "p"\napi_key_env = "K"\n', ":3: [destinations.Bad]"),
        ('[destinations.a]\npixel_id = "p"\n', "give exactly one of api_key_env and api_key_file"),
        ('[destinations.a]\npixel_id = "p"\napi_key = "sk-x"\napi_key_env = "K"\n', "api_key"),
        ('[destinations.a]\npixel_id = "p"\napi_key_env = "UNSET_KEY_VAR"\n', "is not set"),
        (
            '[destinations.a]\npixel_id = "p"\napi_key_env = "K"\nintake_tokens_sha256 = ["x"]\n',
            "64 lowercase hex",
        ),
        # A newcomer's typos: the misspelled name, not 'pixel_id: Field required'.
        ('[destinations.a]\npixelid = "p"\napi_key_env = "K"\n', "pixelid: is not a setting "),
        ('[destinations.a]\npixelid = "p"\napi_key_env = "K"\n', "did you mean pixel_id?"),
        (
            '[destinations.a]\npixel_id = "p"\napi_key_env = "K"\nintegraton_source = "x"\n',
            "integraton_source: is not a setting of a destination; did you mean integration_sou",
        ),
        # The key pasted where its variable's name goes: said so, the key not shown.
        (
            '[destinations.a]\npixel_id = "p"\napi_key_env = "sk-svcacct-pasted-key-0001"\n',
            "api_key_env: is the name of the environment variable that holds the key",
        ),
        (
            '[destinations.a]\npixel_id = "p"\napi_key_env = "K"\nadvertiser_key_env = "a b"\n',
            "advertiser_key_env: is the name of the environment variable",
        ),
        # The events URL where the base goes, refused as CAPI_BASE_URL is (it 404ed at send).
        (
            '[destinations.a]\npixel_id = "p"\napi_key_env = "K"\n'
            'base_url = "http://127.0.0.1:8787/v1/events"\n',
            "base_url: must be the base URL without /v1/events",
        ),
    ],
)
def test_a_broken_file_is_refused_with_its_line_and_rule(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "d.toml"
    settings = Settings(_env_file=None, destinations_file=path)
    with pytest.raises(ConfigError) as caught:
        destinations.parse(text, path, settings, {"K": "sk-conv-key-0001"})
    assert message in str(caught.value)
    assert "sk-" not in str(caught.value).replace("sk-conv", "")


def test_a_key_file_is_read_and_never_shown(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-conv-from-a-file-0009\n")
    path = tmp_path / "d.toml"
    text = f'[destinations.x]\npixel_id = "p"\napi_key_file = "{key_file}"\n'
    found = destinations.parse(text, path, Settings(_env_file=None), {})
    assert found["x"].api_key == "sk-conv-from-a-file-0009"
    assert "sk-conv-from-a-file" not in repr(found["x"])
    os.chmod(key_file, 0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(ConfigError, match="cannot read api_key_file"):
            destinations.parse(text, path, Settings(_env_file=None), {})


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "CAPI_REDIS_URL": settings.redis_url,
        "CAPI_BASE_URL": settings.base_url,
        "CAPI_DESTINATIONS_FILE": str(settings.destinations_file),
        "CAPI_CONFIG_FILE": os.devnull,
        "CAPI_PROBE_CONFIRMATIONS": "1",
        **ENV,
    }


def test_operators_see_and_act_per_destination(multi: Settings, sandbox: SandboxThread) -> None:
    import json

    import orjson
    from click.testing import CliRunner

    from capi.cli import cli

    runner = CliRunner()
    env = cli_env(multi)
    enqueue_to(multi, "a", events(5, prefix="a-"))
    enqueue_to(multi, "b", events(4, prefix="b-"))
    b_keys = multi.keys.for_destination("b")
    with redis.Redis.from_url(multi.redis_url) as c:  # one of b's events the API rejects
        sid, fields = c.xrange(b_keys.stream)[0]
        event = orjson.loads(fields[b"e"])
        event["data"]["coupon"] = "DOOMED"
        c.xadd(b_keys.stream, {**fields, b"e": orjson.dumps(event)})
        c.xdel(b_keys.stream, sid)

    listed = [
        json.loads(line)
        for line in runner.invoke(cli, ["destinations", "--json"], env=env).output.splitlines()
    ]
    assert [(d["name"], d["pixel_id"], d["queued"], d["key_state"]) for d in listed] == [
        ("a", "pix_a", 5, "unchecked"),
        ("b", "pix_b", 4, "unchecked"),
        ("c", "pix_c", 0, "unchecked"),
    ]
    assert all(k not in json.dumps(listed) for k in KEYS.values())

    sandbox.state.conversion_keys.discard(KEYS["c"])  # c's key is revoked
    checked = runner.invoke(cli, ["check-key"], env=env)
    assert checked.exit_code == 11, checked.output
    assert "FAILED: unauthorized" in checked.output and "destination c:" in checked.output
    assert runner.invoke(cli, ["check-key", "--destination", "a,b"], env=env).exit_code == 0
    sandbox.state.conversion_keys.add(KEYS["c"])

    proc = worker(multi)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 8, 60, "a and b delivered")
    stop(proc)
    status = json.loads(runner.invoke(cli, ["status", "--json"], env=env).output)
    assert status["destinations"]["a"]["counters"]["delivered"] == 5
    assert status["destinations"]["b"]["dead_letters"] == 1
    only_b = json.loads(
        runner.invoke(cli, ["status", "--json", "--destination", "b"], env=env).output
    )
    assert only_b["destination"] == "b" and only_b["counters"]["delivered"] == 3

    dls = [
        json.loads(line)
        for line in runner.invoke(
            cli, ["dead-letters", "list", "--json"], env=env
        ).output.splitlines()
    ]
    assert [(d["destination"], d["id"]) for d in dls] == [("b", event["id"])]
    assert runner.invoke(
        cli, ["dead-letters", "list", "--destination", "a"], env=env
    ).output.startswith("No dead letters")
    replayed = runner.invoke(cli, ["dead-letters", "replay", "--all"], env=env)
    assert "replayed 1 of 1" in replayed.output, replayed.output
    with redis.Redis.from_url(multi.redis_url) as c:
        assert c.xlen(b_keys.stream) == 1  # back on b's own queue
        assert c.xlen(multi.keys.for_destination("a").stream) == 0
    unknown = runner.invoke(cli, ["status", "--destination", "nope"], env=env)
    assert unknown.exit_code == 2 and "'nope' is not configured" in unknown.output


def test_changing_the_only_destination_restarts_its_sender_and_the_worker_goes_on(
    multi: Settings, sandbox: SandboxThread
) -> None:
    path = Path(str(multi.destinations_file))
    only_a = TOML.split("[destinations.b]", maxsplit=1)[0]
    path.write_text(only_a)
    proc = worker(multi)
    enqueue_to(multi, "a", events(5, prefix="a1-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 5, 30, "first delivery")
    path.write_text(only_a.replace('"src-a"', '"src-a2"'))  # its only destination changes
    time.sleep(3)
    assert proc.poll() is None, "the worker stopped when its only destination changed"
    enqueue_to(multi, "a", events(5, prefix="a2-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 10, 30, "delivery after the change")
    stop(proc)
    assert sandbox.state.senders[("pix_a", KEYS["a"], "src-a2")] == 5


def test_a_destination_stuck_in_its_key_check_is_dropped_when_removed(
    multi: Settings, sandbox: SandboxThread
) -> None:
    from tests.conftest import free_port

    path = Path(str(multi.destinations_file))
    only_a = TOML.split("[destinations.b]", maxsplit=1)[0]
    port = free_port()  # nothing listens there: x's key check waits for ever
    unreachable = (
        f'\n[destinations.x]\npixel_id = "pix_x"\napi_key_env = "CAPI_KEY_B"\n'
        f'base_url = "http://127.0.0.1:{port}"\n'
    )
    path.write_text(only_a + unreachable)
    proc = worker(multi)
    enqueue_to(multi, "a", events(3, prefix="a-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 3, 30, "a delivered")
    after_b = TOML.split("[destinations.b]")[1]
    b_table = "[destinations.b]" + after_b.split("[destinations.c]", maxsplit=1)[0]
    path.write_text(only_a + b_table)  # x replaced by b
    time.sleep(0.1)
    enqueue_to(multi, "b", events(4, prefix="b-"))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 7, 30, "b served though x was stuck")
    output = stop(proc)
    assert "destination x: removed in the file" in output


def test_a_long_lived_producer_follows_the_file(multi: Settings) -> None:
    path = Path(str(multi.destinations_file))
    with SyncProducer.from_settings(multi) as producer:
        assert producer.enqueue(events(1)[0], destination="c")
        path.write_text(TOML.split("[destinations.c]", maxsplit=1)[0])  # c removed
        os.utime(path, (time.time() + 5, time.time() + 5))
        time.sleep(1.1)
        with pytest.raises(EventRejected, match="'c' is not configured"):
            producer.enqueue(events(1, start=1)[0], destination="c")
        assert producer.enqueue(events(1, start=1)[0], destination="b")


def test_a_fan_out_refused_for_one_destination_says_the_others_may_hold_it(
    multi: Settings, redis_url: str
) -> None:
    """The refusal for b came after a had queued the event, yet it said the event was
    not stored (maybe_stored False: "it was not queued")."""
    client = redis.Redis.from_url(redis_url)
    user = "fanout-no-b"  # may write every key but b's
    client.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw"],
        commands=["+@all"],
        keys=["capi:[^d]*", "capi:d:[^b]*"],
    )
    host_port = redis_url.split("://", 1)[1]
    limited = multi.model_copy(update={"redis_url": f"redis://{user}:pw@{host_port}"})
    event = events(1, prefix="fan-")[0]
    try:
        with SyncProducer.from_settings(limited) as producer:
            with pytest.raises(QueueUnavailable) as got:
                producer.enqueue(event, destination=["a", "b"])
            with pytest.raises(QueueUnavailable) as many:
                producer.enqueue_many(events(2, prefix="fan2-"), destination=["a", "b"])
    finally:
        client.acl_deluser(user)
    assert got.value.maybe_stored and "those whose call came before may have" in str(got.value)
    assert many.value.maybe_stored, many.value
    assert client.xlen(multi.keys.for_destination("a").stream) == 3
