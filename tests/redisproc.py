"""A redis-server of a test's own, to freeze, fill, kill and restart for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.conftest import free_port
from tests.helpers import terminate


class RedisProcess:
    """One redis-server on a free port; ``persist`` keeps data across restarts (AOF)."""

    def __init__(
        self,
        workdir: Path,
        *,
        persist: bool = False,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        password: str | None = None,
        env: dict[str, str] | None = None,
    ):
        found = binary or shutil.which("redis-server")
        assert found, "redis-server is not installed (.ci/run installs it)"
        self.binary = found
        self.workdir = workdir
        self.persist = persist
        self.port = free_port()
        self.extra_args = extra_args or []
        self.password = password
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            socket_timeout=5,
            password=self.password,
            **kwargs,  # type: ignore[arg-type]
        )

    def start(self) -> RedisProcess:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "always",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=1, password=self.password) as c:
                    if c.ping():
                        return self
            except (redis.exceptions.RedisError, OSError):
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """kill -9: the server is gone, connections drop."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Kill and start again on the same port (data kept only with ``persist``)."""
        self.kill()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def unread_bytes(self) -> int:
        """Bytes clients sent that the server has not read yet (the receive queues of its
        connections, from /proc/net/tcp): above 0 while a frozen server is sent a command."""
        total = 0
        for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == self.port and fields[3] == "01":  # ESTABLISHED
                total += int(fields[4].split(":")[1], 16)
        return total

    def fill(self, margin: int = 1024) -> None:
        """maxmemory ``margin`` bytes under the memory in use, under noeviction: every
        growing write is refused (until as much memory is freed)."""
        with self.client() as c:
            c.config_set("maxmemory-policy", "noeviction")
            used = int(c.info("memory")["used_memory"])
            c.config_set("maxmemory", str(max(1, used - margin)))

    def unfill(self) -> None:
        with self.client() as c:
            c.config_set("maxmemory", "0")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            terminate(self.proc)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
