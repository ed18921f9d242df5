"""The console's routes: who may see and do what, and the headers every answer carries.

Reading needs a viewer or operator token (a login session, or ``Authorization: Bearer``);
``GET /healthz`` needs none. Every state change is a POST that needs the operator role and
the CSRF token of the session (or of the Bearer token), else 403. Answers carry a strict
Content-Security-Policy (scripts and styles only from ``/static``), no framing, nosniff,
no referrer and no caching.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from capi import clock
from capi.console import actions, auth, views
from capi.console.answers import (
    Refused,
    SafeJSON,
    SecurityHeaders,
    parse_time,
    read_form,
    ring_id,
    whole_number,
)
from capi.console.auth import Principal
from capi.errors import CapiError
from capi.safetext import shown
from capi.settings import Settings

Handler = Callable[[Request, Principal], Awaitable[Response]]
SESSION_EXPIRED = "session expired: log in again"
# The console reads its tokens when it starts: one added since is not known until a restart.
RESTART = (
    "tokens are read from CAPI_CONSOLE_TOKENS_SHA256 when the console starts: one added "
    "since needs the console restarted"
)


def _finalize(value: Any) -> Any:
    """Every value a template prints, with control and bidi characters made visible
    escapes (:func:`capi.safetext.shown`, as the command line does); markup the templates
    themselves built (macros) is left alone."""
    return value if isinstance(value, Markup) else shown(value, lines=True)


class Console:
    """The console application: ``Console(settings).app`` is the ASGI app."""

    def __init__(self, settings: Settings, ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._ready = ready  # called once serving (uvicorn then handles Ctrl-C)
        self.redis = settings.async_redis()
        self.tokens = auth.configured(settings.console_tokens_sha256)
        self.sessions = auth.Sessions(self.redis, settings.keys)
        self.limiter = auth.LoginLimiter()
        self.reader = views.Reader(settings, self.redis)
        self.actions = actions.Actions(settings, self.redis)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("capi.console", "templates"),
            autoescape=True,
            finalize=_finalize,
        )
        self.templates.filters["q"] = lambda value: quote(str(value), safe="")
        self.templates.filters["redacted"] = views.redacted
        page, act = self._page, self._action
        secure = settings.console_secure_cookies
        self.secure_cookies = secure
        self.session_cookie = ("__Host-" if secure else "") + auth.SESSION_COOKIE
        self.login_cookie = ("__Host-" if secure else "") + auth.LOGIN_COOKIE
        self.starlette = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/login", self.login_form, methods=["GET"]),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", act(self.logout, operator=False), methods=["POST"]),
                Route("/", page(self.overview)),
                Route("/overview.json", page(self.overview_json)),
                Route("/jobs/{job}.json", page(self.job_json)),
                Route("/jobs/{job}", page(self.job)),
                Route("/dead-letters", page(self.any_dead_letters)),
                Route("/d/{name}", page(self.destination)),
                Route("/d/{name}/tail.json", page(self.tail_json)),
                Route("/d/{name}/dead-letters", page(self.dead_letters)),
                Route("/d/{name}/dead-letter", page(self.dead_letter)),
                Route("/d/{name}/audit", page(self.audit)),
                Route("/d/{name}/purge", page(self.purge_form), methods=["GET"]),
                Route("/d/{name}/purge", act(self.purge), methods=["POST"]),
                Route("/d/{name}/replay/dry-run", act(self.dry_run), methods=["POST"]),
                Route("/d/{name}/replay", act(self.replay), methods=["POST"]),
                Route("/d/{name}/check-key", act(self.check_key), methods=["POST"]),
                Mount("/static", StaticFiles(packages=[("capi.console", "static")])),
            ],
            lifespan=self._lifespan,
        )
        hosts = [h.strip() for h in (settings.console_hosts or "").split(",") if h.strip()]
        # Outside Starlette's own error handling, so that its 500 carries the headers too.
        self.app = SecurityHeaders(
            TrustedHostMiddleware(self.starlette, allowed_hosts=hosts) if hosts else self.starlette
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self._ready is not None:
            self._ready()
        yield
        await self.redis.aclose()

    # -- who is asking ------------------------------------------------------------------
    async def who(self, request: Request) -> Principal | None:
        """The principal of a request: its Bearer token, else its session; None if neither
        is valid (Refused 401 for a console token that is not configured, counted as a
        failed login: 429 once there were too many). An Authorization header that holds no
        console token (Basic, or a Bearer id token) is the business of a proxy in front
        (nginx auth_basic, an SSO proxy passing its own): the session decides then."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            found = auth.bearer(token, self.tokens)
            if found is not None:
                return found
            if token.startswith(auth.TOKEN_PREFIX):
                self.failed_login(request)
                raise Refused(401, f"that token is not a console token configured here; {RESTART}")
        cookie = request.cookies.get(self.session_cookie)
        return await self.sessions.read(cookie, self.tokens) if cookie else None

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                principal = await self.who(request)
                if principal is None and request.url.path.endswith(".json"):
                    raise Refused(401, SESSION_EXPIRED)  # the live page says so
                if principal is None:
                    return RedirectResponse("/login", status_code=303)
                return await handler(request, principal)
            except Refused as exc:
                return self.refusal(request, exc)

        return endpoint

    def _action(
        self, handler: Handler, *, operator: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                principal = await self.who(request)
                if principal is None:
                    raise Refused(401, "log in first")
                if operator and not principal.operator:
                    raise Refused(403, "this needs an operator token; yours is a viewer's")
                form = await read_form(request)
                sent = form.get("csrf", "") or request.headers.get("x-csrf-token", "")
                if not auth.same(sent, principal.csrf):
                    raise Refused(403, "missing or wrong CSRF token: reload the page and retry")
                request.state.form = form
                return await handler(request, principal)
            except Refused as exc:
                return self.refusal(request, exc)

        return endpoint

    def refusal(self, request: Request, exc: Refused) -> Response:
        """A refusal as a short page (or JSON for a .json path)."""
        if request.url.path.endswith(".json"):
            return SafeJSON({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        html = self.templates.get_template("error.html").render(
            status=exc.status, message=exc.message, user=None
        )
        return HTMLResponse(html, status_code=exc.status, headers=exc.headers)

    def render(
        self, template: str, principal: Principal | None, code: int = 200, **context: Any
    ) -> HTMLResponse:
        """A page from its template, answered with status ``code``."""
        html = self.templates.get_template(template).render(user=principal, **context)
        return HTMLResponse(html, status_code=code)

    async def named(self, request: Request) -> str:
        """The destination named in the path, which must exist (else 404)."""
        name = str(request.path_params["name"])
        if not await self.reader.known(name):
            raise Refused(404, "no such destination")
        return name

    def configured(self, name: str) -> Any:
        """A configured destination whose key this host holds (else 409)."""
        dest = self.reader.configured().get(name)
        if dest is None or not dest.api_key:
            raise Refused(409, "this destination is not configured here with its key")
        return dest

    # -- login ----------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        """Liveness, without a token."""
        return PlainTextResponse("ok")

    async def login_form(self, request: Request, message: str = "", status: int = 200) -> Response:
        """The login form, with a fresh CSRF token in a cookie and in the form."""
        token = secrets.token_urlsafe(24)
        response = self.render("login.html", None, status, csrf=token, message=message)
        self._cookie(request, response, self.login_cookie, token, 600)
        return response

    def failed_login(self, request: Request) -> None:
        """Count a failed login from the request's address; Refused 429 (with Retry-After)
        once that address, or everyone, failed too often."""
        client = request.client.host if request.client else "?"
        wait = self.limiter.wait(client)
        if wait:
            raise Refused(
                429, "too many failed attempts; wait a minute", {"retry-after": str(int(wait) + 1)}
            )
        self.limiter.failed(client)

    async def login(self, request: Request) -> Response:
        """Turn a token into a session cookie (failures limited per client address; a
        configured token always gets through)."""
        try:
            form = await read_form(request)
        except Refused as exc:
            return self.refusal(request, exc)
        if not auth.same(form.get("csrf", ""), request.cookies.get(self.login_cookie, "")):
            return await self.login_form(request, "the form expired; try again", 403)
        digest = auth.digest(form.get("token", "").strip())
        role = self.tokens.get(digest)
        if role is None:
            try:
                self.failed_login(request)
            except Refused as exc:
                response = await self.login_form(request, exc.message, exc.status)
                response.headers.update(exc.headers)
                return response
            return await self.login_form(request, f"that token is not valid here; {RESTART}", 401)
        cookie = await self.sessions.start(role, digest)
        response = RedirectResponse("/", status_code=303)
        self._cookie(request, response, self.session_cookie, cookie, self.sessions.ttl_s)
        self._forget_cookie(response, self.login_cookie)
        return response

    def _forget_cookie(self, response: Response, name: str) -> None:
        secure = self.secure_cookies  # a __Host- cookie is only replaced by a Secure one
        response.delete_cookie(name, path="/", secure=secure, httponly=True, samesite="strict")

    def _cookie(
        self, request: Request, response: Response, name: str, value: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies or request.url.scheme == "https",
        )

    async def logout(self, request: Request, principal: Principal) -> Response:
        """End the session."""
        cookie = request.cookies.get(self.session_cookie)
        if cookie:
            await self.sessions.end(cookie)
        response = RedirectResponse("/login", status_code=303)
        self._forget_cookie(response, self.session_cookie)
        return response

    # -- pages ----------------------------------------------------------------------------
    async def overview(self, request: Request, principal: Principal) -> Response:
        """Every destination at a glance."""
        return self.render("overview.html", principal, **await self.reader.overview())

    async def overview_json(self, request: Request, principal: Principal) -> Response:
        """The overview's data, for the live page."""
        return SafeJSON(await self.reader.overview())

    async def destination(self, request: Request, principal: Principal) -> Response:
        """One destination: status, match coverage, recent outcomes."""
        name = await self.named(request)
        return self.render("destination.html", principal, **await self.reader.destination(name))

    async def tail_json(self, request: Request, principal: Principal) -> Response:
        """Outcomes newer than ``?after=``, for the live page."""
        name = await self.named(request)
        after = ring_id(request.query_params, "after")
        return SafeJSON(await self.reader.tail_after(name, after))

    async def any_dead_letters(self, request: Request, principal: Principal) -> Response:
        """The dead-letter filter form's destination choice: to that destination's list."""
        name = request.query_params.get("destination", "")
        if not await self.reader.known(name):
            raise Refused(404, "no such destination")
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "destination"]
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in rest if v)
        target = f"/d/{quote(name, safe='')}/dead-letters" + (f"?{query}" if query else "")
        return RedirectResponse(target, status_code=303)

    async def dead_letters(self, request: Request, principal: Principal) -> Response:
        """A page of dead letters, filtered."""
        name = await self.named(request)
        q = request.query_params
        reason = q.get("reason", "")
        at = whole_number(q, "at")
        found = await self.reader.dead_letters(
            name,
            at=at,
            reasons=[reason] if reason else [],
            since_ms=parse_time(q.get("since", "")),
            until_ms=parse_time(q.get("until", "")),
            search=q.get("id", "").strip(),
        )
        filters = {k: q.get(k, "") for k in ("reason", "since", "until", "id")}
        return self.render(
            "dead_letters.html",
            principal,
            name=name,
            names=sorted(self.reader.configured()),
            at=at,
            reasons=views.REASONS,
            filters=filters,
            query="&".join(f"{k}={quote(v, safe='')}" for k, v in filters.items() if v),
            **found,
        )

    async def dead_letter(self, request: Request, principal: Principal) -> Response:
        """One dead letter: reason, guidance, request ids, the event (masked), a curl."""
        name = await self.named(request)
        found = await self.reader.dead_letter(name, request.query_params.get("key", ""))
        if found is None:
            raise Refused(
                404,
                f"no such dead letter among the newest {views.SEARCH_NEWEST} (replayed or "
                "purged?); capi dead-letters show on the worker host searches them all",
            )
        return self.render("dead_letter.html", principal, name=name, **found)

    async def audit(self, request: Request, principal: Principal) -> Response:
        """The replay and purge audit."""
        name = await self.named(request)
        entries = await self.reader.audit(name)
        return self.render("audit.html", principal, name=name, entries=entries)

    async def job(self, request: Request, principal: Principal) -> Response:
        """A replay's progress (the page refreshes itself while it runs)."""
        job = self.actions.jobs.get(str(request.path_params["job"]))
        if job is None:
            raise Refused(404, "no such replay")
        return self.render("job.html", principal, job=job.json())

    async def job_json(self, request: Request, principal: Principal) -> Response:
        """A replay's progress, for the live page."""
        job = self.actions.jobs.get(str(request.path_params["job"]))
        if job is None:
            raise Refused(404, "no such replay")
        return SafeJSON(job.json())

    async def purge_form(self, request: Request, principal: Principal) -> Response:
        """What a purge would delete, and the confirmation form."""
        name = await self.named(request)
        if not principal.operator:
            raise Refused(403, "this needs an operator token; yours is a viewer's")
        key, reason = request.query_params.get("key", ""), request.query_params.get("reason", "")
        if not (key or reason):
            raise Refused(400, "say what to purge: one dead letter, or a reason")
        until_ms = clock.now_ms()  # the purge deletes no dead letter newer than this page
        selection = actions.selection_of([key] if key else [], reason, until_ms)
        records = await self.actions.select(name, selection)
        return self.render(
            "purge.html",
            principal,
            name=name,
            key=key,
            reason=reason,
            count=len(records),
            until_ms=until_ms,
        )

    # -- actions (POST, operator, CSRF) ---------------------------------------------------
    def _chosen(self, request: Request) -> tuple[list[str], str]:
        form: dict[str, str] = request.state.form
        key, reason = form.get("key", ""), form.get("reason", "")
        if not (key or reason):
            raise Refused(400, "say what: one dead letter, or a reason")
        if reason and reason not in views.REASONS:
            raise Refused(400, "no such reason")
        return ([key] if key else []), reason

    async def purge(self, request: Request, principal: Principal) -> Response:
        """Delete the chosen dead letters, once confirmed; audited."""
        name = await self.named(request)
        keys, reason = self._chosen(request)
        form: dict[str, str] = request.state.form
        if form.get("confirm") != "yes":
            raise Refused(400, "tick the confirmation to purge")
        until_ms, count = whole_number(form, "until_ms", -1), whole_number(form, "count", -1)
        if until_ms < 0 or count < 0:
            raise Refused(400, "confirm the purge on its page first (until_ms and count)")
        selection = actions.selection_of(keys, reason, until_ms)
        records = await self.actions.select(name, selection)
        if len(records) != count:
            raise Refused(
                409,
                f"the selection changed since the confirmation ({count} then, {len(records)} "
                "now): nothing was purged; look again",
            )
        removed = await self.actions.purge(name, records, selection, principal.fingerprint)
        return self.render("done.html", principal, name=name, message=f"purged {removed}")

    async def dry_run(self, request: Request, principal: Principal) -> Response:
        """Ask the API what it would accept; offer the replay of those."""
        name = await self.named(request)
        dest = self.configured(name)
        keys, reason = self._chosen(request)
        try:
            run = await self.actions.dry_run(dest, actions.selection_of(keys, reason))
        except CapiError as exc:
            raise Refused(502, f"the dry run failed: {exc}") from None
        return self.render(
            "dry_run.html",
            principal,
            name=name,
            run=run,
            results=run.results[: actions.SHOWN_VERDICTS],
        )

    async def replay(self, request: Request, principal: Principal) -> Response:
        """Replay what a dry run accepted, in the background; to its progress page."""
        await self.named(request)
        run = self.actions.dry_runs.get(request.state.form.get("dry_run", ""))
        if run is None or run.destination != request.path_params["name"]:
            raise Refused(409, "run the dry run first (or again: it expired)")
        job = self.actions.start_replay(run, principal.fingerprint)
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    async def check_key(self, request: Request, principal: Principal) -> Response:
        """Check the destination's key now."""
        name = await self.named(request)
        started = time.monotonic()
        result = await self.actions.check_key(self.configured(name), principal.fingerprint)
        took = round(time.monotonic() - started, 1)
        return self.render("key_check.html", principal, name=name, took_s=took, **result)
