"""The operator console: ``capi console``, a small web application of its own process
(never mixed with the intake: the two face different networks).

- :mod:`capi.console.auth`: console tokens (SHA-256 and a role each), login sessions kept
  in Redis, CSRF tokens, the login rate limit.
- :mod:`capi.console.views`: what each page shows, read through the library's own readers
  (:mod:`capi.status`, :mod:`capi.deadletters`, :mod:`capi.replay`, :mod:`capi.tail`);
  identifiers and their hashes are masked here, before any template sees an event.
- :mod:`capi.console.actions`: what an operator may do (dry run, replay with progress,
  purge, key check), each through the module that owns the state it changes.
- :mod:`capi.console.app`: the routes, and who may see and do what.
- :mod:`capi.console.answers`: what every answer carries (the security headers), JSON that
  never reads as markup, refusals, the form reader.

Pages are rendered on the server by Jinja2 with autoescaping and read without JavaScript;
``static/console.js`` (shipped in the package, no build step) only polls JSON for live
updates.
"""
