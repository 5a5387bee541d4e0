from __future__ import annotations

import pytest

import usercontext


@pytest.fixture(name="anyio_backend", params=[pytest.param("asyncio"), pytest.param("trio")])
def _anyio_backend(request):
    """
    Run every async test on asyncio and on trio.
    """
    return request.param


@pytest.fixture(name="clean_state", autouse=True)
def _clean_state():
    """
    Give each test the default rules and no bound context, and check that it
    leaves no context bound behind it.
    """
    usercontext.configure(id_rules=usercontext.IdRules(), max_depth=32)
    assert usercontext.current_or_none() is None
    yield
    usercontext.configure(id_rules=usercontext.IdRules(), max_depth=32)
    assert usercontext.current_or_none() is None, "a test left a UserContext bound"


@pytest.fixture(name="ctx")
def _ctx():
    """
    A root context of user u-42.
    """
    return usercontext.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")


@pytest.fixture(name="other_ctx")
def _other_ctx():
    """
    A root context of another user, u-99.
    """
    return usercontext.UserContext(user_id="u-99", thread_id="t-8", run_id="r-2")


@pytest.fixture(
    name="both_request_paths", params=[False, True], ids=["no log reader", "log reader"]
)
def _both_request_paths(request):
    """
    Run the test without and with a logging adapter reading the ids of
    requests being resolved: the ASGI and WSGI middlewares serve a request by
    a different path for each (`usercontext._pending.readers`), and which one
    a test process takes would otherwise depend on what it imported before.
    """
    from usercontext._pending import readers  # private, for these tests only

    saved = readers[:]
    readers[:] = [True] if request.param else []
    yield
    readers[:] = saved
