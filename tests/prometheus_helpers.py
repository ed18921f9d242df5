"""A real Prometheus server for tests (Debian's ``prometheus`` package), and promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.helpers import terminate, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "capi-alerts.yml"
CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"


def need(binary: str) -> str:
    """The path of ``binary``; skips the test where it is missing, except under CI
    (``.ci/run`` installs it, so there a missing binary is a failure)."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed (apt-get install prometheus)")
        pytest.skip(f"{binary} is not installed (apt-get install prometheus)")
    return path


@contextmanager
def prometheus(
    tmp_path: Path, targets: Mapping[str, str | list[str]], interval_s: float = 1
) -> Iterator[str]:
    """Prometheus scraping ``targets`` (job name -> host:port, or a list of them; a job left
    out is not scraped) every ``interval_s``, with the shipped configuration's jobs and
    rules; yields its base URL and stops it after."""
    binary = need("prometheus")
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {
        "scrape_interval": f"{interval_s}s",
        "evaluation_interval": f"{interval_s}s",
    }
    config["rule_files"] = [str(RULES)]
    for job in config["scrape_configs"]:
        hosts = targets.get(job["job_name"], [])
        job["static_configs"] = [{"targets": [hosts] if isinstance(hosts, str) else hosts}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: proc.poll() is not None or _ready(url), 30, "Prometheus to start")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        yield url
    finally:
        terminate(proc, 15)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query (raises on a query Prometheus refuses)."""
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result
