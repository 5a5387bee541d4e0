"""
Small helpers shared by the modules that close things.
"""

from __future__ import annotations

import logging

from typing import Any


logger = logging.getLogger("usercontext")


def add_note(exc: BaseException, note: str) -> None:
    """
    Add *note* to *exc*, as `BaseException.add_note` does on Python 3.11+.
    """
    notes: Any = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        exc.__notes__ = notes
    notes.append(note)


def describe(exc: BaseException) -> str:
    """
    Return ``"TypeName: message"`` for *exc*.
    """
    return f"{type(exc).__qualname__}: {exc}"
