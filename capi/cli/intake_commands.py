"""``capi serve`` (the HTTP intake) and ``capi intake-token``; registered in main.py.

uvicorn and :mod:`capi.intake` are imported inside the commands, so ``capi --help`` and
every other command start without them."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import click

from capi import destinations, logs
from capi.cli.common import fail, handle_errors, out, print_json, settings_from
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.settings import Settings

if TYPE_CHECKING:
    from capi.intake.app import Intake


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes (each with its own /metrics).",
)
@click.pass_context
@handle_errors
def serve_command(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Serve the HTTP intake: POST /v1/events queues events for the workers.

    Clients authenticate with an intake token (capi intake-token), never the Conversion
    Key. Every event is validated and hashed as the Python producer does, and answered
    one by one. Also serves /healthz, /readyz, /metrics and /openapi.json. Logs are JSON
    lines on stderr, one per request, without bodies or tokens. SIGTERM stops it after
    the requests in flight are answered (within CAPI_SHUTDOWN_TIMEOUT_S).

    \b
    Example:
      capi intake-token --json > intake-token.json
      jq -r .config_line intake-token.json >> config/capi.env
      capi serve --port 8080
      curl -sS http://127.0.0.1:8080/readyz
    """
    import uvicorn

    from capi.intake import tokens
    from capi.intake.app import Intake

    settings = settings_from(ctx)
    grants = tokens.read_grants(settings)
    if not grants:
        raise ConfigError(
            "no intake token is configured (CAPI_INTAKE_TOKENS_SHA256, or "
            "intake_tokens_sha256 in the destinations file); capi intake-token makes one "
            "and prints the line to add"
        )
    configure_logging(settings)
    where = f"http://{host}:{port}"
    options = {
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "capi.intake.guard:GuardedProtocol",  # the limits: docs/intake-security.md
        "lifespan": "on",
        "server_header": False,
        "timeout_keep_alive": settings.intake_idle_timeout_s,
        **_proxy_options(settings),
        "timeout_graceful_shutdown": max(1, round(settings.shutdown_timeout_s)),
    }
    granted = ", ".join(sorted({n for names in grants.values() for n in names}))
    if workers > 1:
        config_file = ctx.ensure_object(dict).get("config_file")
        if config_file:
            os.environ["CAPI_CONFIG_FILE"] = str(config_file)
        out.print(f"capi serve on {where} ({workers} processes; for {granted})", markup=False)
        _exit_quietly_after_shutdown()
        uvicorn.run(
            "capi.cli.intake_commands:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            **options,  # type: ignore[arg-type]
        )
        return
    try:
        sock = socket.create_server((host, port), backlog=2048)
    except OSError as exc:
        fail(
            f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another "
            "port, or --port 0 for a free one",
            ExitCode.CONFIG,
        )
    bound = sock.getsockname()[1]
    config = uvicorn.Config(Intake(settings), **options)  # type: ignore[arg-type]
    out.print(f"capi serve on http://{host}:{bound} (for {granted})", markup=False)
    sys.stdout.flush()
    _exit_quietly_after_shutdown()
    uvicorn.Server(config).run(sockets=[sock])


def _proxy_options(settings: Settings) -> dict[str, object]:
    """uvicorn's X-Forwarded-For handling: only from CAPI_TRUSTED_PROXIES, if set."""
    trusted = [p.strip() for p in (settings.trusted_proxies or "").split(",") if p.strip()]
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted}


def _exit_quietly_after_shutdown() -> None:
    """After a graceful shutdown uvicorn raises the signal it caught again, for the handler
    that was there before it; these handlers let the command then end with exit code 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def configure_logging(settings: Settings) -> None:
    """JSON lines on stderr, access records with their fields, the key (if any) redacted."""
    from capi.intake.app import AccessFormatter

    key = settings.api_key.get_secret_value() if settings.api_key else ""
    logs.configure(json=True, level=getattr(logging, settings.log_level.upper()), key=key)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(AccessFormatter())


def app_from_environment() -> Intake:
    """The intake of one server process of ``capi serve --workers N`` (settings from the
    environment and CAPI_CONFIG_FILE)."""
    from capi.intake.app import Intake

    settings = Settings.load()
    configure_logging(settings)
    return Intake(settings)


@click.command("intake-token")
@click.option(
    "--destination",
    metavar="NAME",
    help="The destination it grants (default: the only one configured).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
@handle_errors
def intake_token_command(ctx: click.Context, destination: str | None, as_json: bool) -> None:
    """Make a new intake token for capi serve, and print it once with the line to configure.

    Only the token's SHA-256 goes in the configuration; the token itself is shown here
    once: hand it to the client that will POST events, and keep it out of logs and
    repositories. To revoke it, remove its SHA-256 from the configuration.

    \b
    Examples:
      capi intake-token
      capi intake-token --json | jq -r .config_line
    """
    settings = settings_from(ctx)
    names = destinations.names(settings)
    if destination is None:
        if len(names) != 1:
            fail(
                "--destination: name the destination the token grants; they are: "
                + ", ".join(names),
                ExitCode.USAGE,
            )
        destination = names[0]
    elif destination not in names:
        fail(
            f"--destination: {destination[:64]!r} is not configured; the destinations are: "
            + ", ".join(names),
            ExitCode.USAGE,
        )
    from capi.intake import tokens

    token = tokens.new_token()
    digest = tokens.digest(token)
    path = destinations.source(settings)
    if path is None:
        line = f"CAPI_INTAKE_TOKENS_SHA256={digest}"
        where = "config/capi.env or the environment (several tokens: comma-separated, one line)"
    else:
        line = f'intake_tokens_sha256 = ["{digest}"]'
        where = f"[destinations.{destination}] in {path} (or add the digest to its list)"
    if as_json:
        print_json(
            {
                "token": token,
                "sha256": digest,
                "destination": destination,
                "config_line": line,
                "config_file": str(path) if path is not None else None,
            }
        )
        return
    out.print(
        f"New intake token for destination {destination!r}, shown only this once (give it to "
        f"the client; keep it secret):\n  {token}\n"
        f"Its SHA-256:\n  {digest}\n"
        f"Grant it: add this line to {where}:\n  {line}",
        markup=False,
    )
