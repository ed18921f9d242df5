"""Every command and example of README.md and docs/*.md runs as written.

Each document is one test that runs its ``sh`` and ``python`` blocks in order, in a fresh
shell and a scratch working copy, against the Redis and the sandbox its own blocks start
(see :mod:`tests.docrun` for the markers a block may carry: skip with a reason, background,
file, slow, setup). The README's run, and the intake page's, end by checking that the
events their blocks queued were delivered. Other tests here keep the documents true: the
options they show exist on their commands, no issue is cited, the README stays under 300
lines, compose profiles are named, config blocks are valid, links point inside the
repository. The ``--help`` examples are run by tests/test_help_examples.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import redis
import yaml

from capi import destinations
from capi.sandbox.state import DEFAULT_KEY
from capi.settings import Settings
from tests import docrun
from tests.helpers import wait_for
from workers.cli import cli

ROOT = docrun.ROOT


# --- documents ------------------------------------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> Iterator[docrun.Session]:
    """A scratch working copy; every background block is stopped whatever happens."""
    started = docrun.Session(tmp_path)
    try:
        yield started
    finally:
        started.close()


def test_a_file_left_in_the_checkout_is_no_part_of_a_documents_working_copy(
    tmp_path: Path,
) -> None:
    """A reader who ran docs/intake.md by hand left intake-token.json in the checkout: the
    suite's run of the same document then failed ("exists"), its working copy having
    linked every entry of the checkout."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "intake.md").write_text("# intake\n")
    (repo / "README.md").write_text("# capi\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "docs", "README.md"], cwd=repo, check=True)
    (repo / "intake-token.json").write_text("{}")  # left behind, untracked
    assert [p.name for p in docrun.repository_entries(repo)] == ["README.md", "docs"]


# Events a document's blocks queue in the sandbox set-up (its Redis on 6390), all delivered.
QUEUED = {"README.md": 103, "intake.md": 3}


@pytest.mark.parametrize("doc", docrun.DOCUMENTS, ids=lambda p: p.name)
def test_document_runs_as_written(doc: Path, session: docrun.Session) -> None:
    for block in [*docrun.setup_of(doc), *docrun.blocks(doc)]:
        session.run(block)
    print(*(f"{where}: {s:.1f} s" for where, s in session.took.items()), sep="\n")
    if doc.name in QUEUED:
        _all_delivered(session, QUEUED[doc.name])


def _all_delivered(session: docrun.Session, queued: int) -> None:
    """What the blocks queued, the worker of the README's terminal 3 delivered."""
    client = redis.Redis(port=session.port(6390), socket_timeout=5)
    stats: dict[str, int] = {}
    try:

        def drained() -> bool:
            stats.update({k.decode(): int(v) for k, v in client.hgetall("capi:stats").items()})
            return stats.get("enqueued") == queued == stats.get("delivered")

        wait_for(drained, timeout_s=30, what=f"{queued} events queued and delivered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {stats}") from None
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(900)  # performance.md's quick pass: three benchmarks, minutes on 2 cores
@pytest.mark.parametrize(
    "doc",
    [d for d in docrun.DOCUMENTS if any(b.verb == "slow" for b in docrun.blocks(d))],
    ids=lambda p: p.name,
)
def test_slow_blocks_run_as_written(
    doc: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The blocks marked slow (benchmarks), only when ``-m slow`` asks for them."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("benchmarks run with pytest -m slow")
    started = docrun.Session(tmp_path, slow=True)
    try:
        for block in [*docrun.setup_of(doc), *docrun.blocks(doc)]:
            started.run(block)
        print(*(f"{where}: {s:.1f} s" for where, s in started.took.items()), sep="\n")
    finally:
        started.close()


def test_every_document_block_is_run_or_says_why() -> None:
    for doc in docrun.DOCUMENTS:
        for block in docrun.blocks(doc):
            assert block.lang not in ("bash", "shell", "console", "zsh"), (
                f"{block.where}: a shell block is ```sh, which the tests run"
            )
            if block.verb == "skip":
                assert len(block.arg) > 10, f"{block.where}: say why it is not run"


def test_documents_name_no_issues_and_the_readme_is_short() -> None:
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        found = re.search(r"\b(issues?|seed) #?\d+|(?:^|\s)#\d+\b", text, re.I)
        assert not found, f"{doc.name}: {found.group(0)}"
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_documented_options_exist() -> None:
    """Every ``capi ...`` command line in the documents names options its command has."""
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        spans = re.findall(r"`((?:\.venv/bin/)?capi [^`]+)`", text)
        lines = [ln for b in docrun.blocks(doc) if b.lang == "sh" for ln in b.text.splitlines()]
        for line in [*spans, *lines]:
            for part in re.split(r"\||&&|;|\$\(", line):
                words = part.split("#")[0].split()
                if words and words[0] in ("capi", ".venv/bin/capi"):
                    _check_options(doc.name, words[1:])


def _check_options(where: str, words: list[str]) -> None:
    command: click.Command = cli
    options = {o for p in cli.params for o in getattr(p, "opts", [])} | {"--help"}
    for word in words:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            options |= {o for p in command.params for o in [*p.opts, *p.secondary_opts]}
        elif word.startswith("-") and word not in ("-", "--"):
            name = word.split("=")[0]
            assert name in options, f"{where}: capi {' '.join(words)}: no option {name}"


def test_compose_profiles_are_named_where_compose_is_shown() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    readme = (ROOT / "README.md").read_text()
    assert profiles and all(f"--profile {p} up" in readme for p in profiles), profiles


def test_the_documents_run_this_checkouts_code(tmp_path: Path) -> None:
    """A checkout whose .venv is another's (a git worktree beside the main one, its .venv a
    link) ran the documents' `capi` from the other checkout's code: its editable install
    points there. Then a doc test passed or failed on code that was not the one tested."""
    env = docrun.fresh_env()
    code = "import capi, workers; print(capi.__file__); print(workers.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.split():
        assert Path(line).resolve().is_relative_to(docrun.ROOT), line


def test_config_blocks_are_valid(tmp_path: Path) -> None:
    """A destinations file shown in the documents is one capi accepts."""
    shown = [b for doc in docrun.DOCUMENTS for b in docrun.blocks(doc) if b.lang == "toml"]
    assert shown
    for block in shown:
        path = tmp_path / "destinations.toml"
        path.write_text(block.text)
        tomllib.loads(block.text)
        settings = Settings(_env_file=None, destinations_file=path)
        environ = {n: DEFAULT_KEY for n in re.findall(r'api_key_env = "(\w+)"', block.text)}
        for n in re.findall(r'api_key_file = "([^"]+)"', block.text):
            environ[n] = ""
        assert destinations.parse_file(settings, environ), block.where


def test_documents_point_nowhere_outside_the_repository() -> None:
    # Made by the user, or by a test run (the browser test's screenshots).
    users_copies = ("config/capi.env", "config/destinations.toml", "tests/output/screenshots/")
    for doc in docrun.DOCUMENTS:
        text = doc.read_text()
        if doc.name == "README.md":
            assert "../" not in text
        for path in re.findall(r"`((?:capi|docs|config|tests|workers)/[\w./-]+)`", text):
            assert (ROOT / path).exists() or path in users_copies, f"{doc.name}: {path}"
        for link in re.findall(r"\]\(([a-z][a-z0-9+.-]*:[^)]*)\)", text):
            raise AssertionError(f"{doc.name}: link {link} leaves the repository")
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).resolve().exists(), f"{doc.name}: link {link}"
        for link, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", text):
            target = (doc.parent / link).resolve() if link else doc
            assert anchor in _anchors(target), f"{doc.name}: link {link}#{anchor}: no such heading"


def _anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a document's headings: lowercased, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*$", doc.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_page_of_docs_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"README.md links no docs/{page.name}"


def test_the_event_format_page_names_every_field() -> None:
    from capi import schema

    doc = (ROOT / "docs" / "api-format.md").read_text()
    for model in (schema.Event, schema.User, schema.Item):
        for field in model.model_fields:
            assert f"`{field}`" in doc, field
    for event_type in schema.DATA_TYPE_OF:
        assert f"`{event_type}`" in doc, event_type


def test_the_profiling_command_says_how_to_install_what_it_needs() -> None:
    text = " ".join((ROOT / "docs" / "performance.md").read_text().split())
    assert "pip install -e '.[dev,profile]'" in text and "profile_sender" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^profile = \["pyinstrument', pyproject, re.M)
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.profile_sender", "--events", "1"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "pip install -e '.[dev,profile]'" in proc.stderr


def test_examples_keep_the_key_off_the_command_line() -> None:
    lines: list[str] = []
    for doc in docrun.DOCUMENTS:
        lines += [ln for b in docrun.blocks(doc) if b.lang == "sh" for ln in b.text.splitlines()]
    for line in lines:
        assert not re.search(r"CAPI_API_KEY=\S", line), line
