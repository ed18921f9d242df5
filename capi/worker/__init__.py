"""The worker runtime: what runs inside ``capi worker`` (and the arq glue in ``workers/``).

- :mod:`capi.worker.runner`: the process: signals, metrics server, startup key checks, the
  fleet of destinations followed as the destinations file changes.
- :mod:`capi.worker.startup`: what a worker's startup key checks wait for (metrics, status).
- :mod:`capi.worker.lanes`: the shared lanes that give destinations turns.
- :mod:`capi.worker.sender`: one destination's turn: read a batch, send it, carry out its fate.
- :mod:`capi.worker.decisions`: the table from outcome to fate, and the retry plan (pure).
- :mod:`capi.worker.fates`: records what became of each event of a batch.
- :mod:`capi.worker.endpoint`: a destination's endpoint state (failing since, outage ends).
- :mod:`capi.worker.housekeeping`: the worker's periodic jobs.
- :mod:`capi.worker.jobs`: a housekeeping job (name, schedule, callable) and a rotation.
- :mod:`capi.worker.keyguard`: a destination's key state (held, re-probed, released).

The library below (``capi.queue``, ``capi.events``, ``capi.client``, ...) never imports this
package.
"""
