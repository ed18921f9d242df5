"""``capi serve`` (the HTTP intake) and ``capi intake-token``; registered in main.py.

uvicorn and :mod:`capi.intake` are imported inside the commands, so ``capi --help`` and
every other command start without them."""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import orjson

from capi import destinations, logs
from capi.cli import grants
from capi.cli.common import PrivateFile, err, fail, handle_errors, out, print_json, settings_from
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.settings import DEFAULT_CONFIG_FILE, Settings

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
      capi intake-token --write --output intake-token.json   # grant a token; file 0600
      capi serve --port 8080
      curl -sS http://127.0.0.1:8080/readyz
    """
    import uvicorn

    from capi.intake import tokens
    from capi.intake.app import Intake

    settings = settings_from(ctx)
    # The error below says it when the tokens ignored were the only ones; otherwise the
    # warning is logged once below, for every server process (they do not repeat it).
    grants = tokens.read_grants(settings, warn=False)
    if not grants:
        path = destinations.source(settings)
        raise ConfigError(
            (
                f"no intake token is granted in the destinations file {path} "
                "(intake_tokens_sha256; CAPI_INTAKE_TOKENS_SHA256 grants nothing while a "
                "destinations file is in use)"
                if path is not None
                else "no intake token is configured (CAPI_INTAKE_TOKENS_SHA256)"
            )
            + "; capi intake-token --write makes one and grants it"
        )
    configure_logging(settings)
    tokens.warn_if_ignored(settings)
    options = server_options(settings)
    granted = destinations.listed(n for names in grants.values() for n in names)
    sock = listening_socket(host, port, backlog=2048)  # bound here: the port said is the one
    where = url_of(host, sock)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        config_file = ctx.ensure_object(dict).get("config_file")
        if config_file:
            os.environ["CAPI_CONFIG_FILE"] = str(config_file)
        out.print(f"capi serve on {where} ({workers} processes; for {granted})", markup=False)
        sys.stdout.flush()
        _exit_quietly_after_shutdown()
        config = uvicorn.Config(
            "capi.cli.intake_commands:app_from_environment",
            factory=True,
            workers=workers,
            **options,
        )
        sock.set_inheritable(True)  # what uvicorn.run does with the socket it binds
        Multiprocess(config, sockets=[sock]).run()
        return
    config = uvicorn.Config(Intake(settings, warned=True), **options)
    out.print(f"capi serve on {where} (for {granted})", markup=False)
    sys.stdout.flush()
    _exit_quietly_after_shutdown()
    tune_gc()
    uvicorn.Server(config).run(sockets=[sock])


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for ``capi serve`` (also the intake benchmark's floor server's)."""
    return {
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "capi.intake.guard:GuardedProtocol",  # the limits: docs/intake-security.md
        "lifespan": "on",
        "server_header": False,
        "timeout_keep_alive": settings.intake_idle_timeout_s,
        **proxy_options(settings),
        "timeout_graceful_shutdown": max(1, round(settings.shutdown_timeout_s)),
    }


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A socket listening on ``host:port`` (an IPv6 address too) for uvicorn; exit 3 with
    what to do when the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        why = (exc.strerror or str(exc)).split(" (while attempting to bind", 1)[0]
        if exc.errno == errno.EADDRINUSE:
            fail(
                f"--port {port}: cannot listen on {host}:{port} ({why}); choose another "
                "port, or --port 0 for a free one",
                ExitCode.CONFIG,
            )
        fail(
            f"--host {host}: cannot listen on {host}:{port} ({why}); give an address of this "
            "machine (127.0.0.1, ::1, or 0.0.0.0 for every one)",
            ExitCode.CONFIG,
        )


def url_of(host: str, sock: socket.socket) -> str:
    """The base URL a server on ``sock`` answers at (an IPv6 address in brackets)."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def proxy_options(settings: Settings) -> dict[str, object]:
    """uvicorn's X-Forwarded-For handling: only from CAPI_TRUSTED_PROXIES, if set."""
    trusted = [p.strip() for p in (settings.trusted_proxies or "").split(",") if p.strip()]
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": trusted}


def tune_gc() -> None:
    """Python's cyclic garbage collector set for a server, once startup is done: what
    startup made (modules, schemas, settings: tens of thousands of objects) is frozen, so
    the collector never walks it again, and the youngest generation is collected every
    10,000 allocations rather than 700 (a request's garbage is freed by reference counting;
    the collector only finds cycles): about 8% less CPU per single-event request at
    saturation (an A/B run of three alternating rounds: 102-110 against 112-127 us)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _exit_quietly_after_shutdown() -> None:
    """After a graceful shutdown uvicorn raises the signal it caught again, for the handler
    that was there before it; these handlers let the command then end with exit code 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def configure_logging(settings: Settings) -> None:
    """JSON lines on stderr, access records with their fields, the key (if any) redacted."""
    from capi.intake.app import AccessFormatter

    key = settings.api_key.get_secret_value() if settings.api_key else ""
    level = getattr(logging, settings.log_level.upper())
    logs.configure(json=True, level=level, key=key, per_turn=True)
    # A line per request: skip what no capi formatter prints (the logging HOWTO's
    # "Optimization": caller's file and line, thread, process).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for handler in logging.getLogger().handlers:
        handler.setFormatter(AccessFormatter())


def app_from_environment() -> Intake:
    """The intake of one server process of ``capi serve --workers N`` (settings from the
    environment and CAPI_CONFIG_FILE; what ``capi serve`` warned of at start is not said
    again)."""
    from capi.intake.app import Intake

    settings = Settings.load()
    configure_logging(settings)
    intake = Intake(settings, warned=True)
    tune_gc()
    return intake


@click.command("intake-token")
@click.option(
    "--destination",
    metavar="NAME",
    help="The destination it grants (default: the only one configured).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--write",
    is_flag=True,
    help="Grant it: add its SHA-256 to the configuration in place (config/capi.env, or the "
    "destination's table in the destinations file).",
)
@click.option(
    "-o",
    "--output",
    type=PrivateFile(new=True, why=" (it may hold a token clients still use)"),
    help="Write the JSON object (token included) to this new file, mode 0600, not to stdout.",
)
@click.pass_context
@handle_errors
def intake_token_command(
    ctx: click.Context,
    destination: str | None,
    as_json: bool,
    write: bool,
    output: IO[bytes] | None,
) -> None:
    """Make a new intake token for capi serve, and print it once with how to grant it.

    Only the token's SHA-256 goes in the configuration; the token itself is shown here
    once: hand it to the client that will POST events, and keep it out of logs and
    repositories. --write adds the SHA-256 to the configuration for you (to the one
    CAPI_INTAKE_TOKENS_SHA256 line of config/capi.env, or to intake_tokens_sha256 of
    the destination's own table in the destinations file). To revoke a token, remove
    its SHA-256 from the configuration.

    \b
    Examples:
      capi intake-token --write
      capi intake-token --write --output intake-token.json   # the token, mode 0600
      jq -r .token intake-token.json
    """
    settings = settings_from(ctx)
    destination = _granted(settings, destination)
    from capi.intake import tokens

    token = tokens.new_token()
    digest = tokens.digest(token)
    path = destinations.source(settings)
    note, line = _write(settings, path, destination, digest) if write else ("", "")
    if path is None:
        digests = [*destinations.default_token_digests(settings), digest]
        line = line or f"CAPI_INTAKE_TOKENS_SHA256={','.join(dict.fromkeys(digests))}"
        env_file = settings.config_file_path() or str(DEFAULT_CONFIG_FILE)
        how = (
            f"set this one line in {env_file} (replacing any CAPI_INTAKE_TOKENS_SHA256 "
            "line there: the last one counts); capi serve picks the change up by itself"
        )
    else:
        line = f'intake_tokens_sha256 = ["{digest}"]'
        how = (
            f"add the SHA-256 to intake_tokens_sha256 in the [destinations.{destination}] "
            f"table of {path} (inside that table, not at the end of the file, where it would "
            "belong to the last table); capi serve picks the change up by itself"
        )
    data = {
        "token": token,
        "sha256": digest,
        "destination": destination,
        "config_line": line,
        "config_file": str(path) if path is not None else None,
        "written": write,
    }
    if output is not None:
        output.write(orjson.dumps(data) + b"\n")
        out.print(f"token for {destination!r} written to {output.name} (mode 0600)", markup=False)
        if _git_would_offer(output.name):
            err.print(
                f"warning: {output.name} is inside a git checkout and not git-ignored; it holds "
                "the token: add its name to .gitignore or move it out of the checkout, and "
                "never commit it",
                markup=False,
            )
    elif as_json:
        print_json(data)
    else:
        out.print(
            f"New intake token for destination {destination!r}, shown only this once (give it "
            f"to the client; keep it secret):\n  {token}\nIts SHA-256:\n  {digest}",
            markup=False,
        )
    if write:
        err.print(f"granted: {note or 'its SHA-256 is in the configuration'}", markup=False)
    elif not as_json and output is None:
        out.print(f"Grant it: run this again with --write, or {how}:\n  {line}", markup=False)


def _git_would_offer(path: str) -> bool:
    """Whether ``path`` is in a git work tree and not ignored there, so that ``git add .``
    would take it (best effort: False without git, outside a checkout, or for stdout)."""
    git = shutil.which("git")
    if git is None or not os.path.isfile(path):
        return False
    full = os.path.abspath(path)
    try:
        found = subprocess.run(  # noqa: S603 (git found on PATH, fixed arguments)
            [git, "check-ignore", "-q", "--", full],
            cwd=os.path.dirname(full),
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 1  # 0: ignored; 128: not a checkout, or git failed


def _granted(settings: Settings, destination: str | None) -> str:
    """The destination a new token grants: the one named, or the only one."""
    names = destinations.names(settings)
    if destination is None:
        if len(names) != 1:
            fail(
                "--destination: name the destination the token grants; they are: "
                + ", ".join(names),
                ExitCode.USAGE,
            )
        return names[0]
    if destination not in names:
        fail(
            f"--destination: {destination[:64]!r} is not configured; the destinations are: "
            + ", ".join(names),
            ExitCode.USAGE,
        )
    return destination


def _write(settings: Settings, path: Path | None, destination: str, digest: str) -> tuple[str, str]:
    """Add the digest to the configuration file in place; a note on what was done, and
    the env file's line as written (empty for the destinations file)."""
    if path is None:
        env_file = Path(settings.config_file_path() or DEFAULT_CONFIG_FILE)
        text, line, note = grants.grant_in_env_file(env_file, digest)
        grants.replace(env_file, text)
        where = f"CAPI_INTAKE_TOKENS_SHA256 in {env_file}"
        follows = "capi serve picks it up by itself within a second"
        if "CAPI_INTAKE_TOKENS_SHA256" in os.environ:
            where += (
                "; but CAPI_INTAKE_TOKENS_SHA256 is also set in the environment, which wins "
                "over the file: add the SHA-256 there too"
            )
            follows = "then restart capi serve (its environment cannot change while it runs)"
        done = "; ".join(filter(None, [f"added to {where}", note, follows]))
        return done, line
    text = grants.grant_in_destinations_file(path, destination, digest)
    destinations.parse(text, path, settings, {}, keys="skip")  # still a valid file
    grants.replace(path, text)
    done = (
        f"added to intake_tokens_sha256 of [destinations.{destination}] in {path}; "
        "capi serve picks it up by itself"
    )
    return done, ""
