"""
The ``usercontext`` command (also ``python -m usercontext``).

``usercontext report`` runs the validation scenarios on this machine and prints
what it measured. The report's code is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    import usercontext

    parser = argparse.ArgumentParser(
        prog="usercontext",
        description="Per-request isolation for multi-user Python services.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {usercontext.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="measure this machine and print a validation report",
        description=(
            "Run the validation scenarios on this machine and print a Markdown report of "
            "every figure measured, against its target. Progress goes to standard error. "
            "Exits with 1 if a target is missed, 0 otherwise."
        ),
    )
    report.add_argument(
        "--quick", action="store_true", help="a rough run of about a second, for smoke tests"
    )
    report.add_argument(
        "--json", metavar="PATH", help="also write every raw figure measured to PATH as JSON"
    )
    report.add_argument(
        "--http-server",
        choices=("in-process", "uvicorn"),
        default="in-process",
        help=(
            "where the HTTP section serves its example app: in-process (the default), or "
            "under uvicorn on 127.0.0.1 (needs uvicorn)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the ``usercontext`` command with *argv* (the process's arguments by default).

    Returns:
        The exit status: 0 on success, 1 if the report missed a target, 2 when
        no command was given.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from ._report import DEFAULT, QUICK, run_report

    sections = None
    if args.http_server == "uvicorn":
        import importlib.util

        if importlib.util.find_spec("uvicorn") is None:
            parser.error("--http-server uvicorn needs uvicorn: pip install uvicorn")
        from ._report import SECTIONS
        from ._report_http import with_server

        sections = with_server(SECTIONS, "uvicorn")
    return run_report(
        scale=QUICK if args.quick else DEFAULT, json_path=args.json, sections=sections
    )


if __name__ == "__main__":
    sys.exit(main())
