# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of the FastAPI dependencies, checked by mypy and pyright.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI
from typing_extensions import assert_type

import usercontext as uc

from usercontext.fastapi import CurrentContext, Resource, current_context, current_emitter


if TYPE_CHECKING:
    from fastapi.requests import HTTPConnection


class Session:
    pass


app = FastAPI()


async def use_dependencies(conn: HTTPConnection) -> None:
    # The dependencies are plain async functions: tests can call or override them.
    assert_type(await current_context(conn), uc.UserContext)
    assert_type(await current_emitter(conn), uc.Emitter)


# Resource(key) is a Depends marker, typed Any as fastapi.Depends is, so that it
# fits in Annotated; the endpoint's annotation names the resource's type.
assert_type(Resource(Session), Any)


@app.get("/whoami")
async def whoami(
    ctx: CurrentContext, session: Annotated[Session, Resource(Session)]
) -> dict[str, str]:
    assert_type(ctx, uc.UserContext)
    assert_type(session, Session)
    return {"user_id": ctx.user_id}
