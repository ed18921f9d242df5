"""The ``capi`` console script: capi's commands plus ``capi worker`` (which needs arq)."""

from __future__ import annotations

from capi.cli import cli


def main() -> None:
    """Entry point of the ``capi`` command."""
    cli()


if __name__ == "__main__":
    main()
