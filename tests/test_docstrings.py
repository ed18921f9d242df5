"""Docstrings that draw structure are kept true by these tests."""

from __future__ import annotations

import re

import capi.errors
import capi.failures
from capi.errors import CapiError
from capi.failures import Reason
from capi.worker import decisions
from capi.worker.decisions import Outcome


def _drawn_tree(doc: str) -> dict[str, str]:
    """Each class drawn in a box-drawing tree, and the class drawn as its parent."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^(\s*)(?:[│ ]*[├└]── )?([A-Z]\w+)\b", line)
        if not m or not ("──" in line or line.strip() == m.group(2)):
            continue
        name = m.group(2)
        depth = line.index(name)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_the_drawn_exception_tree_is_the_class_tree() -> None:
    assert capi.errors.__doc__ is not None
    drawn = _drawn_tree(capi.errors.__doc__)
    real = {
        c.__name__: next(b for b in c.__bases__ if issubclass(b, CapiError)).__name__
        for c in _subclasses(CapiError)
        if c.__module__ == "capi.errors"
    }
    assert drawn == real


def test_every_reason_is_in_the_failures_table_and_every_outcome_in_the_fates_table() -> None:
    assert capi.failures.__doc__ is not None and decisions.__doc__ is not None
    assert [r.value for r in Reason if r.value not in capi.failures.__doc__] == []
    table = decisions.__doc__
    assert [o.value for o in (*Reason, *Outcome) if o.value not in table] == []
