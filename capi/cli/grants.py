"""``capi intake-token --write``: add a token's SHA-256 to the configuration, in place.

Two set-ups, two files: ``CAPI_INTAKE_TOKENS_SHA256`` in the env file (``config/capi.env``)
without a destinations file, or ``intake_tokens_sha256`` of the destination's own table in
the destinations file. Appending a line (``>>``) would be wrong for both: a second
``CAPI_INTAKE_TOKENS_SHA256=`` line silently replaces the first (the last one counts), and
a TOML line appended at the end lands in whichever table comes last. The destinations file
is edited with tomlkit, which keeps its comments and layout; both files are replaced
atomically, keeping their mode.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from capi.errors import ConfigError

VARIABLE = "CAPI_INTAKE_TOKENS_SHA256"
_LINE = re.compile(rf"^\s*(?:export\s+)?{VARIABLE}\s*=\s*(.*?)\s*$")


def grant_in_env_file(path: Path, digest: str) -> tuple[str, str, str]:
    """The env file's text with ``digest`` added to its one ``CAPI_INTAKE_TOKENS_SHA256``
    line (added if missing; lines repeated by an earlier ``>>`` are merged into one), that
    line, and a note for the operator (empty when there is nothing to say)."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"--write: {path} is not a regular file; name the env file with --config")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if _LINE.match(line)]
    digests: list[str] = []
    for i in found:
        match = _LINE.match(lines[i])
        assert match is not None
        value = match.group(1).strip("\"'")
        digests += [d.strip() for d in value.split(",") if d.strip()]
    digests = list(dict.fromkeys([*digests, digest]))
    line = f"{VARIABLE}={','.join(digests)}"
    if found:
        lines[found[0]] = line
        lines = [x for i, x in enumerate(lines) if i not in found[1:]]
    else:
        lines.append(line)
    note = ""
    if len(found) > 1:
        note = (
            f"merged {len(found)} {VARIABLE} lines into one (only the last one counted, so "
            "the tokens of the others were not granted until now)"
        )
    return "\n".join(lines) + "\n", line, note


def grant_in_destinations_file(path: Path, name: str, digest: str) -> str:
    """The destinations file's text with ``digest`` added to ``intake_tokens_sha256`` of
    ``[destinations.NAME]``."""
    import tomlkit  # here: only this command needs it

    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8"))
        table = document["destinations"][name]
    except (OSError, KeyError, tomlkit.exceptions.TOMLKitError) as exc:
        raise ConfigError(f"--write: cannot edit {path}: {exc}") from None
    if "intake_tokens_sha256" in table:
        tokens = table["intake_tokens_sha256"]
        if digest not in tokens:
            tokens.append(digest)
    else:
        table["intake_tokens_sha256"] = [digest]
    return tomlkit.dumps(document)


def replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, keeping its mode (0600 for a new file)."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
