"""Diagnosis: turn a failure into a reason code, a one-line cause and the fix.

The texts answer the four ways teams lose days to ``401 Missing scopes`` (the wrong key
type, a key whose edited permissions never took effect, a restricted key missing a parent
permission, and the platform's intermittent scope failures), and say what OpenAI support
asks for. They name the key only by its fingerprint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from capi.constants import CONVERSIONS_SCOPE
from capi.errors import SendError
from capi.failures import Reason
from capi.fingerprint import shape_hint

WHERE_KEYS_COME_FROM = (
    "Ads Manager -> Conversions -> Manage conversion keys (or POST "
    "https://api.ads.openai.com/v1/conversions/api_keys)"
)
BASE_URL_RULE = (
    "it is the API's base URL without a path (default https://bzr.openai.com); capi adds "
    "/v1/events itself"
)
NOT_THE_API = (
    'This answer is not in the API\'s error format ({"error": {...}}): CAPI_BASE_URL may '
    f"name another server. Check CAPI_BASE_URL: {BASE_URL_RULE}."
)
SUPPORT_ASKS = (
    "OpenAI support asks for the exact UTC time of a failing request, its request/trace ids "
    "and the email of whoever created the key, and never the key itself: "
    "`capi support-bundle` prints the first two."
)


@dataclass(frozen=True, slots=True)
class Labels:
    """How guidance names a destination's settings. Without a destinations file they are
    the ``CAPI_*`` settings; a destination of the file has its own entries there, its own
    key source (``$VAR`` or a file) and its own ``--destination`` on the commands that
    take one."""

    destination: str = "default"
    key: str = "CAPI_API_KEY"

    def apply(self, text: str) -> str:
        """``text`` (written for the ``CAPI_*`` settings) as it reads for this destination."""
        if self.key == "CAPI_API_KEY":
            return text
        d = self.destination
        for old, new in (
            ("CAPI_API_KEY", f"the key in {self.key} (destination {d})"),
            ("CAPI_PIXEL_ID", f"pixel_id of [destinations.{d}] in the destinations file"),
            ("CAPI_BASE_URL", f"base_url of [destinations.{d}] in the destinations file"),
            ("`capi check-key`", f"`capi check-key --destination {d}`"),
            ("`capi dead-letters replay ", f"`capi dead-letters replay --destination {d} "),
        ):
            text = text.replace(old, new)
        return text


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What went wrong, in one line, and what to do about it."""

    reason: Reason
    cause: str
    fix: list[str]

    @property
    def text(self) -> str:
        """The whole diagnosis as plain text, cause first, then the numbered fix."""
        steps = "\n".join(f"  {i}. {step}" for i, step in enumerate(self.fix, 1))
        return f"[{self.reason.value}] {self.cause}\nFix:\n{steps}"


def diagnose(
    error: SendError | Reason,
    *,
    reason: Reason | None = None,
    pixel_id: str | None = None,
    api_key: str | None = None,
    labels: Labels | None = None,
) -> Diagnosis:
    """Diagnose a failure; the key, if given, is used only for its shape, never shown.

    ``reason`` overrides the error's own (e.g. retries_exhausted after a server error);
    ``labels`` name the destination's settings (default: the ``CAPI_*`` ones).
    """
    err = error if isinstance(error, SendError) else None
    reason = reason or (error if isinstance(error, Reason) else error.reason)
    hint = shape_hint(api_key) if api_key else None
    found = _BUILDERS.get(reason, _unexpected)(reason, err, pixel_id, hint)
    if err is not None and reason in _KEY_OR_PIXEL and not _the_apis_format(err):
        found.fix.insert(0, NOT_THE_API)
    if labels is None:
        return found
    return Diagnosis(
        found.reason, labels.apply(found.cause), [labels.apply(step) for step in found.fix]
    )


def diagnose_probe(
    error: SendError,
    *,
    pixel_id: str | None = None,
    api_key: str | None = None,
    labels: Labels | None = None,
) -> Diagnosis:
    """Diagnose a failed key probe. Like :func:`diagnose`, except when the API refused the
    probe's own synthetic event: then the user's events are not to blame, and the likely
    cause is this machine's clock (the probe is stamped with it) or a changed API format."""
    if error.reason not in (Reason.INVALID_EVENT, Reason.OUTSIDE_TIME_WINDOW):
        return diagnose(error, pixel_id=pixel_id, api_key=api_key, labels=labels)
    if error.reason is Reason.INVALID_EVENT:
        what = _invalid_event(error.reason, error, pixel_id, None).cause.replace(
            "The API rejected this event.", "The API rejected it as invalid.", 1
        )
    else:
        what = "It is outside the API's window (older than 7 days, or over 10 minutes ahead)."
        what += _status(error)
    cause = (
        "The API refused capi's synthetic test event (a validate_only signup stamped with "
        "this machine's clock), not one of yours; the key and pixel were not the problem. "
    ) + what
    return Diagnosis(
        error.reason,
        cause,
        [
            "Check this machine's clock (`date -u`, NTP / timedatectl): an event it stamps "
            "'now' looks too old or too far ahead to the API, so it would refuse every event "
            "stamped here too.",
            "If the clock is right, the API's event format may have changed: compare its "
            "message above with docs/api-format.md and upgrade capi. " + SUPPORT_ASKS,
            "Then run `capi check-key` again; queued events stay queued meanwhile.",
        ],
    )


def _the_apis_format(err: SendError) -> bool:
    """Whether a failure came in a shape the API itself answers: its error envelope, or the
    platform's plain-text ``RBAC: access denied`` (seen from the live API, seed 003)."""
    return err.response.enveloped or "rbac" in err.response.message.lower()


def _fp(err: SendError | None) -> str:
    return f" {err.key_fingerprint}" if err and err.key_fingerprint else ""


def _status(err: SendError | None) -> str:
    if err is None:
        return ""
    said = err.response.message[:300]
    if not err.status:  # nothing answered: the message is capi's account of the failure
        return f" [no answer from the endpoint: {said!r}]" if said else " [no HTTP response]"
    bits = [f"HTTP {err.status}"]
    if err.request_id:
        bits.append(f"request id {err.request_id}")
    if said:
        who = "API said" if _the_apis_format(err) else "the endpoint answered"
        bits.append(f"{who}: {said!r}")
    return " [" + "; ".join(bits) + "]"


def _missing_scope(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    scopes = ", ".join(err.response.missing_scopes) if err and err.response.missing_scopes else ""
    scopes = scopes or CONVERSIONS_SCOPE
    cause = f"The key{_fp(err)} was recognised but lacks the scope {scopes}.{_status(err)}"
    wrong = (
        f"Use a Conversion Key from {WHERE_KEYS_COME_FROM}. Advertiser (Ads API) keys from "
        "Ads Manager -> Settings -> API keys and OpenAI platform keys (project, admin, "
        "service account) never carry this scope."
    )
    if hint:
        wrong += f" {hint}"
    return Diagnosis(
        reason,
        cause,
        [
            wrong,
            "Create a fresh Conversion Key instead of editing an existing one: permissions "
            "edited after a key was created are known not to take effect, while a new key "
            "works at once.",
            f"If the key is restricted, grant the parent permission itself, not only its "
            f"child toggles (a console showing 'Mixed' can still lack {scopes}).",
            "If this key worked moments ago, it may be the platform's intermittent scope "
            "failure: capi re-probes the key and retries instead of dead-lettering; "
            "`capi status` counts these. " + SUPPORT_ASKS,
            "Then run `capi check-key`, and `capi dead-letters replay --reason missing_scope`.",
        ],
    )


def _access_denied(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    return Diagnosis(
        reason,
        f"The platform denied access to the key{_fp(err)} (RBAC).{_status(err)}",
        [
            "This is usually transient on the platform side: capi re-probes the key and "
            "retries; nothing is lost meanwhile.",
            "If it persists, the key cannot write events: create a fresh Conversion Key in "
            f"{WHERE_KEYS_COME_FROM}.",
            SUPPORT_ASKS,
        ],
    )


def _unauthorized(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    steps = [
        "Check CAPI_API_KEY: no quotes, spaces or line breaks, and the whole key; compare "
        "its last four characters with the fingerprint above.",
        "If the key was revoked or deleted, create a new Conversion Key in "
        f"{WHERE_KEYS_COME_FROM}.",
        "Then run `capi check-key`, and `capi dead-letters replay --reason unauthorized`.",
    ]
    if hint and "not like a Conversion Key" in hint:
        steps.insert(0, f"{hint} This endpoint needs a Conversion Key.")
    return Diagnosis(
        reason,
        f"The API does not recognise the key{_fp(err)}: revoked, mistyped or truncated."
        f"{_status(err)}",
        steps,
    )


def _unknown_pixel(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    pid = f" {pixel_id!r}" if pixel_id else ""
    return Diagnosis(
        reason,
        f"The API does not know the pixel id{pid} for this key.{_status(err)}",
        [
            "Copy the pixel id (the pid of your pixel) from Ads Manager -> Conversions into "
            "CAPI_PIXEL_ID.",
            "The pixel must belong to the same ad account as the Conversion Key; a "
            "development key goes with the development pixel.",
            "Then run `capi check-key`. Running workers follow a destinations file by "
            "themselves; a pixel id set in CAPI_PIXEL_ID needs them restarted. The events kept "
            "queued meanwhile are then sent (none were dead-lettered for this).",
        ],
    )


def _names_field(param: object) -> bool:
    """Whether an error's ``param`` names a field of the event (``events[3].data.coupon``,
    ``data.coupon``), not only which event (``events[3]``)."""
    return isinstance(param, str) and bool(re.sub(r"^events\[\d+\]\.?", "", param).strip())


def _invalid_event(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    details = ""
    named = False
    error = err.response.body.get("error") if err and isinstance(err.response.body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("errors"), list):
        errors = [e for e in error["errors"][:20] if isinstance(e, dict)]
        details = "; ".join(
            f"{e.get('param')}: {e.get('message')} ({e.get('code')})" for e in errors
        )
        named = any(_names_field(e.get("param")) for e in errors)
    if not named and isinstance(error, dict) and _names_field(error.get("param")):
        named = True
        details = details or f"{error.get('param')}: {error.get('message')}"
    return Diagnosis(
        reason,
        "The API rejected this event." + (f" {details}." if details else "") + _status(err),
        [
            (
                "Fix the field named above where your backend builds the event"
                if named
                else "The API named no field: compare the event (`capi dead-letters show ID`) "
                "with its message above and the field rules, and fix it where your backend "
                "builds the event"
            )
            + "; the other events of its batch were delivered.",
            "Check the corrected event with `capi dead-letters replay ID --dry-run`, or fix "
            "and enqueue it again under the same id.",
        ],
    )


def _too_old(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    return Diagnosis(
        reason,
        "The event is outside the API's window (older than 7 days, or over 10 minutes ahead)."
        + _status(err),
        [
            "It cannot be replayed: the API will refuse it. Export it for your records.",
            "Enqueue events promptly and keep server clocks in sync (NTP); do not hold a "
            "dead-lettered cause unfixed for days.",
        ],
    )


def _transient(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    steps = [
        "This is usually temporary. A running worker retries it with capped, jittered "
        "backoff (honouring Retry-After) and keeps the events queued meanwhile; a key check "
        "(`capi check-key`) can simply be run again.",
        "If it persists, check OpenAI's status page. " + SUPPORT_ASKS,
    ]
    if reason is Reason.NETWORK:
        steps.insert(
            0,
            f"Check that CAPI_BASE_URL is right and reachable from this machine: {BASE_URL_RULE}; "
            "outbound HTTPS must be allowed (proxy, firewall).",
        )
    return Diagnosis(
        reason, f"{reason.meaning[0].upper()}{reason.meaning[1:]}.{_status(err)}", steps
    )


def _exhausted(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    last = f" Last failure: {err.reason.value}{_status(err)}" if err else ""
    return Diagnosis(
        reason,
        "Every allowed attempt failed with a retryable error." + last,
        [
            "Once the endpoint answers again (`capi check-key`), replay: "
            "`capi dead-letters replay --reason retries_exhausted`.",
            "If outages last longer than your budget, raise CAPI_MAX_ATTEMPTS or CAPI_RETRY_CAP_S.",
        ],
    )


def _unexpected(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    return Diagnosis(
        reason,
        "The API answered in a way capi does not recognise." + _status(err),
        [
            f"Check CAPI_BASE_URL: {BASE_URL_RULE}.",
            "The raw response is printed by `capi check-key --json`, and kept in each dead "
            "letter it caused (`capi dead-letters show ID`). " + SUPPORT_ASKS,
        ],
    )


def _request_invalid(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    field = err.response.request_field if err else None
    named = f" {field!r}" if field else ""
    return Diagnosis(
        reason,
        f"The API rejected the request's field{named}, not an event: every request of this "
        f"destination would fail the same way, so it is held and its events kept.{_status(err)}",
        [
            f"Check what sets{named or ' it'}: the pixel id (CAPI_PIXEL_ID, sent as ?pid=), "
            "CAPI_INTEGRATION_SOURCE, and CAPI_BASE_URL "
            f"({BASE_URL_RULE}).",
            "Then run `capi check-key`: once it passes, the worker's re-probe resumes sending.",
        ],
    )


def _too_large(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    return Diagnosis(
        reason,
        "The API refused even this event alone as too large (413)." + _status(err),
        [
            "Shorten the event's largest fields (contents, custom data) where your backend "
            "builds it, then enqueue it again under the same id.",
            "A 413 on a batch only splits it: lowering CAPI_BATCH_SIZE saves the extra requests.",
        ],
    )


def _not_found(
    reason: Reason, err: SendError | None, pixel_id: str | None, hint: str | None
) -> Diagnosis:
    return Diagnosis(
        reason,
        "Nothing answers at CAPI_BASE_URL + /v1/events (404): the destination is held and its "
        "events kept." + _status(err),
        [
            f"Check CAPI_BASE_URL: {BASE_URL_RULE}.",
            "Then run `capi check-key`: once it passes, the worker's re-probe resumes sending.",
        ],
    )


_BUILDERS = {
    Reason.MISSING_SCOPE: _missing_scope,
    Reason.ACCESS_DENIED: _access_denied,
    Reason.UNAUTHORIZED: _unauthorized,
    Reason.UNKNOWN_PIXEL: _unknown_pixel,
    Reason.INVALID_EVENT: _invalid_event,
    Reason.REQUEST_INVALID: _request_invalid,
    Reason.TOO_LARGE: _too_large,
    Reason.NOT_FOUND: _not_found,
    Reason.OUTSIDE_TIME_WINDOW: _too_old,
    Reason.RATE_LIMITED: _transient,
    Reason.SERVER_ERROR: _transient,
    Reason.NETWORK: _transient,
    Reason.RETRIES_EXHAUSTED: _exhausted,
    Reason.UNEXPECTED: _unexpected,
}
# Failures that blame the key or the pixel: one that did not come in the API's error format
# may be some other server's, reached through a wrong CAPI_BASE_URL.
_KEY_OR_PIXEL = frozenset(
    {Reason.MISSING_SCOPE, Reason.ACCESS_DENIED, Reason.UNAUTHORIZED, Reason.UNKNOWN_PIXEL}
)
