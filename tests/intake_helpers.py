"""A real ``capi serve`` process for tests: started on a free port, logging to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from capi.intake import tokens
from tests.conftest import free_port
from tests.helpers import http_get, spawn, wait_for

TOKEN = "test-intake-token-for-default-0001"
UNSET = "\0unset"  # an env value that removes the variable


@dataclass
class IntakeProcess:
    """A running ``capi serve``; its output goes to ``log_path``."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def post(
        self,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        destination: str | None = None,
        content: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> httpx.Response:
        """POST /v1/events with ``{"events": body}`` (or raw ``content``)."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        params = {"destination": destination} if destination else None
        payload = content if content is not None else orjson.dumps({"events": body})
        return httpx.post(
            self.url + "/v1/events",
            content=payload,
            headers=headers,
            params=params,
            timeout=timeout,
        )

    def stop(self) -> str:
        """SIGTERM; it must exit 0. Its whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        assert self.proc.returncode == 0, self.log()
        return self.log()


def intake_env(redis_url: str, **env: str) -> dict[str, str]:
    """The environment of a ``capi serve`` for ``redis_url``: the default token granted
    ``default`` unless ``env`` says otherwise."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update(
        CAPI_CONFIG_FILE=os.devnull,
        CAPI_REDIS_URL=redis_url,
        CAPI_REDIS_TIMEOUT_S="1",
        CAPI_INTAKE_TOKENS_SHA256=tokens.digest(TOKEN),
        CAPI_INTAKE_RETRY_AFTER_S="3",
    )
    full.update(env)
    return {k: v for k, v in full.items() if v != UNSET}


def start_intake(tmp_path: Path, redis_url: str, *args: str, **env: str) -> IntakeProcess:
    """``capi serve`` on a free port; returns once /healthz answers."""
    port = free_port()
    log_path = tmp_path / f"intake-{port}.log"
    with log_path.open("wb") as log:
        proc = spawn(
            [sys.executable, "-m", "workers.cli", "serve", "--port", str(port), *args],
            env=intake_env(redis_url, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: proc.poll() is not None or http_get(url + "/healthz")[0] == 200,
        what="capi serve to answer",
    )
    assert proc.poll() is None, log_path.read_text()
    return IntakeProcess(proc, url, log_path)
