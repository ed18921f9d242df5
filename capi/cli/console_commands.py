"""``capi console`` (the operator console in the browser) and ``capi console-token``;
registered in main.py.

uvicorn, Starlette and :mod:`capi.console` are imported inside the command, so ``capi
--help`` and every other command start without them."""

from __future__ import annotations

import sys

import click

from capi.cli.common import handle_errors, out, settings_from
from capi.cli.intake_commands import (
    _exit_quietly_after_shutdown,
    listening_socket,
    proxy_options,
)
from capi.errors import ConfigError


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

    settings = settings_from(ctx)
    if not settings.console_tokens_sha256:
        raise ConfigError(
            "no console token is configured (CAPI_CONSOLE_TOKENS_SHA256); capi console-token "
            "--role operator prints one and its configuration line"
        )
    sock = listening_socket(host, port, backlog=256)
    where = f"http://{host}:{sock.getsockname()[1]}"

    def ready() -> None:  # said once uvicorn serves: Ctrl-C from then on stops it
        out.print(f"capi console on {where}", markup=False)
        sys.stdout.flush()

    config = uvicorn.Config(
        Console(settings, ready).app,
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
def console_token_command(role: str) -> None:
    """Print a new console token, once, and its configuration line.

    Only the line (the token's SHA-256 and role) goes into the configuration; keep the
    token itself in a password manager. Add several lines' entries comma-separated.

    \b
    Example:
      capi console-token --role viewer
    """
    from capi.console import auth

    token = auth.new_token()
    out.print(f"token (shown once): {token}", markup=False)
    out.print(f"CAPI_CONSOLE_TOKENS_SHA256={role}:{auth.digest(token)}", markup=False)
