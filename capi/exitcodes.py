"""Named exit codes of the ``capi`` command; scripts may rely on them.

===  =====================  ===================================================
  0  OK                     done, or nothing to do
  1  FAILURE                an unexpected error
  2  USAGE                  bad command line (click's own code)
  3  CONFIG                 a setting is missing or invalid (also: the endpoint answered
                            404, or refused a request-level field such as pid)
  4  REFUSED                some events were refused (enqueue), or would be (replay --dry-run)
  5  REDIS                  Redis cannot be reached, did not answer in time, or refused
  6  REDIS_FULL             Redis is full (maxmemory under noeviction): nothing was queued
  7  NOT_FOUND              a dead letter named by id does not exist (show, replay)
 10  MISSING_SCOPE          the key lacks ads.third_party_events.write
 11  UNAUTHORIZED           the key is unknown or revoked
 12  UNKNOWN_PIXEL          the pixel id is unknown for this key
 13  ACCESS_DENIED          the platform denied access (RBAC)
 14  UNREACHABLE            the endpoint could not be reached or kept failing (5xx, 429)
 15  UNEXPECTED_RESPONSE    the endpoint answered in an unrecognised way
===  =====================  ===================================================
"""

from __future__ import annotations

from enum import IntEnum

from capi.failures import Reason


class ExitCode(IntEnum):
    """Exit codes of the ``capi`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    REFUSED = 4
    REDIS = 5
    REDIS_FULL = 6
    NOT_FOUND = 7
    MISSING_SCOPE = 10
    UNAUTHORIZED = 11
    UNKNOWN_PIXEL = 12
    ACCESS_DENIED = 13
    UNREACHABLE = 14
    UNEXPECTED_RESPONSE = 15


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done, or nothing to do",
    ExitCode.FAILURE: "an unexpected error, or a check that did not pass (capi health)",
    ExitCode.USAGE: "bad command line (a misspelled option or value)",
    ExitCode.CONFIG: "a setting is missing or invalid (the message names it; also a 404 "
    "from the endpoint, or a request-level field it refused)",
    ExitCode.REFUSED: "some events were refused (capi enqueue), or would be (replay --dry-run)",
    ExitCode.REDIS: "Redis cannot be reached, did not answer in time, or refused",
    ExitCode.REDIS_FULL: "Redis is full (maxmemory under noeviction): nothing was queued",
    ExitCode.NOT_FOUND: "a dead letter named by id does not exist (dead-letters show, replay)",
    ExitCode.MISSING_SCOPE: "the key lacks ads.third_party_events.write",
    ExitCode.UNAUTHORIZED: "the key is unknown or revoked",
    ExitCode.UNKNOWN_PIXEL: "the pixel id is unknown for this key",
    ExitCode.ACCESS_DENIED: "the platform denied access (RBAC)",
    ExitCode.UNREACHABLE: "the endpoint could not be reached or kept failing (5xx, 429)",
    ExitCode.UNEXPECTED_RESPONSE: "the endpoint answered in an unrecognised way",
}
"""What each exit code means, as ``capi exit-codes`` prints it."""

_BY_REASON = {
    Reason.MISSING_SCOPE: ExitCode.MISSING_SCOPE,
    Reason.UNAUTHORIZED: ExitCode.UNAUTHORIZED,
    Reason.UNKNOWN_PIXEL: ExitCode.UNKNOWN_PIXEL,
    Reason.ACCESS_DENIED: ExitCode.ACCESS_DENIED,
    Reason.NETWORK: ExitCode.UNREACHABLE,
    Reason.SERVER_ERROR: ExitCode.UNREACHABLE,
    Reason.RATE_LIMITED: ExitCode.UNREACHABLE,
    Reason.NOT_FOUND: ExitCode.CONFIG,  # CAPI_BASE_URL is wrong
    Reason.REQUEST_INVALID: ExitCode.CONFIG,  # a setting sent with every request is wrong
}


def for_reason(reason: Reason) -> ExitCode:
    """The exit code of a key check that failed for ``reason``."""
    return _BY_REASON.get(reason, ExitCode.UNEXPECTED_RESPONSE)
