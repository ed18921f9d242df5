"""The OpenAPI 3.1 document of ``capi serve``, served at ``/openapi.json``.

It names every answer of every operation :mod:`capi.intake.app` serves; ``tests/test_intake.py``
validates the document and checks real answers against its schemas.
"""

from __future__ import annotations

from typing import Any

from capi import __version__

_REF = "#/components/schemas/"


def _json(schema: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF + schema}}},
        **extra,
    }


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before sending the same request again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}

_SCHEMAS: dict[str, Any] = {
    "Envelope": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {
            "events": {
                "type": "array",
                "description": "Events in the Conversions API's format (docs/api-format.md), "
                "which may also carry raw identifiers under user (email, phone, "
                "external_id, first_name, last_name): they are hashed before they are "
                "stored. Each is checked on its own: a bad one is refused in results, "
                "never failing the request.",
                "items": {},
            }
        },
    },
    "FieldError": {
        "type": "object",
        "required": ["field", "rule"],
        "additionalProperties": False,
        "properties": {
            "field": {"type": "string", "description": "Path in the event, as user.email."},
            "rule": {"type": "string", "description": "The rule it breaks."},
        },
    },
    "EventResult": {
        "type": "object",
        "required": ["index", "id", "status", "errors"],
        "additionalProperties": False,
        "properties": {
            "index": {"type": "integer", "minimum": 0, "description": "Position in the body."},
            "id": {"type": ["string", "null"], "description": "The event's id, if it has one."},
            "status": {
                "type": "string",
                "enum": ["queued", "duplicate", "skipped", "refused", "not_queued", "unconfirmed"],
                "description": "queued; duplicate (its name and id were queued within the "
                "dedup window); skipped (its consent is denied and the destination's "
                "consent_policy is drop: never stored nor sent; errors say why); refused "
                "(errors say why; sending it again will not help); not_queued (503 or 500 "
                "misconfigured only: Redis did not take it; send it again); unconfirmed (503 "
                "or 500 misconfigured only: Redis may hold it or not, its answer was lost or "
                "the durability wait did not confirm it; send it again: the event id dedups).",
            },
            "errors": {"type": "array", "items": {"$ref": _REF + "FieldError"}},
            "warnings": {
                "type": "array",
                "items": {"$ref": _REF + "FieldError"},
                "description": "Invalid optional identifiers left out of the queued event "
                "(CAPI_STRICT_IDENTIFIERS=true refuses the event instead).",
            },
        },
    },
    "EventsAnswer": {
        "type": "object",
        "required": ["results", "queued", "duplicates", "refused"],
        "additionalProperties": False,
        "properties": {
            "results": {"type": "array", "items": {"$ref": _REF + "EventResult"}},
            "queued": {"type": "integer", "minimum": 0},
            "duplicates": {"type": "integer", "minimum": 0},
            "refused": {"type": "integer", "minimum": 0},
            "skipped": {"type": "integer", "minimum": 0},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "description": "A stable word for scripts."},
                    "message": {"type": "string", "description": "What to do, for people."},
                },
            },
            "results": {
                "type": "array",
                "description": "503 and 500 misconfigured only: each event's fate so far.",
                "items": {"$ref": _REF + "EventResult"},
            },
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string"},
            "reason": {"type": "string"},
            "degraded": {"type": "string"},
        },
    },
}


def _events_operation() -> dict[str, Any]:
    return {
        "summary": "Queue events for delivery",
        "operationId": "postEvents",
        "security": [{"intakeToken": []}],
        "parameters": [
            {
                "name": "destination",
                "in": "query",
                "required": False,
                "description": "The destination to queue to; may be left out when the token "
                "grants exactly one.",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF + "Envelope"}},
                "application/x-ndjson": {
                    "schema": {"type": "string", "description": "One event (JSON) per line."}
                },
            },
        },
        "responses": {
            "200": _json("EventsAnswer", "One result per event, in order."),
            "400": _json(
                "Error",
                "The body is not a JSON envelope of events (or no NDJSON), names a key twice "
                "in one object, or the request has several Authorization or Content-Type "
                "headers, or names ?destination= several times.",
            ),
            "401": _json(
                "Error", "No intake token, or one not configured.", headers=_WWW_AUTHENTICATE
            ),
            "403": _json(
                "Error",
                "The token does not grant the destination (or grants several and none was named).",
            ),
            "408": _json(
                "Error",
                "The body did not arrive within CAPI_INTAKE_READ_TIMEOUT_S, or the headers "
                "within CAPI_INTAKE_HEADER_TIMEOUT_S (the connection is closed).",
            ),
            "413": _json(
                "Error",
                "The body is over CAPI_INTAKE_MAX_BODY_BYTES, or holds more "
                "than CAPI_INTAKE_MAX_EVENTS events.",
            ),
            "415": _json(
                "Error",
                "The Content-Type is not application/json or application/x-ndjson, or the "
                "body has a Content-Encoding (it is read uncompressed only).",
            ),
            "431": _json(
                "Error",
                "The request line and headers are over CAPI_INTAKE_MAX_HEADER_BYTES (the "
                "connection is closed).",
            ),
            "500": _json(
                "Error",
                "The intake failed or is misconfigured (see its log); when misconfigured, "
                "results say which events are unconfirmed and which were not queued.",
            ),
            "501": _json(
                "Error",
                "The Transfer-Encoding names a coding other than chunked (the connection is "
                "closed): send the body uncompressed.",
            ),
            "503": _json(
                "Error",
                "Redis is away or full (results say what was taken), the intake holds "
                "CAPI_INTAKE_MAX_BUFFERED_BYTES of bodies already, or every connection is "
                "busy. Send the same request again after Retry-After.",
                headers=_RETRY_AFTER,
            ),
        },
    }


def _get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses}}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict)."""
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "capi intake",
            "version": __version__,
            "description": "Queue conversion events for the OpenAI Ads Conversions API. "
            "A path not listed here is answered 404, and a listed path asked with another "
            "method 405 (with Allow), both with the Error body.",
        },
        "paths": {
            "/v1/events": {"post": _events_operation()},
            "/healthz": _get("Liveness", {"200": _json("Status", "The process answers.")}),
            "/readyz": _get(
                "Readiness",
                {
                    "200": _json(
                        "Status",
                        "Redis answers and is not full (on a Redis Cluster, `degraded` says "
                        "when some masters are full).",
                    ),
                    "503": _json(
                        "Status",
                        "Redis does not answer, is full, or cannot confirm writes as "
                        "CAPI_ENQUEUE_DURABILITY asks (`reason` says which).",
                    ),
                },
            ),
            "/metrics": _get(
                "Prometheus metrics: for clients on this host (loopback), or with an intake "
                "token (Authorization: Bearer)",
                {
                    "200": {"description": "Text format.", "content": text},
                    "403": _json("Error", "Another host, without an intake token."),
                },
            ),
            "/openapi.json": _get(
                "This document",
                {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
            ),
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "intakeToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An intake token (capi intake-token); never the Conversion Key.",
                }
            },
        },
    }
