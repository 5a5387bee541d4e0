from __future__ import annotations

import pytest


@pytest.fixture(name="anyio_backend", params=["asyncio", "trio"])
def _anyio_backend(request: pytest.FixtureRequest) -> str:
    """
    Run every async test on asyncio and on trio (the clients; the server runs
    on uvicorn, which is asyncio).
    """
    return str(request.param)
