"""Web capture: what a server-side event needs from the request that caused it.

An ad click lands on the shop with ``?oppref=...`` in the URL; the purchase happens pages
later. Two pieces carry the click id across:

- :class:`OpprefMiddleware` (ASGI: FastAPI, Starlette) and :class:`OpprefWsgiMiddleware`
  (WSGI: Django, Flask) store ``oppref`` from any landing URL in the first-party cookie
  ``__oppref`` (the cookie the OpenAI Pixel uses, so the two agree), for 30 days unless
  told otherwise;
- :func:`event_fields` reads, from the request of the conversion, the fields an event takes
  from the web: ``oppref`` (the URL's, else the cookie's), ``source_url`` (scheme, host and
  path: never the query or fragment), and under ``user``: ``user_agent``, ``ip_address``
  (``X-Forwarded-For`` is honoured only when the peer is one of ``trusted_proxies``) and
  ``obref`` (the Pixel's ``__obref`` cookie, only when the user gave consent).

A request is any of: an ASGI scope, a WSGI environ, or an object carrying one (Starlette's
and FastAPI's ``request.scope``, Flask's ``request.environ``, Django's ``request.META``).
No web framework is imported here. docs/attribution.md has an example for each framework.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from capi.sourceurl import query_param

OPPREF_COOKIE = "__oppref"
OBREF_COOKIE = "__obref"
DEFAULT_MAX_AGE_S = 30 * 86_400
# RFC 6265 cookie-octets other than "%": kept as they are; anything else is %-escaped.
_COOKIE_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def oppref_cookie(oppref: str, *, max_age_s: int = DEFAULT_MAX_AGE_S, secure: bool = False) -> str:
    """The ``Set-Cookie`` value that stores ``oppref`` (readable by the Pixel's script, so
    not HttpOnly; SameSite=Lax, so it comes along when the user follows a link back)."""
    value = quote(oppref, safe=_COOKIE_SAFE)
    cookie = f"{OPPREF_COOKIE}={value}; Max-Age={max_age_s}; Path=/; SameSite=Lax"
    return cookie + "; Secure" if secure else cookie


class OpprefMiddleware:
    """ASGI middleware: a request whose URL carries ``oppref`` gets it stored in the
    ``__oppref`` cookie on its response (``max_age_s``: how long it is kept)."""

    def __init__(self, app: ASGIApp, *, max_age_s: int = DEFAULT_MAX_AGE_S) -> None:
        self.app = app
        self.max_age_s = max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        oppref = None
        if scope["type"] == "http":
            oppref = query_param(scope.get("query_string", b"").decode("latin-1"))
        if not oppref:
            await self.app(scope, receive, send)
            return
        cookie = oppref_cookie(
            oppref, max_age_s=self.max_age_s, secure=scope.get("scheme") == "https"
        ).encode("latin-1")

        async def send_with_cookie(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class OpprefWsgiMiddleware:
    """WSGI middleware: as :class:`OpprefMiddleware`, for Django, Flask and any WSGI app."""

    def __init__(self, app: WSGIApp, *, max_age_s: int = DEFAULT_MAX_AGE_S) -> None:
        self.app = app
        self.max_age_s = max_age_s

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        oppref = query_param(environ.get("QUERY_STRING", ""))
        if not oppref:
            return self.app(environ, start_response)
        cookie = oppref_cookie(
            oppref, max_age_s=self.max_age_s, secure=environ.get("wsgi.url_scheme") == "https"
        )

        def start_with_cookie(status: str, headers: list[Any], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, ("Set-Cookie", cookie)], exc_info)

        return self.app(environ, start_with_cookie)


@dataclass(frozen=True)
class _Request:
    """What this module reads of a request, whatever the framework."""

    scheme: str
    host: str
    path: str
    query: str
    headers: Mapping[str, str]  # lowercase names
    peer: str | None


def event_fields(
    request: Any, *, consent: bool = False, trusted_proxies: Iterable[str] = ()
) -> dict[str, Any]:
    """The fields an event takes from the web request of a conversion, ready to pass to
    :func:`capi.events.signup` or :func:`~capi.events.purchase` (``**event_fields(r)``).

    ``consent``: whether the user agreed to ad measurement; without it the Pixel's
    ``__obref`` browser id is left out. ``trusted_proxies``: addresses or networks
    (``"10.0.0.0/8"``) of the reverse proxies in front of the app; ``X-Forwarded-For``
    (and ``-Proto``, ``-Host``) are believed only from them.
    """
    req = _read(request)
    cookies = _cookies(req.headers.get("cookie", ""))
    proxies = _networks(trusted_proxies)
    trusted = _is_trusted(req.peer, proxies)
    scheme, host = req.scheme, req.host
    if trusted:
        scheme = _first(req.headers.get("x-forwarded-proto")) or scheme
        host = _first(req.headers.get("x-forwarded-host")) or host
    path = quote(req.path, safe="/%:@!$&'()*+,;=~")
    out: dict[str, Any] = {"source_url": f"{scheme}://{host}{path}"}
    oppref = query_param(req.query) or unquote(cookies.get(OPPREF_COOKIE, ""))
    if oppref:
        out["oppref"] = oppref
    user: dict[str, Any] = {}
    ip = _client_ip(req, proxies) if trusted else req.peer
    if ip:
        user["ip_address"] = ip
    if req.headers.get("user-agent"):
        user["user_agent"] = req.headers["user-agent"]
    if consent and cookies.get(OBREF_COOKIE, "").strip():
        user["obref"] = unquote(cookies[OBREF_COOKIE])
    if user:
        out["user"] = user
    return out


def _read(request: Any) -> _Request:
    """The parts of an ASGI scope, a WSGI environ, or a framework request holding one."""
    for attribute in ("scope", "environ", "META"):
        inner = getattr(request, attribute, None)
        if isinstance(inner, Mapping):
            request = inner
            break
    if not isinstance(request, Mapping):
        raise TypeError(
            "event_fields() takes an ASGI scope, a WSGI environ, or a request holding one "
            f"(.scope, .environ or .META), got {type(request).__name__}"
        )
    if "type" in request and "headers" in request:  # ASGI
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request["headers"]}
        client = request.get("client")
        return _Request(
            scheme=request.get("scheme", "http"),
            host=headers.get("host", ""),
            path=request.get("root_path", "") + request.get("path", "/"),
            query=request.get("query_string", b"").decode("latin-1"),
            headers=headers,
            peer=client[0] if client else None,
        )
    headers = {
        k[5:].replace("_", "-").lower(): str(v) for k, v in request.items() if k.startswith("HTTP_")
    }
    path = request.get("SCRIPT_NAME", "") + request.get("PATH_INFO", "/")
    # PEP 3333 hands the path over as latin-1-decoded bytes; undo that to get UTF-8 text.
    path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    host = headers.get("host") or f"{request.get('SERVER_NAME')}:{request.get('SERVER_PORT')}"
    return _Request(
        scheme=request.get("wsgi.url_scheme", "http"),
        host=host,
        path=path,
        query=request.get("QUERY_STRING", ""),
        headers=headers,
        peer=request.get("REMOTE_ADDR") or None,
    )


def _cookies(header: str) -> dict[str, str]:
    """Cookie name -> value, first one of a name kept; a malformed pair spoils nothing."""
    out: dict[str, str] = {}
    for pair in header.split(";"):
        name, eq, value = pair.strip().partition("=")
        if eq and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(proxies: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(p.strip(), strict=False) for p in proxies]


def _is_trusted(ip: str | None, proxies: list[Network]) -> bool:
    if not ip or not proxies:
        return False
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return False
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        forms.append(address.ipv4_mapped)  # an IPv4 proxy seen through a dual-stack socket
    return any(a in net for a in forms for net in proxies)


def _client_ip(req: _Request, proxies: list[Network]) -> str | None:
    """The client's address from a trusted proxy's X-Forwarded-For: the right-most entry
    that is not itself a trusted proxy (entries further left are the client's to forge)."""
    hops = [h.strip() for h in req.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, proxies):
            return hop
    return hops[0] if hops else req.peer


def _first(value: str | None) -> str | None:
    return value.split(",")[0].strip() if value else None
