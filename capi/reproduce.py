"""A curl command that reproduces a dead letter's request with ``validate_only``, the key
left a shell expression (a variable, or reading a key file): never the key itself."""

from __future__ import annotations

import os
import shlex

from capi.client import build_body
from capi.constants import EVENTS_PATH
from capi.deadletters import DeadLetter
from capi.settings import Settings


def cli_target(key: str, destination: str = "default") -> str:
    """The arguments that name one dead letter to ``capi dead-letters show`` (or ``purge``),
    shell-quoted to be pasted (an event id may hold shell syntax), with ``--destination``
    for a destination other than the default."""
    target = shlex.quote(key)
    if destination != "default":
        target = f"--destination {shlex.quote(destination)} {target}"
    return target


def key_expression(settings: Settings, key_source: str) -> tuple[str, str | None]:
    """The shell expression a reproducing curl reads the key from, never the key: a
    variable (``$CAPI_API_KEY``, or a destination's ``api_key_env``), or reading a key
    file; with the env file to load first when the variable is set only there."""
    if key_source not in ("", "CAPI_API_KEY") and not key_source.startswith("$"):  # a file
        return f"$(cat {shlex.quote(key_source)})", None
    variable = key_source.removeprefix("$") or "CAPI_API_KEY"
    if variable not in os.environ and variable in settings.file_values():
        return f"${variable}", settings.config_file_path()
    return f"${variable}", None


def curl_for(
    record: DeadLetter, base_url: str, key: str = "$CAPI_API_KEY", env_file: str | None = None
) -> str:
    """A curl command that sends the event with validate_only; the key stays a shell
    expression (``key``: a variable, or reading a key file). With ``env_file``, the
    command runs in a subshell that loads that file first (the variable is set there)."""
    url = f"{base_url}{EVENTS_PATH}?pid={record.pixel_id}"
    body = build_body([record.event_json.encode()], validate_only=True).decode()
    curl = (
        f"curl -sS -i -X POST {shlex.quote(url)} \\\n"
        f'  -H "Authorization: Bearer {key}" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  --data-binary {shlex.quote(body)}"
    )
    if env_file is None:
        return curl
    return f"(set -a; . {shlex.quote(env_file)}; set +a\n {curl})"
