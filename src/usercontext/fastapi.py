"""
FastAPI dependencies for the request's context, resources, engine and events.

Install it with ``pip install usercontext[fastapi]``. Every dependency here
reads what `usercontext.asgi.UserContextMiddleware` set up for the request (see
`usercontext.asgi.request_state`), so the middleware must wrap the application:

>>> from fastapi import FastAPI
>>> from fastapi.testclient import TestClient
>>> import usercontext as uc
>>> from usercontext.asgi import UserContextMiddleware
>>> from usercontext.fastapi import CurrentContext
>>> def resolve(scope):  # a real resolver checks the request's credentials
...     return uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
>>> app = FastAPI()
>>> app.add_middleware(UserContextMiddleware, resolver=resolve)
>>> @app.get("/me")
... def me(ctx: CurrentContext) -> dict[str, str]:
...     return {"user": ctx.user_id}
>>> TestClient(app).get("/me").json()
{'user': 'u-42'}

The dependencies take a ``starlette.requests.HTTPConnection``, so the same ones
work in HTTP routes and WebSocket routes, and in sync and async endpoints alike:
they resolve on the event loop, and FastAPI hands their values to a sync
endpoint running in a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import weakref

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, HTTPException, WebSocketException

# At run time: FastAPI reads the annotations of the dependencies below.
from fastapi.requests import HTTPConnection  # noqa: TC002
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase

from usercontext import (
    BackendUnavailableError,
    Emitter,
    EngineFactory,
    FactoryClosedError,
    QuotaError,
    QuotaTimeoutError,
    RequestRefusedError,
    UserContext,
)
from usercontext._http import exempt_matcher, exempt_paths
from usercontext.asgi import RequestState, request_state


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Mapping

    from fastapi import FastAPI
    from fastapi.dependencies.models import Dependant


__all__ = [
    "CurrentContext",
    "CurrentEmitter",
    "EngineDep",
    "ProblemException",
    "Resource",
    "current_context",
    "current_emitter",
    "document_auth",
]

# WebSocket close code (RFC 6455, IANA registry): try again later.
_TRY_AGAIN_LATER = 1013
# The longest reason a close frame may carry, in bytes (RFC 6455).
_MAX_REASON = 123
_DENIAL = "websocket.http.response"

# One dependency per factory and Retry-After, so that every EngineDep(factory)
# of a request is the same dependency to FastAPI: one engine (one slot) per
# request, and one callable to put in app.dependency_overrides. The callables
# are held weakly: the routes declaring them keep them (and their factory) alive.
_ENGINE_DEPENDENCIES: weakref.WeakValueDictionary[
    tuple[EngineFactory[Any], int | None], Callable[..., Any]
] = weakref.WeakValueDictionary()


def _state(conn: HTTPConnection) -> RequestState:
    return request_state(conn.scope)


async def current_context(conn: HTTPConnection) -> UserContext:
    """
    current_context(conn)

    The dependency behind `CurrentContext`: the request's context.

    Key ``app.dependency_overrides`` on it to give endpoints another context
    in tests: ``app.dependency_overrides[current_context] = lambda: ctx``.

    .. versionadded:: 0.1.0
    """
    return _state(conn).ctx


async def current_emitter(conn: HTTPConnection) -> Emitter:
    """
    current_emitter(conn)

    The dependency behind `CurrentEmitter`: the emitter of the request's user.

    Key ``app.dependency_overrides`` on it to replace the emitter in tests.

    .. versionadded:: 0.1.0
    """
    return _state(conn).emitter


class ProblemException(HTTPException):
    """
    How the dependencies of this module refuse a request (``429``, ``503``):
    an ``HTTPException`` whose response is a problem document (RFC 9457,
    ``application/problem+json``), the shape of the middleware's refusals.

    Its handler is put in place on the first refusal, for the application
    that refuses, unless the application registered one for this class
    already: register your own with
    ``app.add_exception_handler(ProblemException, handler)`` to format it
    your way. Its attribute ``problem`` holds the body.

    Args:
        problem: The problem document: ``type``, ``title``, ``status``,
            ``detail``, and extension members such as ``request_id``.
        headers: Headers of the response, such as ``Retry-After``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, problem: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(problem["status"], detail=problem["detail"], headers=headers)
        self.problem = problem


def _problem_response(conn: HTTPConnection, exc: Exception) -> JSONResponse:  # noqa: ARG001  # Starlette's handler signature
    assert isinstance(exc, ProblemException)  # noqa: S101  # registered for that class only
    return JSONResponse(
        exc.problem,
        status_code=exc.status_code,
        headers=exc.headers,
        media_type="application/problem+json",
    )


def _with_handler(conn: HTTPConnection) -> None:
    """
    Make sure the application's exception handlers answer a
    `ProblemException` with its problem document.
    """
    # Starlette's ExceptionMiddleware puts its handlers in the scope, and
    # looks the handler of an exception up there when it is raised; a
    # handler the application registered for the class stays in place.
    handlers = conn.scope.get("starlette.exception_handlers")
    if handlers is not None:
        handlers[0].setdefault(ProblemException, _problem_response)


CurrentContext = Annotated[UserContext, Depends(current_context)]
"""
The `usercontext.UserContext` of the request, as bound by
`usercontext.asgi.UserContextMiddleware`: ``def endpoint(ctx: CurrentContext)``.

Without the middleware, the request fails with
`usercontext.exceptions.NoContextError`, whose message says how to add it (the
client gets ``500``). Tests replace it through `current_context`.

.. versionadded:: 0.1.0
"""

CurrentEmitter = Annotated[Emitter, Depends(current_emitter)]
"""
The `usercontext.Emitter` of the request's user, from the hub given to
`usercontext.asgi.UserContextMiddleware`: ``async def endpoint(events: CurrentEmitter)``.

Without a hub, the request fails with `LookupError`, whose message says how to
pass one. Tests replace it through `current_emitter`.

.. versionadded:: 0.1.0
"""


def _name(key: object) -> str:
    return getattr(key, "__qualname__", None) or repr(key)


def Resource(key: Hashable) -> Any:  # noqa: N802  # used like Depends, and named like it
    """
    Declare a dependency on the resource *key* of the request's scope.

    ``session: Annotated[AsyncSession, Resource(AsyncSession)]`` gives the
    endpoint ``await scope.aget(AsyncSession)`` of the scope that
    `usercontext.asgi.UserContextMiddleware` opened for the request: created on
    first use, the same object for the rest of the request, and cleaned up by
    the middleware after the response has been sent (or when the WebSocket
    closes). Any provider works, async ones included, in sync endpoints too.

    Args:
        key: A key registered in the middleware's `usercontext.Registry`.

    Returns:
        A ``fastapi.Depends`` marker, to put in ``Annotated``.

    Raises:
        LookupError: When the request is served, if the middleware was given
            no registry (`usercontext.exceptions.NoContextError` if there is no
            middleware at all), or `KeyError` if nothing is registered for
            *key*.

    .. versionadded:: 0.1.0
    """
    hash(key)
    dependency = _RESOURCE_DEPENDENCIES.get(key)
    if dependency is None:
        dependency = _RESOURCE_DEPENDENCIES[key] = _resource_dependency(key)
    return Depends(dependency)


# One dependency per key, as for EngineDep: every Resource(key) of a request is
# one dependency to FastAPI, and Resource(key).dependency one callable to put
# in app.dependency_overrides.
_RESOURCE_DEPENDENCIES: dict[Hashable, Callable[..., Any]] = {}


def _resource_dependency(key: Hashable) -> Callable[[HTTPConnection], Awaitable[Any]]:
    name = _name(key)

    async def resource(conn: HTTPConnection) -> Any:
        scope = _state(conn).resources
        if scope is None:
            msg = (
                f"Resource({name}) needs a registry, but UserContextMiddleware was given "
                "none: pass registry=Registry() to it, and register the resource there."
            )
            raise LookupError(msg)
        return await scope.aget(key)

    resource.__qualname__ = resource.__name__ = f"Resource({name})"
    return resource


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def _refusal(
    conn: HTTPConnection, ctx: UserContext, status: int, body: dict[str, Any]
) -> Exception:
    """
    Return what to raise to refuse the request with *status* and the problem
    document of *body* (``title``, ``detail``, ``error``, ``retry_after``).
    """
    problem = {
        "type": "about:blank",
        "title": body["title"],
        "status": status,
        **body,
        "request_id": ctx.request_id,
    }
    headers = {"Retry-After": str(body["retry_after"])}
    if conn.scope["type"] == "http" or _DENIAL in conn.scope.get("extensions", {}):
        # Starlette answers a WebSocket handshake with the same response, as
        # a denial response.
        _with_handler(conn)
        return ProblemException(problem, headers=headers)
    reason = f"{status} {body['error']}: retry after {body['retry_after']} s"
    return WebSocketException(_TRY_AGAIN_LATER, reason=reason[:_MAX_REASON])


def _quota_refusal(
    conn: HTTPConnection, ctx: UserContext, e: QuotaError, fixed: int | None
) -> Exception:
    retry_after = fixed if fixed is not None else _seconds(e.timeout or 0)
    if e.scope == "key":
        message = f"Too many of your requests are running at once (the limit is {e.limit})."
    else:
        message = "The service is at capacity."
    body = {
        "title": "Too Many Requests",
        "detail": f"{message} Retry after {retry_after} s.",
        "error": "quota_timeout" if isinstance(e, QuotaTimeoutError) else "quota_exceeded",
        "retry_after": retry_after,
    }
    return _refusal(conn, ctx, 429, body)


def EngineDep(  # noqa: N802  # used like Depends, and named like it
    factory: EngineFactory[Any],
    *,
    retry_after: float | None = None,
    scope: Literal["function", "request"] = "function",
) -> Any:
    """
    Declare a dependency on an engine of *factory* for the request's user.

    ``engine: Annotated[Engine, EngineDep(factory)]`` runs the endpoint inside
    ``async with factory.engine(ctx) as engine:``, under the user's quota. With
    the default *scope* ``"function"``, the engine is closed and its slot given
    back as soon as the endpoint returns or raises, before the response is
    sent: a slow client holds no slot, and a failing close turns the response
    into an error instead of a success. With *scope* ``"request"``, it is
    closed after the response has been sent, for a ``StreamingResponse`` that
    uses the engine. On a WebSocket route, the engine lives as long as the
    endpoint.

    When the quota refuses (``QuotaExceededError``) or gives up waiting
    (``QuotaTimeoutError``), the client gets ``429`` with a ``Retry-After`` header
    and a problem document (RFC 9457, ``application/problem+json``, the shape
    of the middleware's refusals): ``{"type": "about:blank", "title": "Too
    Many Requests", "status": 429, "detail": ..., "error": "quota_exceeded"
    or "quota_timeout", "retry_after": ..., "request_id": ...}``, raised as a
    `ProblemException`.
    Retry-After is *retry_after* rounded up, or, by default, the factory's
    *timeout* rounded up (the client already waited that long in vain), and at
    least 1 second. After the factory was closed, the client gets ``503`` with
    ``"error": "unavailable"``; when a shared quota's backend does not answer
    (`usercontext.exceptions.BackendUnavailableError`), ``503`` with
    ``"error": "backend_unavailable"``, and Retry-After *retry_after* or 1 s.
    A refusal of the factory's `usercontext.Admission` policy (rate limit,
    load shedding, circuit breaker) gets its own status (``429`` or ``503``),
    ``error`` and ``Retry-After``.
    A WebSocket handshake is refused with the same response where the server
    supports denial responses, and else closed with code 1013 (try again
    later).

    Every ``EngineDep(factory)`` of one request with the same *retry_after* is
    one dependency to FastAPI: the request gets one engine however many times
    it is declared, and ``app.dependency_overrides[EngineDep(factory).dependency]``
    replaces it in tests.

    Args:
        factory: The factory creating the engines.
        retry_after: The seconds in the ``Retry-After`` header of a refusal.
        scope: When to close the engine, as in ``fastapi.Depends``.

    Returns:
        A ``fastapi.Depends`` marker, to put in ``Annotated``.

    .. versionadded:: 0.1.0
    """
    if not isinstance(factory, EngineFactory):
        msg = f"factory must be a usercontext.EngineFactory, got {type(factory).__name__}."  # type: ignore[unreachable]
        raise TypeError(msg)
    fixed: int | None = None
    if retry_after is not None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
            msg = f"retry_after must be a number of seconds or None, got {retry_after!r}."
            raise TypeError(msg)
        if not retry_after > 0 or math.isinf(retry_after):
            msg = f"retry_after must be a finite number of seconds > 0, got {retry_after!r}."
            raise ValueError(msg)
        fixed = _seconds(retry_after)
    if scope not in ("function", "request"):
        msg = f"scope must be 'function' or 'request', got {scope!r}."
        raise ValueError(msg)
    dependency = _ENGINE_DEPENDENCIES.get((factory, fixed))
    if dependency is None:
        dependency = _ENGINE_DEPENDENCIES[factory, fixed] = _engine_dependency(factory, fixed)
    return Depends(dependency, scope=scope)


def _engine_dependency(
    factory: EngineFactory[Any], fixed: int | None
) -> Callable[[HTTPConnection], AsyncIterator[Any]]:
    async def engine(conn: HTTPConnection) -> AsyncIterator[Any]:
        ctx = _state(conn).ctx
        async with contextlib.AsyncExitStack() as stack:
            try:
                value = await stack.enter_async_context(factory.engine(ctx))
            except QuotaError as e:
                raise _quota_refusal(conn, ctx, e, fixed) from None
            except BackendUnavailableError:
                body = {
                    "title": "Service Unavailable",
                    "detail": "The service cannot check its limits right now. Retry shortly.",
                    "error": "backend_unavailable",
                    "retry_after": 1 if fixed is None else fixed,
                }
                raise _refusal(conn, ctx, 503, body) from None
            except RequestRefusedError as e:
                # The admission policy's refusals carry their own retry_after.
                body = {
                    "title": e.title,
                    "detail": e.detail,
                    "error": e.error,
                    "retry_after": e.retry_after or (1 if fixed is None else fixed),
                }
                raise _refusal(conn, ctx, e.status, body) from None
            except FactoryClosedError:
                body = {
                    "title": "Service Unavailable",
                    "detail": "The service is shutting down. Retry shortly.",
                    "error": "unavailable",
                    "retry_after": 1 if fixed is None else fixed,
                }
                raise _refusal(conn, ctx, 503, body) from None
            yield value

    engine.__qualname__ = engine.__name__ = f"EngineDep({factory!r})"
    return engine


# The problem document of every refusal, as an OpenAPI schema (RFC 9457).
_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "A problem document (RFC 9457) of a refused request.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference", "default": "about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "error": {"type": "string", "description": "A short machine-readable code."},
        "request_id": {"type": "string"},
        "retry_after": {"type": "integer", "description": "Seconds to wait before retrying."},
        "field": {"type": "string", "description": "The invalid field of a 400."},
    },
    "required": ["type", "title", "status", "detail", "request_id"],
}
_REFUSALS = {
    "400": "Invalid request context: an id breaks the rules.",
    "401": "Unauthenticated: no credentials, or bad ones.",
}
_ENGINE_REFUSALS = {
    "429": "Too many requests at once: retry after the Retry-After header's seconds.",
    "503": "The service is shutting down, or cannot check its limits: retry shortly.",
}


def document_auth(
    app: FastAPI,
    *,
    scheme: Mapping[str, Any] | SecurityBase | None = None,
    name: str = "bearerAuth",
    exempt: Iterable[str] = (),
) -> None:
    """
    document_auth(app, *, scheme=None, name="bearerAuth", exempt=())

    Show in *app*'s OpenAPI document what `usercontext.asgi.UserContextMiddleware`
    does: its security scheme, and the refusals each operation may answer.

    Every operation whose path is not *exempt* (the middleware's rule: a path
    and everything below it) gets the security requirement *name*, and the
    responses ``401`` and ``400`` with the problem document (schema
    ``Problem``, ``application/problem+json``); operations that depend on an
    `EngineDep` get ``429`` and ``503`` too. Responses an operation declares
    itself are kept. Call it once, after the routes are added or before:
    the document is made when first asked for, as FastAPI's own.

    Args:
        app: The FastAPI application.
        scheme: The OpenAPI security scheme: a mapping such as ``{"type":
            "apiKey", "in": "cookie", "name": "session"}``, or a FastAPI
            security object such as ``fastapi.security.HTTPBearer()``; by
            default HTTP bearer authentication.
        name: The name of the scheme in the document.
        exempt: The paths the middleware exempts, which need no credentials.

    .. versionadded:: 0.1.0
    """
    if scheme is None:
        definition: dict[str, Any] = {"type": "http", "scheme": "bearer"}
    elif isinstance(scheme, SecurityBase):
        definition = scheme.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    else:
        definition = dict(scheme)
    is_exempt: Callable[[str], bool] = exempt_matcher(exempt_paths(exempt)) or (lambda _: False)
    original = app.openapi
    done: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema: dict[str, Any] = original()
        if not done:
            done.append(True)
            _document(app, schema, definition, name, is_exempt)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(
    app: FastAPI,
    schema: dict[str, Any],
    definition: dict[str, Any],
    name: str,
    is_exempt: Callable[[str], bool],
) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[name] = definition
    components.setdefault("schemas", {})["Problem"] = _PROBLEM_SCHEMA
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    engines = set(_ENGINE_DEPENDENCIES.values())
    for route in app.routes:
        if not isinstance(route, APIRoute) or is_exempt(route.path_format):
            continue
        refusals = dict(_REFUSALS)
        if _uses(route.dependant, engines):
            refusals.update(_ENGINE_REFUSALS)
        operations = schema.get("paths", {}).get(route.path_format, {})
        for method in route.methods or ():
            operation = operations.get(method.lower())
            if operation is None:
                continue
            operation.setdefault("security", []).append({name: []})
            responses = operation.setdefault("responses", {})
            for status, description in refusals.items():
                responses.setdefault(status, {"description": description, "content": problem})


def _uses(dependant: Dependant, calls: set[Callable[..., Any]]) -> bool:
    """
    Tell whether *dependant* depends on one of *calls*, at any depth.
    """
    return dependant.call in calls or any(_uses(d, calls) for d in dependant.dependencies)
