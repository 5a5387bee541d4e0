"""
The ``usercontext`` command (also ``python -m usercontext``).

``usercontext report`` runs the validation scenarios on this machine and prints
what it measured. The report's code is imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback

from typing import TYPE_CHECKING, NoReturn


if TYPE_CHECKING:
    from collections.abc import Generator, Sequence


# The keys of the report's sections, in order; a test checks them against
# usercontext._report.sections.SECTIONS, which this module does not import up
# front.
SECTION_KEYS = (
    "contexts",
    "engines",
    "db",
    "events",
    "http",
    "load",
    "memory",
    "stability",
    "across",
)

EXIT_CODES = """\
exit codes:
  0    every correctness row holds (isolation, leaks, bounds, success rates);
       performance rows may have missed their targets (MISS), unless --strict
  1    a correctness row failed (FAIL), or with --strict a performance row missed
  2    usage error (such as a --json path or an --out directory that cannot be
       written), or a crash:
       standard error names the section and shows the traceback
  130  interrupted with Ctrl-C: the rows measured so far are printed
"""


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
            "Each row is a correctness check (PASS or FAIL), a performance target (PASS or "
            "MISS) or information (INFO); the exit code follows the correctness rows."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = report.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="a rough run of about 20 seconds, for smoke tests"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help=(
            "the default run with a long stability run: a sustained load for 5 minutes, its "
            "memory trend and latency drift judged against targets (about 7 minutes in all)"
        ),
    )
    report.add_argument(
        "--json",
        metavar="PATH",
        help=(
            "also write every row and raw figure measured to PATH as JSON; the path is "
            "checked before the run"
        ),
    )
    report.add_argument(
        "--out",
        metavar="DIR",
        help=(
            "also write report.md, report.json and report.html (self-contained, with charts; "
            "it needs the report extra: pip install 'usercontext[report]') into DIR, made if "
            "missing; checked before the run"
        ),
    )
    report.add_argument(
        "--strict",
        action="store_true",
        help="exit with 1 when a performance row misses its target, too",
    )
    report.add_argument(
        "--section",
        action="append",
        choices=SECTION_KEYS,
        metavar="KEY",
        help=(
            f"run only this section (repeat for more): {', '.join(SECTION_KEYS)}; all by default"
        ),
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
    # Usage errors found after parsing are the report's, with its usage line.
    report.set_defaults(report_parser=report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the ``usercontext`` command with *argv* (the process's arguments by default).

    Returns:
        The exit status of ``usercontext report``: 0 when every correctness row
        holds, 1 when one fails (or, with ``--strict``, a performance row
        misses its target), 2 for a usage error or a crash, 130 when
        interrupted with Ctrl-C. 2 also when no command was given.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    interrupt: KeyboardInterrupt | None = None
    try:
        code = _report(args.report_parser, args)
    except KeyboardInterrupt as e:
        # Outside a section (a section's interruption is handled by the report).
        sys.stderr.write("\nusercontext report: interrupted.\n")
        interrupt = e
        code = 130
    except Exception as e:  # any crash exits with 2, described
        sys.stderr.write(
            f"usercontext report: crashed ({type(e).__name__}: {e}); the traceback follows.\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__))
        )
        return 2
    if interrupt is not None:
        # Outside the handler, where nothing else holds its traceback.
        from ._report.frame import forget_interrupt

        forget_interrupt(interrupt)
    return code


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import importlib.util

    if args.http_server == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        parser.error("--http-server uvicorn needs uvicorn: pip install uvicorn")
    from ._report.frame import check_json_path, run_report
    from ._report.output import check_out_dir
    from ._report.scale import DEFAULT, FULL, QUICK
    from ._report.sections import SECTIONS

    if args.json is not None:
        problem = check_json_path(args.json)
        if problem is not None:
            parser.error(problem)
    if args.out is not None:
        problem = check_out_dir(args.out)
        if problem is not None:
            parser.error(problem)
    sections = SECTIONS
    if args.http_server == "uvicorn":
        from ._report.http import with_server

        sections = with_server(sections, "uvicorn")
    if args.section:
        sections = tuple(s for s in sections if s.key in args.section)
    with _ctrl_c_raises():
        return run_report(
            scale=QUICK if args.quick else FULL if args.full else DEFAULT,
            json_path=args.json,
            out_dir=args.out,
            sections=sections,
            strict=args.strict,
        )


@contextlib.contextmanager
def _ctrl_c_raises() -> Generator[None]:
    """
    Make Ctrl-C raise `KeyboardInterrupt` wherever it lands, for the block.

    ``asyncio.run`` replaces Python's default SIGINT handler with its own, and
    resets that handler's count of interrupts after installing it: a Ctrl-C
    that lands while it starts is lost, and the run ends in a bare
    `asyncio.CancelledError` (exit 1 and a traceback instead of 130). A
    handler of our own is not the default, so ``asyncio.run`` leaves it alone.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _raise_interrupt(signum: int, frame: object) -> NoReturn:  # noqa: ARG001  # a signal handler's arguments
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
