"""``capi verify``: read events back from the Advertiser API's event monitoring and compare
them with what capi delivered (:mod:`capi.verify`)."""

from __future__ import annotations

import time

import click
import httpx
import redis.asyncio as aioredis

from capi import destinations, tail
from capi.cli.common import handle_errors, out, print_json, redis_client, run, settings_from
from capi.cli.selection import destination_names, destination_option
from capi.destinations import Destination
from capi.exitcodes import ExitCode
from capi.fingerprint import fingerprint, shape_problem
from capi.settings import Settings
from capi.verify import ReadBackError, Report, compare, read_back

# What each failure of the read-back exits with.
_EXITS = {
    "key": ExitCode.CONFIG,
    "not_enabled": ExitCode.CONFIG,
    "unreachable": ExitCode.UNREACHABLE,
    "unreadable": ExitCode.UNEXPECTED_RESPONSE,
}


@click.command("verify")
@destination_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per destination.")
@click.option(
    "--grace",
    "grace_s",
    default=120.0,
    show_default=True,
    type=click.FloatRange(0, 900),
    help="Seconds a delivery may take to show in the stream before it counts as missing.",
)
@click.pass_context
@handle_errors
def verify_command(
    ctx: click.Context, destination: str | None, as_json: bool, grace_s: float
) -> None:
    """Check that the API shows the events capi delivered.

    Reads the pixel's recent events (a sample of up to 50 from the last ~15 minutes) from
    the Advertiser API's event monitoring, with an Advertiser API key (advertiser_key_env or
    advertiser_key_file on a destination, CAPI_ADVERTISER_KEY for the single-pixel set-up;
    never the Conversion Key), and compares them with capi's deliveries in that window:
    how many the API shows, which it does not show yet, and which ids came from both the
    browser Pixel and capi.

    Exit 0 when what the API shows agrees with what capi sent; 1 when deliveries are
    missing or there is nothing to compare yet; 3 without a usable Advertiser key or when
    the account has no event stream (404); 14 when the API cannot be reached; 15 when its
    answer cannot be read.

    \b
    Examples:
      capi verify
      capi verify --json --grace 0
    """
    settings = settings_from(ctx)
    names = destination_names(settings, destination)
    configured = destinations.parse_file(settings)
    code = run(_verify(settings, [configured[n] for n in names], as_json, grace_s))
    if code != ExitCode.OK:
        raise SystemExit(int(code))


async def _verify(
    settings: Settings, chosen: list[Destination], as_json: bool, grace_s: float
) -> ExitCode:
    worst = ExitCode.OK
    redis = redis_client(settings)
    try:
        async with httpx.AsyncClient(timeout=settings.request_timeout_s) as http:
            for dest in chosen:
                code, report, problem = await _one(settings, redis, http, dest, grace_s)
                worst = max(worst, code)
                if as_json:
                    print_json(
                        report.json() if report else {"destination": dest.name, "error": problem}
                    )
                else:
                    out.print(
                        report.message() if report else f"{dest.name}: {problem}", markup=False
                    )
    finally:
        await redis.aclose()
    return worst


async def _one(
    settings: Settings,
    redis: aioredis.Redis,
    http: httpx.AsyncClient,
    dest: Destination,
    grace_s: float,
) -> tuple[ExitCode, Report | None, str]:
    reads = dest.reads
    if reads is None:
        what = (
            "CAPI_ADVERTISER_KEY"
            if dest.name == destinations.DEFAULT_NAME
            else (f"advertiser_key_env or advertiser_key_file in [destinations.{dest.name}]")
        )
        return (
            ExitCode.CONFIG,
            None,
            f"no Advertiser API key is configured: set {what} to an Advertiser API key "
            "(Ads Manager -> Settings -> API keys; never the Conversion Key), and "
            "CAPI_ADS_API_BASE_URL if it is not https://api.ads.openai.com (capi sandbox "
            "prints both for itself)",
        )
    if not reads.api_key:
        return ExitCode.CONFIG, None, f"{reads.key_source} is not set or cannot be read"
    if problem := shape_problem(reads.api_key):
        what = problem.partition(";")[0]  # the rest speaks of the Conversion Key
        return (
            ExitCode.CONFIG,
            None,
            f"{reads.key_source} {what}; an Advertiser API key is printable ASCII without "
            "spaces: copy it again (the key is not shown)",
        )
    if dest.api_key and reads.api_key == dest.api_key:
        return (
            ExitCode.CONFIG,
            None,
            f"{reads.key_source} holds the Conversion Key ({fingerprint(dest.api_key)}); "
            "read-back needs an Advertiser API key (Ads Manager -> Settings -> API keys)",
        )
    if not dest.pixel_id:
        return ExitCode.CONFIG, None, "no pixel id is configured"
    try:
        sample = await read_back(
            http, reads.base_url, dest.pixel_id, reads.api_key, reads.key_source
        )
    except ReadBackError as exc:
        return _EXITS[exc.kind], None, str(exc)
    ring = {dest.name: settings.keys.for_destination(dest.name).tail}
    lines, _ = await tail.recent(redis, ring, 0, whole=True)
    report = compare(dest.name, lines, sample, now_ms=int(time.time() * 1000), grace_s=grace_s)
    return (ExitCode.OK if report.consistent else ExitCode.FAILURE), report, ""
