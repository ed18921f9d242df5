"""The ``capi`` click group and its library-side commands."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import click
import redis.exceptions
from rich.table import Table
from rich.text import Text

from capi import __version__, destinations, replay
from capi.cli.common import (
    cli_actor,
    err,
    fail,
    handle_errors,
    out,
    print_json,
    run,
    settings_from,
)
from capi.cli.selection import destination_names
from capi.client import ConversionsClient
from capi.exitcodes import MEANINGS, ExitCode, for_reason
from capi.keycheck import KeyCheck, check_key
from capi.redisconn import brief
from capi.sandbox import Fault, SandboxState
from capi.sandbox.server import start
from capi.sandbox.state import FAULT_KINDS
from capi.settings import Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from capi.worker.keyguard import Hold


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="capi", message="%(prog)s %(version)s")
@click.option(
    "--config",
    "config_file",
    envvar="CAPI_CONFIG_FILE",
    type=click.Path(dir_okay=False),
    help="Env file with CAPI_* settings (default: config/capi.env if present).",
)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """capi: send conversion events to the OpenAI Ads Conversions API, safely.

    Settings come from CAPI_* environment variables (CAPI_API_KEY, CAPI_PIXEL_ID,
    CAPI_REDIS_URL, ...) or config/capi.env.

    \b
    Example:
      capi demo
    """
    ctx.ensure_object(dict)["config_file"] = config_file


@cli.command("check-key")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--destination",
    metavar="NAME[,NAME...]",
    help="Check only these destinations (default: all).",
)
@click.pass_context
@handle_errors
def check_key_command(ctx: click.Context, as_json: bool, destination: str | None) -> None:
    """Prove the Conversion Key can write events (a validate_only request).

    Exits 0 when it can; otherwise prints the diagnosis and exits with a code naming the
    cause (10 missing scope, 11 unauthorized, 12 unknown pixel, 13 access denied,
    14 unreachable, 15 unexpected). The key itself is never printed. With several
    destinations each is checked, a table is printed, and the exit code is 0 only if
    every one passes (else the code of the first that failed).

    The key is read from CAPI_API_KEY in config/capi.env (or --config FILE) or the
    environment; never type it on a command line, where shell history keeps it.

    \b
    Examples:
      capi check-key
      capi check-key --json | jq .ok
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)
    configured = destinations.load(settings)
    chosen = [configured[n] for n in names]

    async def one(dest: destinations.Destination) -> tuple[KeyCheck, str]:
        timeout_s = min(settings.request_timeout_s, 15.0)
        async with ConversionsClient.for_destination(dest, timeout_s=timeout_s) as client:
            found = await check_key(
                client, confirmations=settings.probe_confirmations, api_key=dest.api_key
            )
            return found, client.url

    async def go() -> tuple[list[KeyCheck], dict[str, _Hold]]:
        client = settings.async_redis()
        try:
            holds = await _holds(client, settings, names)  # before the probes: see below
            checked = await asyncio.gather(*(one(d) for d in chosen))
            if holds is None:
                return [c for c, _ in checked], {}
            return [c for c, _ in checked], await _release_holds(
                client, settings, holds, checked, names
            )
        finally:
            await client.aclose()

    results, holds = run(go())
    if len(chosen) == 1:
        _report_one(results[0], chosen[0].base_url, as_json, holds.get(chosen[0].name))
        if not as_json:
            _say_holds(holds, several=len(configured) > 1)
        return
    failed = [r for r in results if not r.ok]
    if as_json:
        print_json(
            {
                "ok": not failed,
                "destinations": [
                    {"name": d.name, **_check_json(r, d.base_url, holds.get(d.name))}
                    for d, r in zip(chosen, results, strict=True)
                ],
            }
        )
    else:
        table = Table("destination", "pixel", "key", "result", box=None)
        for d, r in zip(chosen, results, strict=True):
            verdict = "OK" if r.ok else f"FAILED: {r.error.reason.value if r.error else '?'}"
            table.add_row(Text(d.name), Text(d.pixel_id), Text(r.key_fingerprint), verdict)
        out.print(table)
        _say_holds(holds, several=len(configured) > 1)
        for d, r in zip(chosen, results, strict=True):
            if not r.ok and r.diagnosis is not None:
                err.print(f"\ndestination {d.name}:\n{r.diagnosis.text}", markup=False)
    if failed:
        assert failed[0].error is not None
        sys.exit(for_reason(failed[0].error.reason))


@dataclasses.dataclass(frozen=True, slots=True)
class _Hold:
    """What became of a destination's hold: released; kept (held for another key, pixel or
    endpoint); held (the check failed); again (held anew after the probe); none (not
    held). ``reason`` is the hold's; ``dead_lettered`` says whether its batches were."""

    what: str
    reason: str = ""
    dead_lettered: bool = False


async def _holds(
    client: aioredis.Redis, settings: Settings, names: list[str]
) -> dict[str, Hold | None] | None:
    """Each destination's hold (None: not held), or None when Redis does not answer (said
    in a note: a hold then waits for the workers' next re-probe)."""
    from capi.worker import keyguard  # the owner of the key state (not loaded for --help)

    try:
        return {
            n: await keyguard.read_hold(client, settings.keys.for_destination(n)) for n in names
        }
    except (redis.exceptions.RedisError, OSError) as exc:
        err.print(
            f"note: Redis did not answer ({brief(exc)}): a destination held for this key "
            "resumes at the workers' next re-probe (CAPI_REPROBE_INTERVAL_S)",
            markup=False,
        )
        return None


async def _release_holds(
    client: aioredis.Redis,
    settings: Settings,
    holds: dict[str, Hold | None],
    checked: list[tuple[KeyCheck, str]],
    names: list[str],
) -> dict[str, _Hold]:
    """Release the holds of destinations whose check passed with the workers' own key,
    pixel and endpoint (the workers would wait for their next re-probe,
    CAPI_REPROBE_INTERVAL_S), each audited with who ran the check. A hold confirmed for
    another key, pixel or endpoint stays: this check does not speak for those workers. A
    hold confirmed after the probe stays too (it was read before, and is released only
    if it is still the one in Redis)."""
    from capi.worker import keyguard

    found: dict[str, _Hold] = {}
    try:
        for name, (result, url) in zip(names, checked, strict=True):
            hold, keys = holds.get(name), settings.keys.for_destination(name)
            if hold is None:
                found[name] = _Hold("none")
            elif not result.ok:
                found[name] = _Hold("held", hold.reason)
            elif not hold.same_setup(result.key_fingerprint, result.pixel_id, url):
                found[name] = _Hold("kept", hold.reason)
            elif await keyguard.release(client, keys, hold):
                found[name] = _Hold("released", hold.reason, hold.dead_lettered)
                why = f"passed capi check-key: hold ({hold.reason}) released"
                await replay.audit_key_check(client, keys, ok=True, reason=why, by=cli_actor())
            elif newer := await keyguard.read_hold(client, keys):
                found[name] = _Hold("again", newer.reason)  # confirmed after the probe
            else:
                found[name] = _Hold("none")
    except (redis.exceptions.RedisError, OSError) as exc:
        err.print(f"note: Redis did not answer ({brief(exc)}): no hold released", markup=False)
    return found


def _say_holds(holds: dict[str, _Hold], *, several: bool = False) -> None:
    """What became of each hold; ``several``: the deployment has more than one destination
    (one of them may be named "default"), so a replay it suggests names its destination."""
    for name, hold in holds.items():
        if hold.what == "released":
            alone = name == destinations.DEFAULT_NAME and not several
            only = "" if alone else f"--destination {name} "  # not every one's
            then = (
                "replay what was dead-lettered meanwhile: capi dead-letters replay "
                f"{only}--reason {hold.reason}"
                if hold.dead_lettered
                else "the events kept queued meanwhile are sent"
            )
            out.print(
                f"destination {name}: was held ({hold.reason}) for this key, pixel and "
                f"endpoint; released now, the workers resume within seconds; {then}",
                markup=False,
            )
        elif hold.what == "again":
            err.print(
                f"destination {name}: held again ({hold.reason}) after this check's probe: "
                "not released; run capi check-key again",
                markup=False,
            )
        elif hold.what == "kept":
            err.print(
                f"destination {name}: held ({hold.reason}) by workers with another key, pixel "
                "or endpoint than this check's: not released; restart them with the settings "
                "checked here",
                markup=False,
            )


def _report_one(result: KeyCheck, base_url: str, as_json: bool, hold: _Hold | None) -> None:
    if as_json:
        print_json(_check_json(result, base_url, hold))
    elif result.ok:
        out.print(
            f"OK: the Conversion Key {result.key_fingerprint} can write events to pixel "
            f"{result.pixel_id!r} at {base_url}.",
            markup=False,  # the pixel id and URL are data, never markup
        )
    else:
        assert result.diagnosis is not None
        err.print(result.diagnosis.text, markup=False)
    if not result.ok:
        assert result.error is not None
        sys.exit(for_reason(result.error.reason))


def _check_json(result: KeyCheck, base_url: str, hold: _Hold | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ok": result.ok,
        "key_fingerprint": result.key_fingerprint,
        "pixel_id": result.pixel_id,
        "base_url": base_url,
        "probes": result.probes,
        "hold": hold.what if hold is not None else "unknown",  # unknown: Redis did not answer
    }
    if result.error is not None and result.diagnosis is not None:
        data.update(
            reason=result.error.reason.value,
            status=result.error.status,
            message=result.error.response.message,
            request_ids=result.request_ids,
            cause=result.diagnosis.cause,
            fix=result.diagnosis.fix,
            exit_code=int(for_reason(result.error.reason)),
        )
    return data


@cli.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    default=8787,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.option("--key", "keys", multiple=True, help="A Conversion Key the sandbox accepts.")
@click.option("--scopeless-key", "scopeless", multiple=True, help="A key lacking the scope.")
@click.option("--pixel", "pixels", multiple=True, help="A pixel id the sandbox knows.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    help="KIND[:opt=val,...], e.g. missing_scope:every=7 or rate_limit:rate=0.05,retry_after_s=1",
)
@click.option("--seed", default=0, type=int, help="Seed for random faults.")
def sandbox_command(
    host: str,
    port: int,
    keys: tuple[str, ...],
    scopeless: tuple[str, ...],
    pixels: tuple[str, ...],
    faults: tuple[str, ...],
    seed: int,
) -> None:
    """Run a local imitation of the events endpoint, with fault injection.

    Fault kinds: missing_scope, rbac, unauthorized, rate_limit, server_error, drop
    (commit the batch, then close the connection without answering), latency.
    Control it at runtime: POST /_sandbox/config, GET /_sandbox/state.

    \b
    Example:
      capi sandbox --port 8787 --fault missing_scope:every=7 --fault drop:rate=0.02
      CAPI_BASE_URL=http://127.0.0.1:8787 capi check-key
    """
    state = SandboxState(
        conversion_keys=set(keys) or None,
        scopeless_keys=set(scopeless) or None,
        pixels=set(pixels) or None,
        seed=seed,
    )
    try:
        state.faults = [_parse_fault(spec) for spec in faults]
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_sandbox(state, host, port))


async def _serve_sandbox(state: SandboxState, host: str, port: int) -> None:
    """Bind first, then say where (the real port, also for --port 0), then serve."""
    try:
        server = await start(state, host, port)
    except OSError as exc:
        fail(
            f"--port {port}: the sandbox cannot listen on {host}:{port} ({exc.strerror}); "
            "choose another port, or --port 0 for a free one",
            ExitCode.CONFIG,
        )
    bound = server.sockets[0].getsockname()[1]
    cfg = state.config()
    lines = [
        f"capi sandbox on http://{host}:{bound}",
        f"  Conversion Key(s): {', '.join(cfg['conversion_keys'])}",
        f"  scopeless key(s):  {', '.join(cfg['scopeless_keys'])}",
        f"  pixel(s):          {', '.join(cfg['pixels'])}",
        f"  read-back (capi verify): CAPI_ADS_API_BASE_URL=http://{host}:{bound} "
        f"CAPI_ADVERTISER_KEY={', '.join(sorted(state.monitoring.advertiser_keys))}",
        *(f"  fault: {_shown_fault(f)}" for f in state.faults),
    ]
    out.print("\n".join(lines), markup=False)
    async with server:
        await server.serve_forever()


def _shown_fault(fault: Fault) -> str:
    """A fault as --fault takes it: its kind and the options that are not defaults."""
    defaults = Fault(fault.kind)
    opts = [
        f"{name}={value}"
        for name, value in vars(fault).items()
        if name != "kind" and value != getattr(defaults, name)
    ]
    return fault.kind + (":" + ",".join(opts) if opts else "")


def _parse_fault(spec: str) -> Fault:
    kind, _, opts = spec.partition(":")
    if kind not in FAULT_KINDS:
        raise ValueError(f"{kind!r} is not a fault kind; the kinds are: {', '.join(FAULT_KINDS)}")
    names = [f.name for f in dataclasses.fields(Fault) if f.name != "kind"]
    kwargs: dict[str, Any] = {}
    for opt in filter(None, opts.split(",")):
        name, _, value = opt.partition("=")
        if name not in names:
            raise ValueError(f"{kind}: {name!r} is no fault option; they are: {', '.join(names)}")
        number = float if name in ("rate", "retry_after_s") else int
        try:
            kwargs[name] = number(value)
        except ValueError:
            what = "a number" if number is float else "a whole number"
            raise ValueError(f"{kind}: {name} must be {what}, got {value!r}") from None
    return Fault(kind=kind, **kwargs)  # type: ignore[arg-type]


@cli.command("exit-codes")
def exit_codes_command() -> None:
    """List the exit codes capi uses.

    \b
    Example:
      capi check-key; echo $?    # 10 means: the key lacks ads.third_party_events.write
    """
    for code in ExitCode:
        out.print(f"{int(code):>3}  {code.name:<20} {MEANINGS[code]}", markup=False)


@cli.command("demo")
@click.pass_context
@handle_errors
def demo_command(ctx: click.Context) -> None:
    """Run the whole story locally: enqueue, send, dead-letter with guidance, replay.

    Needs nothing running: it starts an embedded Redis-compatible server and the sandbox.
    With CAPI_REDIS_URL set it uses that Redis (under a throwaway prefix); with a real key
    set it checks it with validate_only, and sends demo events only to the sandbox.

    \b
    Example:
      capi demo
    """
    from capi.demo import Demo  # here: it loads the worker and the embedded server

    Demo(out, settings_from(ctx)).run()


# The intake's commands live in their own module; the group is defined above.
from capi.cli.console_commands import console_command, console_token_command  # noqa: E402
from capi.cli.intake_commands import intake_token_command, serve_command  # noqa: E402
from capi.cli.tail_commands import tail_command  # noqa: E402
from capi.cli.verify_commands import verify_command  # noqa: E402

cli.add_command(console_command)
cli.add_command(console_token_command)
cli.add_command(serve_command)
cli.add_command(intake_token_command)
cli.add_command(tail_command)
cli.add_command(verify_command)
