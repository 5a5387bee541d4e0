from __future__ import annotations

import subprocess
import sys

import pytest

import usercontext

from usercontext import UserContext, _log_fields


@pytest.fixture(name="ctx")
def _ctx():
    return UserContext(
        user_id="u-1", thread_id="t-1", run_id="r-1", request_id="q-1", metadata={"plan": "pro"}
    )


class TestAddFields:
    def test_bound(self, ctx):
        """
        With a context bound, the line gets exactly ID_KEYS, each the field of
        the same name, and the allowlisted metadata.
        """
        line: dict[str, object] = {}
        with usercontext.bind(ctx):
            _log_fields.add_fields(line, ("plan", "tenant"), None)

        assert tuple(line)[:4] == _log_fields.ID_KEYS
        assert line == {
            "user_id": "u-1",
            "thread_id": "t-1",
            "run_id": "r-1",
            "request_id": "q-1",
            "plan": "pro",
            "tenant": None,
        }

    def test_unbound(self):
        """
        With no context bound, every key gets the default.
        """
        line: dict[str, object] = {}
        _log_fields.add_fields(line, ("plan",), _log_fields.MISSING)

        assert line == dict.fromkeys((*_log_fields.ID_KEYS, "plan"), "-")

    def test_keeps_keys(self, ctx):
        """
        Keys the line has already are kept.
        """
        line: dict[str, object] = {"run_id": "mine", "plan": 2}
        with usercontext.bind(ctx):
            _log_fields.add_fields(line, ("plan",), "-")

        assert (line["run_id"], line["plan"], line["user_id"]) == ("mine", 2, "u-1")

    def test_metadata_keys(self):
        """
        The allowlist keeps its order without duplicates, and refuses an id.
        """
        check = {"owner": "F", "reserved": frozenset({"msg"}), "where": "line"}

        assert _log_fields.metadata_keys(["b", "a", "b"], identifiers=True, **check) == ("b", "a")
        with pytest.raises(ValueError, match=r"F\(metadata=...\) cannot allowlist 'run_id'"):
            _log_fields.metadata_keys(["run_id"], identifiers=False, **check)


class TestAdapters:
    def test_same_default(self):
        """
        Both logging adapters show a missing context the same way.
        """
        structlog = pytest.importorskip("usercontext.structlog")
        from usercontext.stdlib import ContextFilter

        assert _log_fields.MISSING == "-"
        assert ContextFilter().default == structlog.AddContext().default == "-"

    def test_structlog_adapter_alone(self):
        """
        The structlog adapter does not load the stdlib adapter; it shares the
        log fields module only.
        """
        pytest.importorskip("structlog")
        code = (
            "import sys, usercontext.structlog\n"
            "print('usercontext.stdlib' in sys.modules, 'usercontext._log_fields' in sys.modules)"
        )
        out = subprocess.run(  # noqa: S603  # our own interpreter and code
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout

        assert out.split() == ["False", "True"]
