"""A Redis Sentinel set-up of a test's own: a master, two replicas and three sentinels
(``redis-server --sentinel``, the binary Debian's ``redis-sentinel`` package runs), all on
loopback free ports, all stopped whatever happens."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import make_settings, terminate
from tests.redisproc import RedisProcess

MASTER_NAME = "capi-test"


class SentinelSet:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2)."""

    def __init__(
        self,
        workdir: Path,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        replicas: int = 2,
        sentinels: int = 3,
    ):
        found = shutil.which("redis-sentinel") or shutil.which("redis-server")
        assert found, "redis-server is not installed (.ci/run installs it)"
        self.binary = found
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = RedisProcess(self._dir("master"), extra_args=auth, password=password)
        self.replicas = [
            RedisProcess(self._dir(f"replica{i}"), extra_args=auth, password=password)
            for i in range(replicas)
        ]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def servers(self) -> list[RedisProcess]:
        return [self.master, *self.replicas]

    @property
    def addresses(self) -> str:
        """``CAPI_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> SentinelSet:
        try:
            self.master.start()
            for replica in self.replicas:
                replica.extra_args += ["--replicaof", "127.0.0.1", str(self.master.port)]
                replica.start()
            for port in self.sentinel_ports:
                self.sentinel_procs.append(self._start_sentinel(port))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        where = self._dir(f"sentinel{port}")
        conf = where / "sentinel.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {where}",
            f"logfile {where / 'sentinel.log'}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} {len(self.replicas)}",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.password}")
        conf.write_text("\n".join(lines) + "\n")
        return subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def master_seen(self, port: int) -> dict[str, object] | None:
        """What one sentinel says of the master (None if it does not answer)."""
        try:
            with self.sentinel(port) as s:
                state: dict[str, object] = s.sentinel_master(MASTER_NAME)
                return state
        except (redis.exceptions.RedisError, OSError):
            return None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every sentinel knows the master, both replicas and the other sentinels."""
        want_replicas, want_peers = len(self.replicas), len(self.sentinel_ports) - 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._restart_lost_sentinels()
            states = [self.master_seen(p) for p in self.sentinel_ports]
            if self._replicas_online() and all(
                s is not None
                and s.get("num-slaves") == want_replicas
                and s.get("num-other-sentinels") == want_peers
                and s.get("port") == self.master.port
                for s in states
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the sentinels did not see the whole set-up in time: {states}")

    def _restart_lost_sentinels(self) -> None:
        """A sentinel that exited at once lost its free port to another process (the suite
        runs in parallel): start it again on another one."""
        for i, proc in enumerate(self.sentinel_procs):
            if proc.poll() is not None:
                self.sentinel_ports[i] = free_port()
                self.sentinel_procs[i] = self._start_sentinel(self.sentinel_ports[i])

    def _replicas_online(self) -> bool:
        try:
            with self.master.client(decode_responses=True) as c:
                info = c.info("replication")
        except (redis.exceptions.RedisError, OSError):
            return False
        found = [info.get(f"slave{i}", {}) for i in range(len(self.replicas))]
        return all(isinstance(r, dict) and r.get("state") == "online" for r in found)

    def wait_replicated(self, timeout_s: float = 30.0) -> None:
        """Until every replica has applied what the master has written so far.

        A replica "online" in the master's INFO may not have the writes made since: after a
        diskless sync the master holds them back until the replica's first REPLCONF ACK.
        A switchover (Sentinel does not wait for the replica to catch up) then loses them.
        """
        with self.master.client(decode_responses=True) as c:
            written = int(c.info("replication")["master_repl_offset"])

        def applied(replica: RedisProcess) -> int:
            try:
                with replica.client(decode_responses=True) as c:
                    return int(c.info("replication").get("slave_repl_offset", -1))
            except (redis.exceptions.RedisError, OSError):
                return -1

        deadline = time.monotonic() + timeout_s
        while not all(applied(r) >= written for r in self.replicas):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not reach offset {written} in time")
            time.sleep(0.05)

    def promoted(self, old_port: int) -> bool:
        """Whether any sentinel names a master other than ``old_port`` (the failover's
        leader says so first; clients ask every sentinel until one names a master that is up)."""
        for port in self.sentinel_ports:
            state = self.master_seen(port)
            if state is not None and int(str(state["port"])) != old_port:
                return True
        return False

    @staticmethod
    def demoted(server: RedisProcess) -> bool:
        """Whether ``server`` says it is a replica now, asked on a connection of its own; False
        while it does not answer. A sentinel demotes a master with REPLICAOF and CLIENT KILL
        TYPE normal in one transaction, which closes every client connection, one with an
        INFO in flight included: polled on one kept connection every 50 ms, that INFO raised
        ConnectionError in about one switchover in 70 under load."""
        try:
            with server.client(decode_responses=True) as c:
                return bool(c.info("replication")["role"] == "slave")
        except (redis.exceptions.RedisError, OSError):
            return False

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel says it."""
        for port in self.sentinel_ports:
            state = self.master_seen(port)
            if state is not None:
                return int(str(state["port"]))
        return None

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                terminate(proc)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def sentinel_settings(sandbox: SandboxThread, found: SentinelSet, **overrides: Any) -> Settings:
    """Settings for the sandbox that reach Redis only through ``found``'s sentinels."""
    # The URL's host is a port nothing listens on: only the sentinels can name the master.
    values = {"redis_sentinels": found.addresses, "redis_sentinel_master": MASTER_NAME}
    return make_settings(sandbox, "redis://127.0.0.1:1/0", **{**values, **overrides})
