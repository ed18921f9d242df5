"""The ``capi`` command: thin over the library. Parse, call, print; map errors to exit codes.

The ``worker`` command is added by :mod:`workers.cli` (the arq glue), which is also the
console-script entry point, so that this package never imports ``workers``.
"""

from capi.cli import (
    deadletter_commands,
    destination_commands,
    queue_commands,
    queue_group,
    replay_commands,
    status_commands,
    support_commands,
)
from capi.cli.main import cli

__all__ = [
    "cli",
    "deadletter_commands",
    "destination_commands",
    "queue_commands",
    "queue_group",
    "replay_commands",
    "status_commands",
    "support_commands",
]
