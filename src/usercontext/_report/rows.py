"""
Rows, their kinds and the verdict of ``usercontext report``.

Every row of the report has a kind. A *correctness* row (isolation, leaks,
bounds, success rates) holds or fails: PASS or FAIL. A *performance* row (a
timing, or a ratio of timings) meets its target or misses it: PASS or MISS.
An *info* row has no target: INFO. The exit code follows the correctness
rows only, unless the run is strict:

- 0: every correctness row holds (and, with ``--strict``, no performance row missed);
- 1: a correctness row failed (or, with ``--strict``, a performance row missed);
- 2: a usage error, or a crash (the section that crashed is named on standard error);
- 130: interrupted with Ctrl-C; the rows measured so far are printed.

Each row carries a stable id (``<section>.<name>``), its figures as plain
numbers with units, and its target as a comparison with a number and a unit,
so that a program reading the JSON output needs no Markdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import attrs


if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "KINDS",
    "LEGACY",
    "Goal",
    "Kind",
    "Quantity",
    "Row",
    "Status",
    "counts",
    "exit_code",
    "plain",
    "verdict",
]

Kind = Literal["correctness", "performance", "info"]
Status = Literal["PASS", "FAIL", "MISS", "INFO"]
KINDS: tuple[Kind, ...] = ("correctness", "performance", "info")
# The statuses each kind can have, in the order the summary counts them.
STATUSES: dict[Kind, tuple[Status, ...]] = {
    "correctness": ("PASS", "FAIL"),
    "performance": ("PASS", "MISS"),
    "info": ("INFO",),
}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C

# What "legacy" means wherever the report says it: the system whose figures
# the report compares against, and where those figures come from.
# The legacy system's success rate under 1,000 concurrent requests.
LEGACY_SUCCESS = 0.987

LEGACY: dict[str, Any] = {
    "system": (
        "the system this library replaces, the per-request UserExecutionContext architecture "
        "of Netra Core Generation 1"
    ),
    "source": (
        "that system's own 'Phase 1 Performance Validation Report: UserExecutionContext "
        "Migration' (2025-09-02), which gives them for its per-request architecture, not for "
        "its singleton baseline"
    ),
    "measured_here": False,
}


@attrs.frozen
class Quantity:
    """
    A number and its unit, such as ``Quantity(1.23, "us")``.
    """

    value: float
    unit: str

    def to_json(self) -> dict[str, Any]:
        """
        Return it as ``{"value": ..., "unit": ...}``.
        """
        return {"value": self.value, "unit": self.unit}


@attrs.frozen
class Goal:
    """
    A row's target: the measured value must compare to *value* with
    *comparison*, such as ``Goal("<=", 2.5, "x")``.
    """

    comparison: Literal["<=", "<", ">=", ">", "=="]
    value: float
    unit: str

    def to_json(self) -> dict[str, Any]:
        """
        Return it as ``{"comparison": ..., "value": ..., "unit": ...}``.
        """
        return {"comparison": self.comparison, "value": self.value, "unit": self.unit}


@attrs.frozen(kw_only=True)
class Row:
    """
    One line of a section's table: what was measured, against which target.

    Args:
        id: Stable across runs and versions: ``<section key>.<name>``.
        kind: ``"correctness"``, ``"performance"`` or ``"info"``.
        metric: What was measured, for the Markdown table.
        target: The target, as the Markdown table shows it.
        achieved: What was measured, as the Markdown table shows it.
        ok: Whether the target was met; `None` for an info row.
        value: The main figure measured, if any.
        goal: The target of *value*, if it has one.
        details: Other figures of the row, by name.
        note: Plain text for a row that has no figure (such as a section
            that could not run).
    """

    id: str
    kind: Kind
    metric: str
    target: str
    achieved: str
    ok: bool | None = None
    value: Quantity | None = None
    goal: Goal | None = None
    details: Mapping[str, Quantity] = attrs.field(factory=dict[str, Quantity])
    note: str = ""

    def __attrs_post_init__(self) -> None:
        if (self.ok is None) != (self.kind == "info"):
            msg = (
                f"Row {self.id!r} of kind {self.kind!r} has ok={self.ok!r}: give ok=True or "
                "False to a correctness or performance row, and leave it None on an info row."
            )
            raise ValueError(msg)

    @property
    def status(self) -> Status:
        """
        PASS or FAIL for correctness, PASS or MISS for performance, INFO for info.
        """
        if self.kind == "info":
            return "INFO"
        if self.ok:
            return "PASS"
        return "FAIL" if self.kind == "correctness" else "MISS"

    def to_json(self) -> dict[str, Any]:
        """
        Return the row as plain JSON values: numbers with units, no Markdown.
        """
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "metric": plain(self.metric),
            "value": None if self.value is None else self.value.to_json(),
            "target": None if self.goal is None else self.goal.to_json(),
            "details": {name: q.to_json() for name, q in self.details.items()},
            "note": self.note,
        }


def success_rate_row(row_id: str, metric: str, succeeded: int, total: int, legacy: float) -> Row:
    """
    Return the correctness row of a scenario's success rate: *succeeded* of
    *total* requests, against 100% and the *legacy* system's rate (a fraction).
    """
    return Row(
        id=row_id,
        kind="correctness",
        metric=metric,
        target=f"100% (legacy {legacy:.1%})",
        achieved=f"{succeeded:,} of {total:,}: **{succeeded / total:.1%}**",
        ok=succeeded == total,
        value=Quantity(100 * succeeded / total, "%"),
        goal=Goal("==", 100, "%"),
        details={
            "succeeded": Quantity(succeeded, "requests"),
            "requests": Quantity(total, "requests"),
            "legacy": Quantity(100 * legacy, "%"),
        },
    )


def plain(text: str) -> str:
    """
    Return *text* without the Markdown marks the report's tables use.
    """
    return text.replace("**", "").replace("`", "")


def counts(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """
    Count *rows* per kind and status: ``{"correctness": {"pass": 3, "fail": 0}, ...}``.
    """
    return {
        kind: {
            status.lower(): sum(r.kind == kind and r.status == status for r in rows)
            for status in STATUSES[kind]
        }
        for kind in KINDS
    }


def exit_code(rows: Sequence[Row], *, strict: bool = False) -> int:
    """
    Return the exit code of a complete run that measured *rows*.

    Returns:
        `EXIT_FAILED` if a correctness row failed, or, when *strict*, if a
        performance row missed its target; `EXIT_OK` otherwise.
    """
    judged = ("correctness", "performance") if strict else ("correctness",)
    return EXIT_FAILED if any(r.kind in judged and not r.ok for r in rows) else EXIT_OK


def verdict(rows: Sequence[Row], code: int, *, strict: bool = False) -> str:
    """
    Return the verdict of a complete run, in one Markdown paragraph.
    """
    n = counts(rows)
    failed = [f"`{r.id}`" for r in rows if r.status == "FAIL"]
    missed = [f"`{r.id}`" for r in rows if r.status == "MISS"]
    correctness = (
        f"**Correctness: {n['correctness']['pass']} PASS, {n['correctness']['fail']} FAIL**"
        + (f" ({', '.join(failed)})" if failed else "; every check holds")
    )
    performance = (
        f"**Performance: {n['performance']['pass']} PASS, {n['performance']['miss']} MISS**"
        + (f" ({', '.join(missed)})" if missed else "")
        + ("; judged (--strict)" if strict else "; reported, not judged (without --strict)")
    )
    return f"{correctness}. {performance}. **Info: {n['info']['info']}.** **Exit code {code}.**"
