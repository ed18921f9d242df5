"""Run the code blocks of a Markdown document as a newcomer would (tests/test_examples.py).

A document is read as a sequence of fenced blocks. ``sh`` and ``python`` blocks are run in
order, in one scratch working copy (``config/`` copied, ``.venv`` a link to this
environment, the rest of the repository linked), each in a fresh shell: no ``CAPI_*``, no
virtualenv on ``PATH``, ``PYTHONPATH`` this checkout alone (see :func:`fresh_env`). Files
and background processes carry over from block to block, as in one working copy; shell
variables do not. A shell block runs in
``bash -e -o pipefail``; a Python block with ``.venv/bin/python``. Other blocks (json,
toml, text, js, go) are not run unless a marker says what to do with them.

An HTML comment on the line before a block says how else to treat it:

- ``<!-- test: skip REASON -->``: not run, for the reason given (installing, Docker, the
  real API);
- ``<!-- test: background READY -->``: a terminal left running: the block is started, must
  print READY, runs until the document's end, then gets Ctrl-C (SIGINT to its process
  group) and must exit 0; anything left in its group is then killed;
- ``<!-- test: file PATH -->``: the block is saved as PATH (a client, a config file) for a
  later block to use;
- ``<!-- test: slow -->``: run only by ``pytest -m slow`` (a benchmark takes minutes).

A document may start from another's set-up: ``<!-- test: setup README.md#SECTION -->``
runs that section's blocks (by their heading's anchor) first.

Ports: the documents name fixed ports (:data:`PORTS`); each run maps them to free ports, in
its blocks and in the config files it copies, so that runs in parallel never collide.
Python output is unbuffered (``PYTHONUNBUFFERED=1``) so READY shows as soon as printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PORTS = {
    6390: "Redis",
    8787: "the sandbox",
    8080: "the intake",
    8081: "the console",
    9464: "worker metrics",
}
RUN = ("sh", "python")
VERBS = ("skip", "background", "file", "slow", "setup")
MARKER = re.compile(r"^<!--\s*test:\s*(\w+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.M)
READY_S = 60.0
STOP_S = 30.0


@dataclass(frozen=True)
class Block:
    """One fenced block, where it is, and the marker before it (if any)."""

    doc: str
    line: int
    lang: str
    text: str
    verb: str | None
    arg: str
    section: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a document, in order."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start())  # 0-based line of the fence
        before = next((lines[i] for i in range(line - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(before)
        verb, arg = (marker.group(1), marker.group(2)) if marker else (None, "")
        assert verb is None or verb in VERBS, f"{path.name}:{line + 1}: unknown marker {verb}"
        headings = HEADING.findall(text, 0, match.start())
        found.append(
            Block(
                doc=str(path.relative_to(ROOT)),
                line=line + 1,
                lang=match.group(1),
                text=match.group(2),
                verb=verb,
                arg=arg.strip().strip('"'),
                section=anchor(headings[-1]) if headings else "",
            )
        )
    return found


def setup_of(path: Path) -> list[Block]:
    """The blocks a document's ``setup`` marker asks to run first."""
    match = re.search(r"^<!--\s*test:\s*setup\s+(\S+)#(\S+)\s*-->", path.read_text(), re.M)
    if not match:
        return []
    chosen = [b for b in blocks(ROOT / match.group(1)) if b.section == match.group(2)]
    assert chosen, f"{path.name}: no blocks under {match.group(1)}#{match.group(2)}"
    return chosen


def fresh_env() -> dict[str, str]:
    """A new shell's environment: no CAPI_*, no virtualenv, the system PATH. PYTHONPATH is
    this checkout alone: in a fresh clone its .venv's editable install points here anyway,
    but a git worktree whose .venv links another checkout's would run that one's code."""
    venv = (sys.prefix, str(Path(sys.executable).parent))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not p.startswith(venv)]
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "USER", "TMPDIR")}
    env.update(
        PATH=os.pathsep.join(path) or "/usr/bin:/bin", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)
    )
    env["PYTHONFAULTHANDLER"] = "1"  # a block that does not stop shows where it is stuck
    return env


class Background:
    """A block left running, as in a terminal of its own."""

    def __init__(self, where: str, script: str, env: dict[str, str], cwd: Path):
        self.where = where
        self.output: list[str] = []
        self.seen = threading.Condition()
        self.proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.seen:
                self.output.append(line)
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def text(self) -> str:
        with self.seen:
            return "".join(self.output)

    def wait_ready(self, ready: str) -> None:
        """Wait until the output shows ``ready``; fail if it exits or takes too long."""
        deadline = time.monotonic() + READY_S
        with self.seen:
            while ready not in "".join(self.output):
                left = deadline - time.monotonic()
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(
                        f"{self.where}: exited ({self.proc.returncode}) before it printed "
                        f"{ready!r}:\n{''.join(self.output)}"
                    )
                assert left > 0, f"{self.where}: no {ready!r} within {READY_S:.0f} s:\n" + (
                    "".join(self.output)
                )
                self.seen.wait(min(left, 0.5))

    def stop(self) -> str | None:
        """Ctrl-C, as in its terminal; a complaint if it did not exit 0 in time."""
        complaint = None
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(STOP_S)
            if self.proc.returncode != 0:
                complaint = f"exited {self.proc.returncode} on Ctrl-C"
        except ProcessLookupError:
            complaint = f"had already exited ({self.proc.poll()})"
        except subprocess.TimeoutExpired:
            complaint = f"still running {STOP_S:.0f} s after Ctrl-C (its threads' stacks below)"
            with _quiet():  # Python's faulthandler (PYTHONFAULTHANDLER) prints every stack
                os.killpg(self.proc.pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        finally:
            with _quiet():
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left in its group
            self.proc.wait(10)
            self.reader.join(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return f"{self.where}: {complaint}:\n{self.text()}" if complaint else None


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError or exc[0] is PermissionError


class Ports:
    """The documents' fixed ports (:data:`PORTS`), each mapped to a free one."""

    def __init__(self) -> None:
        self.ports = {port: free_port() for port in PORTS}

    def mapped(self, text: str) -> str:
        """``text`` with the documents' fixed ports replaced by free ones."""
        for port, free in self.ports.items():
            text = re.sub(rf"(?<![\d.]){port}(?!\d)", str(free), text)
        return text

    def port(self, documented: int) -> int:
        return self.ports[documented]


def repository_entries(root: Path) -> list[Path]:
    """The top-level entries of the checkout that git tracks (all of them outside git): a
    file a reader's own run of the docs left beside them (``intake-token.json``, say) is
    no part of a fresh working copy, where a block that writes it would find it there."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted(root.iterdir())
    tracked = {path.split(b"/", 1)[0].decode() for path in listed.split(b"\0") if path}
    return sorted(entry for entry in root.iterdir() if entry.name in tracked)


class Session(Ports):
    """One working copy in which a document's blocks run, in order."""

    def __init__(self, workdir: Path, *, slow: bool = False):
        super().__init__()
        self.workdir = workdir
        self.slow = slow
        self.env = fresh_env()
        self.background: list[Background] = []
        self.ran: list[str] = []
        self.took: dict[str, float] = {}
        self.skipped: list[str] = []
        for entry in repository_entries(ROOT):
            if entry.name in (".git", ".venv", "config") or entry.name.endswith(".egg-info"):
                continue
            (workdir / entry.name).symlink_to(entry)
        (workdir / ".venv").symlink_to(Path(sys.prefix))
        shutil.copytree(ROOT / "config", workdir / "config")
        for path in (workdir / "config").rglob("*"):
            if path.is_file():
                path.write_text(self.mapped(path.read_text()))

    def run(self, block: Block) -> None:
        """Run one block as its marker says; AssertionError naming it if it fails."""
        started = time.monotonic()
        try:
            self._dispatch(block)
        finally:
            self.took[block.where] = time.monotonic() - started

    def _dispatch(self, block: Block) -> None:
        if block.verb == "skip":
            assert block.arg, f"{block.where}: a skip needs its reason"
            self.skipped.append(f"{block.where}: {block.arg}")
        elif block.verb == "file":
            target = self.workdir / block.arg
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.mapped(block.text))
        elif block.verb == "background":
            assert block.lang == "sh" and block.arg, f"{block.where}: background sh READY"
            started = Background(block.where, self.mapped(block.text), self.env, self.workdir)
            self.background.append(started)
            started.wait_ready(self.mapped(block.arg))
            self.ran.append(block.where)
        elif block.lang in RUN and (block.verb != "slow" or self.slow):
            self._run(block)
            self.ran.append(block.where)

    def _run(self, block: Block) -> None:
        assert not re.search(r"\b(pip|apt-get|apt) install|install\w*\.sh|-m venv", block.text), (
            f"{block.where} installs into the test environment: mark it skip, with why"
        )
        assert not re.search(r"\bpytest\b", block.text), (
            f"{block.where} runs tests inside the tests: mark it skip, with why"
        )
        if block.lang == "python":
            script = self.workdir / f".example-{len(self.ran)}.py"
            script.write_text(self.mapped(block.text))
            command = [str(self.workdir / ".venv" / "bin" / "python"), str(script)]
        else:
            command = ["bash", "-e", "-o", "pipefail", "-c", self.mapped(block.text)]
        with subprocess.Popen(
            command,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                # The input answers a block that reads a key and a pixel (`read`).
                output, _ = proc.communicate(
                    f"{DEFAULT_KEY}\n{DEFAULT_PIXEL}\n",
                    timeout=1800 if block.verb == "slow" else 60,
                )
            except subprocess.TimeoutExpired:
                output = f"(no end within its time limit)\n{block.text}"
            finally:
                with _quiet():
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
        assert proc.returncode == 0, (
            f"{block.where} exited {proc.returncode}:\n{block.text}\n--- output:\n{output}"
        )

    def close(self) -> None:
        """Stop every background block, the last started first; fail if one did not stop
        cleanly (after all are stopped)."""
        complaints = [c for bg in reversed(self.background) if (c := bg.stop())]
        self.background = []
        assert not complaints, "\n".join(complaints)
