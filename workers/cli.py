"""The ``capi`` console script: capi's commands plus ``capi worker``, which needs arq."""

from __future__ import annotations

import sys

import click

from capi.cli import cli
from capi.cli.common import err, handle_errors, note_default_redis, settings_from
from capi.cli.selection import destination_names
from capi.errors import KeyCheckFailed
from capi.exitcodes import for_reason


@cli.command("worker")
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once nothing is queued, in flight or scheduled (exit 5 once Redis has not "
    "answered for CAPI_REDIS_TIMEOUT_S).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--log-json", is_flag=True, help="JSON log lines (or CAPI_LOG_FORMAT=json).")
@click.option(
    "--destination",
    metavar="NAME[,NAME...]",
    help="Serve only these destinations (default: every one configured).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve /metrics, /healthz, /readyz here.",
)
@click.pass_context
@handle_errors
def worker_command(
    ctx: click.Context,
    burst: bool,
    verbose: bool,
    log_json: bool,
    destination: str | None,
    metrics_port: int | None,
) -> None:
    """Run a worker: check the key, then send queued events until stopped.

    The worker refuses to start (exit 10-13, with the diagnosis) if the Conversion Key
    or pixel is confirmed broken (15: the endpoint answers in a way capi does not
    recognise); queued events stay queued. An endpoint that fails
    transiently, or a Redis that is away, full or read-only, is waited out: the worker
    never stops by itself (but with --burst, a Redis that does not answer for
    CAPI_REDIS_TIMEOUT_S ends it: exit 5). SIGTERM stops it gracefully.
    Run as many as you like, on as many machines, against one Redis.

    \b
    Examples:
      capi worker
      capi worker --burst            # drain the queue, then exit
      arq workers.main.WorkerSettings
    """
    from capi.worker.runner import run_worker  # here, so other commands start without it

    settings = settings_from(ctx)
    overrides: dict[str, object] = {}
    if log_json:
        overrides["log_format"] = "json"
    if verbose:
        overrides["log_level"] = "debug"
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    settings = settings.model_copy(update=overrides)
    only = destination_names(settings, destination) if destination else []
    note_default_redis(settings)
    try:
        run_worker(settings, burst=burst, only=only)
    except KeyCheckFailed as exc:
        err.print(exc.diagnosis, markup=False)
        err.print("The worker did not start; queued events stay queued.", markup=False)
        sys.exit(for_reason(exc.error.reason))


def main() -> None:
    """Entry point of the ``capi`` command."""
    cli()


if __name__ == "__main__":
    main()
