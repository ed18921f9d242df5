"""The sandbox answers as the contract says the API does, at the request level."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from tests.test_client import event


def post(sb: SandboxThread, body: Any, query: str = f"?pid={DEFAULT_PIXEL}") -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{sb.url}/v1/events{query}",
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {DEFAULT_KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("body", "query", "status", "message"),
    [
        ({"validate_only": False}, f"?pid={DEFAULT_PIXEL}", 400, "Missing required field: events"),
        ({"events": []}, f"?pid={DEFAULT_PIXEL}", 400, "non-empty"),
        ({"events": [{}] * 1001}, f"?pid={DEFAULT_PIXEL}", 400, "At most 1000"),
        ({"events": [{}]}, "", 400, "('query', 'pid')"),
        (b"{not json", f"?pid={DEFAULT_PIXEL}", 400, "Invalid JSON"),
    ],
)
def test_request_level_errors(
    sandbox: SandboxThread, body: Any, query: str, status: int, message: str
) -> None:
    code, answer = post(sandbox, body, query)
    assert code == status
    assert message in answer["error"]["message"]


def test_dedup_by_pixel_name_and_id_first_wins(sandbox: SandboxThread) -> None:
    e = json.loads(event(1))
    assert post(sandbox, {"events": [e, e]}) == (200, {"accepted_events": 2})
    assert sandbox.state.delivered_ids() == {"e-1": 2}
    assert sandbox.state.summary()["accepted_unique"] == 1
    assert sandbox.state.summary()["duplicates"] == 1


def test_raw_identifiers_are_not_api_fields(sandbox: SandboxThread) -> None:
    e = json.loads(event(1))
    e["user"] = {"email": "ada@example.com"}  # the API takes only hashed lists
    code, answer = post(sandbox, {"events": [e]})
    assert code == 400 and answer["error"]["param"] == "events[0]"
