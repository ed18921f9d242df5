"""``capi console`` (the operator console in the browser) and ``capi console-token``;
registered in main.py.

uvicorn, Starlette and :mod:`capi.console` are imported inside the command, so ``capi
--help`` and every other command start without them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from capi.cli.common import err, handle_errors, out, settings_from
from capi.cli.intake_commands import (
    _exit_quietly_after_shutdown,
    listening_socket,
    proxy_options,
    url_of,
)
from capi.errors import ConfigError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


# The console's connection limits, enforced by the intake's connection guard: headers
# within 10 s, an idle connection closed after 15 s, at most 64 connections (a flood from
# one address sheds its own connections first).
LIMITS = {
    "max_header_bytes": 32_768,
    "header_timeout_s": 10.0,
    "idle_timeout_s": 15.0,
    "max_connections": 64,
}


class Limited:
    """An ASGI app with the connection limits the guard reads from it (``limits``)."""

    def __init__(self, app: ASGIApp, limits: Any) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer as the app does."""
        await self.app(scope, receive, send)


@click.command("console")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8081,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.pass_context
@handle_errors
def console_command(ctx: click.Context, host: str, port: int) -> None:
    """Serve the operator console: destinations, dead letters, replays, in the browser.

    A process of its own (never the intake's). Log in with a console token (capi
    console-token); viewers read, operators may also replay, purge and check keys. Keep it
    on 127.0.0.1 behind your SSO proxy (docs/console.md); CAPI_TRUSTED_PROXIES names the
    proxies whose X-Forwarded-For and X-Forwarded-Proto are believed.

    \b
    Example:
      capi console-token --role operator   # put its last line in config/capi.env
      capi console --port 8081
    """
    import uvicorn

    from capi.console.app import Console
    from capi.intake.guard import Limits

    settings = settings_from(ctx)
    if not settings.console_tokens_sha256:
        raise ConfigError(
            "no console token is configured (CAPI_CONSOLE_TOKENS_SHA256); capi console-token "
            "--role operator prints one and its configuration line"
        )
    sock = listening_socket(host, port, backlog=256)
    where = url_of(host, sock)

    def ready() -> None:  # said once uvicorn serves: Ctrl-C from then on stops it
        out.print(f"capi console on {where}", markup=False)
        sys.stdout.flush()

    limits = Limits(**LIMITS)  # type: ignore[arg-type]
    config = uvicorn.Config(
        Limited(Console(settings, ready).app, limits),
        # The guard caps connections (and so requests at once: one each), shedding a flood's
        # own first; uvicorn's limit_concurrency is left unset, as it counts connections too
        # and would answer 503 to the very request the guard made room for.
        http="capi.intake.guard:GuardedProtocol",
        timeout_keep_alive=round(limits.idle_timeout_s),
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=5,  # a browser's idle keep-alive does not hold the stop
        **proxy_options(settings),  # type: ignore[arg-type]
    )
    _exit_quietly_after_shutdown()
    uvicorn.Server(config).run(sockets=[sock])


@click.command("console-token")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator"]),
    required=True,
    help="viewer reads; operator may also replay, purge and check keys.",
)
@click.pass_context
def console_token_command(ctx: click.Context, role: str) -> None:
    """Print a new console token, once, and its configuration line.

    Only the line (the token's SHA-256 and role) goes into the configuration; keep the
    token itself in a password manager. The line keeps the entries configured now, so it
    replaces the CAPI_CONSOLE_TOKENS_SHA256 line of config/capi.env (of two such lines,
    the last one counts).

    \b
    Example:
      capi console-token --role viewer
    """
    from capi.console import auth

    token = auth.new_token()
    kept = _configured_entries(ctx)
    entries = ",".join([*kept, f"{role}:{auth.digest(token)}"])
    out.print(f"token (shown once): {token}", markup=False)
    out.print(f"CAPI_CONSOLE_TOKENS_SHA256={entries}", markup=False)
    if kept:
        err.print(
            f"note: the line keeps the {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} "
            "configured now: replace the CAPI_CONSOLE_TOKENS_SHA256 line with it",
            markup=False,
        )


def _configured_entries(ctx: click.Context) -> list[str]:
    """The console token entries configured now (none where the settings cannot be read)."""
    try:
        configured = settings_from(ctx).console_tokens_sha256
    except ConfigError:
        return []
    return [e.strip() for e in (configured or "").split(",") if e.strip()]
