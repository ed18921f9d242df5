"""The HTTP intake: what runs inside ``capi serve``.

- :mod:`capi.intake.guard`: the connection guard: limits enforced before a request is parsed
  or authenticated (header bytes and time, idle time, buffered bytes, connections).
- :mod:`capi.intake.app`: the ASGI application (routes, answers, access log, metrics).
- :mod:`capi.intake.envelope`: reading a request body into events (JSON envelope or NDJSON).
- :mod:`capi.intake.tokens`: intake tokens, held only as SHA-256 digests.
- :mod:`capi.intake.openapi`: the OpenAPI document served at ``/openapi.json``.

The library below never imports this package.
"""
