"""A local imitation of the events endpoint, faithful to the contract, with fault injection.

:class:`~capi.sandbox.state.SandboxState` holds keys, pixels, faults and what was accepted;
:mod:`capi.sandbox.server` serves it over HTTP/1.1 (asyncio, keep-alive), in this process
(:class:`~capi.sandbox.server.SandboxThread`) or as ``capi sandbox``.
"""

from capi.sandbox.server import SandboxThread, serve
from capi.sandbox.state import Fault, SandboxState

__all__ = ["Fault", "SandboxState", "SandboxThread", "serve"]
