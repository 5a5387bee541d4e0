"""
What the tests of ``usercontext report`` share: a tiny scale, the metrics of
the contexts section, a path no one can write to, and a made-up row.
"""

from __future__ import annotations

import os

from pathlib import Path

import pytest

from usercontext._report import scale
from usercontext._report.rows import Goal, Quantity, Row


TINY = scale.Scale(
    name="tiny",
    repeats=2,
    batch_ns=20_000,
    memory_contexts=50,
    users=2,
    tasks_per_user=1,
    rounds=1,
)

METRICS = (
    "Creation, generated request id, vs floor",
    "Time per context vs legacy (0.15 ms)",
    "Creation rate vs legacy (4,000 contexts/s)",
    "Creation, every id new",
    "`ctx.child()` vs creation",
    "Memory per context, ids included",
    "Shallow size (`sys.getsizeof`) vs same-shape attrs slots instance",
    "`with bind(ctx)` vs class-based `ContextVar` set/reset",
    "`current()` vs `ContextVar.get()`",
    "Isolation: cross-user observations",
    "Isolation: context missing inside, or left behind after",
)


def unwritable(tmp_path) -> str:
    """
    Return a path in a directory this process cannot write to: a read-only
    directory, or for root (who may write to any directory) one in /sys.
    """
    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        return str(readonly / "r.json")
    if not Path("/sys/kernel").is_dir():  # pragma: no cover  # Linux has /sys
        pytest.skip("root may write anywhere, and there is no /sys to try")
    return "/sys/usercontext-report.json"


def fake_row(key: str, kind: str, ok: bool | None, name: str = "metric") -> Row:
    """
    A row of *kind* in the section *key*, named *name*, with a made-up figure.
    """
    return Row(
        id=f"{key}.{name}",
        kind=kind,
        metric=f"`{key}` {name}",
        target="≤ 1x",
        achieved="**2x**",
        ok=ok,
        value=Quantity(2.0, "x"),
        goal=None if kind == "info" else Goal("<=", 1.0, "x"),
    )
