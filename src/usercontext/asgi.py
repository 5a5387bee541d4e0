"""
Give every HTTP request and WebSocket connection of an ASGI application its own
`usercontext.UserContext`, and optionally its own scope of resources.

`UserContextMiddleware` is plain ASGI: it works under any ASGI framework
(Starlette, FastAPI, Litestar, Quart, ...) and needs nothing beyond the core.
Install it with ``pip install usercontext[asgi]`` (the extra adds nothing; it
exists so that every adapter can be asked for by name).

Each request runs in a fresh copy of the Context of the server's task, so
nothing one request binds or sets can be seen by the next request served by
the same task, and the server's own ``send`` and ``receive`` run where no user
is bound, so nothing the server starts from them carries the request's user.
"""

from __future__ import annotations

import functools
import inspect

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextvars import copy_context
from typing import TYPE_CHECKING, Any, TypeVar, overload

from usercontext import (
    EmitterHub,
    InvalidContextError,
    NoContextError,
    Registry,
    UserContext,
    bind,
    current,
    strip_context_headers,
    to_thread,
)
from usercontext._asgi_refusal import refuse
from usercontext._asgi_response import (
    ASGIApp,
    Receive,
    RequestLink,
    Send,
    _answer_crash,
    logger,
)
from usercontext._context import with_request_id
from usercontext._current import _fresh_context, _get, _var, isolated_call
from usercontext._http import (
    GOOD_REQUEST_ID as _GOOD_REQUEST_ID,
)
from usercontext._http import (
    Refusal,
    check_arguments,
    refusal,
)
from usercontext._http import (
    callable_name as _name,
)
from usercontext._http import (
    checked_factory as _checked_factory,
)
from usercontext._http import (
    exempt_matcher as _exempt_matcher,
)
from usercontext._http import (
    exempt_paths as _exempt_paths,
)
from usercontext._http import (
    id_of as _id_of,
)
from usercontext._http import (
    wrong_return as _wrong_return,
)
from usercontext._pending import Pending, pending, readers

from ._asgi_state import RequestState


if TYPE_CHECKING:
    from typing import Concatenate

    from typing_extensions import ParamSpec

    from usercontext import Scope

    P = ParamSpec("P")

__all__ = [
    "STATE_KEY",
    "RequestState",
    "Resolver",
    "UserContextMiddleware",
    "in_child_scope",
    "request_state",
]

T = TypeVar("T")

#: A resolver: takes the ASGI scope, returns the request's context, or `None`
#: to let it through with no user (or an awaitable of either).
Resolver = Callable[
    [MutableMapping[str, Any]], "UserContext | Awaitable[UserContext | None] | None"
]

#: The key of the ASGI scope under which the middleware keeps the `RequestState`.
STATE_KEY = "usercontext"

# `_resolve`'s default: call the resolver.
_CALL: Any = object()


def request_state(scope: MutableMapping[str, Any]) -> RequestState:
    """
    Return the `RequestState` that `UserContextMiddleware` put in *scope*.

    *scope* is the ASGI scope; under Starlette and FastAPI it is
    ``request.scope`` (or ``websocket.scope``).

    Raises:
        NoContextError: If the request did not pass through the middleware, or
            passed with no user (its path is exempt, or the resolver returned
            `None`); the message says which.

    .. versionadded:: 0.1.0
    """
    try:
        state: RequestState | None = scope[STATE_KEY]
    except KeyError:
        msg = (
            "This request did not pass through usercontext.asgi.UserContextMiddleware. "
            "Add it around the application: app.add_middleware(UserContextMiddleware, "
            "resolver=...) or UserContextMiddleware(app, resolver=...)."
        )
        raise NoContextError(msg) from None
    if state is None:
        msg = (
            "This request passed through usercontext.asgi.UserContextMiddleware with no user: "
            "its path is exempt, or the resolver returned None. Serve it without the "
            "request's context and resources (usercontext.current_or_none() is None), or "
            "make the resolver return a UserContext, or raise UnauthenticatedError, for it."
        )
        raise NoContextError(msg)
    return state


class UserContextMiddleware:
    """
    UserContextMiddleware(app, *, resolver, registry=None, hub=None, \
    request_id_header="x-request-id", exempt=(), resolver_in_thread=False, \
    trust_request_id=True, request_id_factory=None, isolate=True, \
    strip_context_headers=False)

    Bind a `usercontext.UserContext` to every ``http`` and ``websocket``
    request of *app*; pass ``lifespan`` and other scopes through untouched.

    For each request the middleware:

    1. takes the request id the client sent in *request_id_header*, if
       *trust_request_id* accepts it (by default: 1 to 128 visible ASCII
       characters that the library's id rules accept), and else makes one;
    2. calls ``resolver(scope)`` (a function or a coroutine function) for the
       request's context, unless the request's path is *exempt*. If it raises
       `usercontext.exceptions.RequestRefusedError` (such as
       `usercontext.exceptions.UnauthenticatedError` for ``401``),
       `usercontext.exceptions.InvalidContextError` (``400``), an
       ``HTTPException`` of Starlette or FastAPI, or an exception group
       holding only such refusals (the first is answered), the client gets
       that status with a problem document (RFC 9457,
       ``application/problem+json``) carrying the request id. A WebSocket
       handshake is refused the same way where the server supports denial
       responses, and else closed with code 1008 (1013 for ``429`` and
       ``503``). Any other error propagates. If it returns `None`, or the path
       is exempt, the request goes on with no user bound and no scope.
    3. runs the rest of the request in a fresh copy of the Context (unless
       *isolate* is false), with the context bound (its request id is the one
       of step 1), and with a scope of *registry* open (`RequestState`); the
       response carries the request id in *request_id_header*.

    The scope stays open while the application produces the response, and
    is closed before the client can see the response complete, so that a
    failing cleanup, such as a commit, never ends in a success the client
    cannot trust:

    - A response whose whole body comes in one message (``JSONResponse`` and
      most others: a ``Content-Length`` and one body message, a ``204`` or
      ``304``, a ``pathsend``) is held until the scope is closed; if a
      cleanup failed, the client gets a ``500``
      problem document (``"error": "cleanup_failed"``) instead.
    - A response whose headers go out before its last message (a
      ``FileResponse`` in several messages, a ``StreamingResponse``) is
      forwarded as it comes, but its last message waits for the scope to
      close. If a cleanup failed, that message is never sent: the middleware
      raises, and the server drops the connection, so the client sees a
      truncated response.
    - An application that raises before its response started gets a ``500``
      problem document (``"error": "internal_error"``) and the error propagates; a refusal
      (`usercontext.exceptions.RequestRefusedError`, such as an engine factory's ``429`` or
      ``503``) gets its own status, document and ``Retry-After``. After the start, nothing is sent.
    - A client that disconnects before the response is complete has the
      scope closed as if the request failed, so sessions roll back.
    - A WebSocket's scope lives as long as the connection; cleanup errors are
      logged.

    Work that outlives the response needs its own scope: see `in_child_scope`.

    The server's own ``send`` and ``receive`` run in a copy of the Context the
    middleware was called in, where the request's user is not bound: what the
    server starts from them (uvicorn starts the next pipelined request from
    the last ``send`` of the one before) never carries the user.

    Args:
        app: The ASGI application.
        resolver: Returns the `usercontext.UserContext` of a request from its
            ASGI scope, or `None` to let it through without a user.
        registry: Per-request resources, opened lazily in each request's scope.
        hub: An `usercontext.EmitterHub`, reachable as `RequestState.hub`.
        request_id_header: The header carrying the request id, both ways.
        exempt: Paths served without calling the resolver, with no user bound:
            each matches the path itself and every path below it (``"/docs"``
            matches ``/docs`` and ``/docs/oauth2-redirect``, not ``/docsets``).
        resolver_in_thread: Run a plain-function resolver in a worker thread
            (with a copy of the Context), for a resolver that blocks: on a
            database, a file, a key server.
        trust_request_id: ``True`` to take a valid request id from the client,
            ``False`` to never take one, or a function that takes the id (1 to
            128 visible ASCII characters) and returns whether to take it.
        request_id_factory: Makes the request id of each request whose client
            sent none (or one not taken), instead of the context's own; each
            id must be 1 to 128 visible ASCII characters.
        isolate: Run each request in a fresh copy of the Context, so that
            what the application sets in a context variable and leaves set
            never reaches the next request. ``False`` saves that copy where
            the server runs each request in a task of its own, started from a
            copy of the server's Context, as uvicorn, hypercorn and daphne
            do: the task's Context ends with the request. Keep it ``True``
            when an outer middleware or a server serves several requests from
            one task. The request's user is unbound at its end either way.
        strip_context_headers: Remove, before the resolver and *app* see the
            request, every ``x-usercontext-*`` header and every
            ``usercontext.*`` member of a ``baggage`` header (see
            `usercontext.strip_context_headers`): where untrusted clients
            reach the service, none of them can assert a user through the
            headers that carry a context between services. The headers are
            replaced in a shallow copy of the ASGI scope; the server's scope
            is not changed.

    Raises:
        TypeError: If an argument has the wrong type, or *resolver_in_thread*
            is given a coroutine function.
        ValueError: If *request_id_header* is not a header name, or an
            *exempt* path does not start with ``/``.

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913  # one check per argument
        self,
        app: ASGIApp,
        *,
        resolver: Resolver,
        registry: Registry | None = None,
        hub: EmitterHub | None = None,
        request_id_header: str = "x-request-id",
        exempt: Iterable[str] = (),
        resolver_in_thread: bool = False,
        trust_request_id: bool | Callable[[str], bool] = True,
        request_id_factory: Callable[[], str] | None = None,
        isolate: bool = True,
        strip_context_headers: bool = False,
    ) -> None:
        if not callable(resolver):
            msg = (  # type: ignore[unreachable]
                f"resolver must be a function taking the ASGI scope and returning a "
                f"UserContext, got {type(resolver).__name__}."
            )
            raise TypeError(msg)
        if hub is not None and not isinstance(hub, EmitterHub):
            kind = type(hub).__name__  # type: ignore[unreachable]
            msg = f"hub must be a usercontext.EmitterHub or None, got {kind}."
            raise TypeError(msg)
        check_arguments(
            registry, request_id_header, trust_request_id, request_id_factory, strip_context_headers
        )
        flags: dict[str, object] = {
            "resolver_in_thread": resolver_in_thread,
            "isolate": isolate,
        }
        for flag, value in flags.items():
            if type(value) is not bool:
                msg = f"{flag} must be True or False, got {value!r}."
                raise TypeError(msg)
        call = getattr(resolver, "__call__", None)  # noqa: B004  # an object may have an async __call__
        if resolver_in_thread and (
            inspect.iscoroutinefunction(resolver) or inspect.iscoroutinefunction(call)
        ):
            msg = (
                "resolver_in_thread=True runs a plain function in a worker thread, but the "
                f"resolver {_name(resolver)} is a coroutine function, which runs on the event "
                "loop: leave resolver_in_thread out."
            )
            raise TypeError(msg)
        self.app = app
        self.resolver = resolver
        self.registry = registry
        self.hub = hub
        self.request_id_header = request_id_header
        self.exempt: tuple[str, ...] = _exempt_paths(exempt)
        self.resolver_in_thread = resolver_in_thread
        self.trust_request_id = trust_request_id
        self.request_id_factory = request_id_factory
        self._exempt = _exempt_matcher(self.exempt)
        self._make_id = None if request_id_factory is None else _checked_factory(request_id_factory)
        self._header = request_id_header.lower().encode("ascii")
        self.isolate = isolate
        self.strip_context_headers = strip_context_headers

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """
        Serve one ASGI request.
        """
        kind = scope["type"]
        if kind == "http" or kind == "websocket":  # noqa: PLR1714  # faster than `in`
            if self.strip_context_headers:
                # A copy: the server's own scope keeps what the client sent.
                scope = {**scope, "headers": strip_context_headers(scope.get("headers", ()))}
            # The link is made before anything is bound (see RequestLink).
            server = RequestLink(send)
            if self.isolate:
                # isolated(), inline: the request's first steps, up to its
                # application, run in its Context in one call, with no
                # coroutine of their own for most requests.
                # _fresh_context, written out for a server's task, where no
                # user is bound: a plain copy is fresh already.
                context = copy_context() if _get(None) is None else _fresh_context()
                await isolated_call(context.run(self._start, scope, receive, server), context)
            else:
                await self._serve(scope, receive, server, self._incoming_id(scope))
        else:
            await self.app(scope, receive, send)

    def _start(
        self, scope: MutableMapping[str, Any], receive: Receive, server: RequestLink
    ) -> Awaitable[None]:
        """
        Return what serves the request, in its own Context: for most
        requests, resolved by a plain resolver, its run with the context
        bound already; else `_serve`.
        """
        incoming = self._incoming_id(scope)
        exempt = self._exempt
        if (
            readers
            or self.resolver_in_thread
            or (exempt is not None and exempt(scope.get("path", "")))
        ):
            return self._serve(scope, receive, server, incoming)
        resolved: Any
        try:
            resolved = self.resolver(scope)
        except Exception as e:
            # _call_resolver, written out: a call less per request.
            try:
                refused = _refused(scope, e)
            except Exception as bad:  # a refusal that cannot be sent (CR/LF in a header)
                return self._crash(scope, server, bad, incoming)
            if refused is None:  # not a refusal: answered, then raised
                return self._crash(scope, server, e, incoming)
            resolved = refused
        if type(resolved) is not UserContext:
            return self._serve(scope, receive, server, incoming, resolved)
        return self._open(scope, receive, server, resolved, None, incoming)

    def _incoming_id(self, scope: MutableMapping[str, Any]) -> str | None:
        trust = self.trust_request_id
        if trust is False:
            return None
        header = self._header
        for name, value in scope.get("headers", ()):
            if name == header:
                text: str = value.decode("latin-1")
                if not _GOOD_REQUEST_ID.fullmatch(text):
                    return None
                if trust is not True and not trust(text):
                    return None
                # The library's rules are checked when the id is used: by the
                # context taking it, or by a refusal (`Pending.get`).
                return text
        return None

    async def _resolve(
        self, scope: MutableMapping[str, Any], request: Pending | None, returned: Any = _CALL
    ) -> UserContext | Refusal | None:
        """
        Return the request's context, `None`, or how to refuse it; with
        *request*, its id is visible to the logging adapters meanwhile. Given
        what the resolver *returned* already, finish that instead of calling
        it.
        """
        # Reset before any message reaches the server: the server's own code
        # must not carry this request's id into the next request's.
        token = None if request is None else pending.set(request)
        try:
            if returned is not _CALL:
                ctx = returned
            elif self.resolver_in_thread:
                ctx = await to_thread(self.resolver, scope)
            else:
                ctx = self.resolver(scope)
            if type(ctx) is not UserContext and ctx is not None:
                if inspect.isawaitable(ctx):
                    ctx = await ctx
                if ctx is not None and not isinstance(ctx, UserContext):
                    # Not a refusal: the handler below lets it propagate.
                    raise _wrong_return(self.resolver, ctx)  # noqa: TRY301
            return ctx
        except Exception as e:
            refused = _refused(scope, e)
            if refused is None:
                raise
            return refused
        finally:
            if token is not None:
                pending.reset(token)

    async def _serve(
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        server: RequestLink,
        incoming: str | None,
        returned: Any = _CALL,
    ) -> None:
        """
        Serve the request whose client sent the id *incoming*; given what the
        resolver *returned* already (not a context), finish that instead of
        calling it.
        """
        make_id = self._make_id
        # Only a logging adapter reads the id of a request being resolved:
        # without one, the id is made only where it is needed.
        request = Pending(incoming, make_id) if readers else None
        exempt = self._exempt
        ctx: UserContext | None = None
        if returned is not _CALL or exempt is None or not exempt(scope.get("path", "")):
            resolved: UserContext | Refusal | None
            try:
                if returned is not _CALL:
                    resolved = returned
                    if type(resolved) is not Refusal and resolved is not None:
                        resolved = await self._resolve(scope, None, resolved)
                elif request is None and not self.resolver_in_thread:
                    # The resolver called here, without the coroutine of
                    # `_resolve` (an object alive per request).
                    resolved = self._call_resolver(scope)
                    kind = type(resolved)
                    if kind is not UserContext and kind is not Refusal and resolved is not None:
                        resolved = await self._resolve(scope, None, resolved)
                else:
                    resolved = await self._resolve(scope, request)
            except Exception as e:
                # A resolver that crashed (not a refusal): the client still
                # gets a 500 with the id it can quote, and the error goes on.
                crashed = _id_of(request, incoming, make_id)
                await _answer_crash(
                    server.to_server, scope, e, (self._header, crashed.encode("ascii"))
                )
                raise
            if isinstance(resolved, Refusal):
                refused_id = _id_of(request, incoming, make_id).encode("ascii")
                await refuse(scope, server.to_server, resolved, (self._header, refused_id))
                return
            ctx = resolved
            del resolved  # the resolver's context is not kept alive beside the one bound
        if ctx is None:
            # No user: nothing to bind, no scope to open.
            scope[STATE_KEY] = None
            server.header(self._header, _id_of(request, incoming, make_id))
            await server.run_plain(self.app, scope, receive, None)
            return
        await self._open(scope, receive, server, ctx, request, incoming)

    async def _crash(
        self,
        scope: MutableMapping[str, Any],
        server: RequestLink,
        error: Exception,
        incoming: str | None,
    ) -> None:
        """
        Answer a request whose resolver crashed with *error* (not a refusal)
        with a 500 carrying the id the client can quote, then raise *error*.
        """
        crashed = _id_of(None, incoming, self._make_id)
        await _answer_crash(server.to_server, scope, error, (self._header, crashed.encode("ascii")))
        raise error

    def _open(  # noqa: PLR0913, PLR0917  # the request's parts, without a tuple on the hot path
        self,
        scope: MutableMapping[str, Any],
        receive: Receive,
        server: RequestLink,
        ctx: UserContext,
        request: Pending | None,
        incoming: str | None,
    ) -> Awaitable[None]:
        """
        Give *ctx* the request's id, make its scope of resources and its
        `RequestState`, and return the request's run under it, bound.
        """
        if request is not None or self._make_id is not None:
            ctx = self._with_id(ctx, request, incoming)
        elif incoming is not None and incoming != ctx.request_id:
            # _with_id, written out for the client's id: a call less per request.
            try:  # noqa: SIM105  # contextlib.suppress costs an object per request
                ctx = with_request_id(ctx, incoming)
            except InvalidContextError:
                pass  # see _with_id
        registry = self.registry
        # Opened here, and bound with the request: the link closes it.
        resources = None if registry is None else registry._open_scope(ctx)
        # The link is the request's state. The header is made when the
        # response starts: not an object kept alive while the request runs.
        server.begin(ctx, resources, self.hub, self._header)
        scope[STATE_KEY] = server
        if self.isolate:
            # The request's own fresh Context, dropped after it: nothing to
            # reset (a bind, and its __exit__, would stay alive per request).
            _var.set(ctx)
            # _run, written out.
            if resources is not None and scope["type"] == "http":
                return server.run(self.app, scope, receive)
            return server.run_plain(self.app, scope, receive, resources)
        return self._run_bound(ctx, server, scope, receive, resources)

    async def _run_bound(
        self,
        ctx: UserContext,
        server: RequestLink,
        scope: MutableMapping[str, Any],
        receive: Receive,
        resources: Scope | None,
    ) -> None:
        with bind(ctx):
            await self._run(server, scope, receive, resources)

    def _call_resolver(self, scope: MutableMapping[str, Any]) -> Any:
        """
        Return what the resolver returned, or how to refuse the request if
        it raised a refusal.
        """
        try:
            return self.resolver(scope)
        except Exception as e:
            refused = _refused(scope, e)
            if refused is None:
                raise
            return refused

    def _with_id(
        self, ctx: UserContext, request: Pending | None, incoming: str | None
    ) -> UserContext:
        """
        Return *ctx* with the request's id: the client's, or the one the
        resolver's logs carry (made when they asked for it), or a new one
        from the factory; *ctx* itself if it has it already, or if the id
        breaks the library's rules.
        """
        make_id = self._make_id
        chosen = incoming if request is None else request.id
        if make_id is not None:
            chosen = _id_of(request, incoming, make_id)
        if chosen is not None and chosen != ctx.request_id:
            try:  # noqa: SIM105  # contextlib.suppress costs an object per request
                ctx = with_request_id(ctx, chosen)
            except InvalidContextError:
                # The client's id breaks the library's rules (a placeholder
                # such as "null"). Nothing used it yet (`Pending.get` would
                # have replaced it), so the context keeps its own.
                pass
        return ctx

    def _run(
        self,
        server: RequestLink,
        scope: MutableMapping[str, Any],
        receive: Receive,
        resources: Scope | None,
    ) -> Awaitable[None]:
        if resources is not None and scope["type"] == "http":
            return server.run(self.app, scope, receive)
        return server.run_plain(self.app, scope, receive, resources)


def _refused(scope: MutableMapping[str, Any], error: Exception) -> Refusal | None:
    """
    Return how to answer a request whose resolver raised *error*, logged, or
    `None` if *error* is not a refusal.
    """
    refused = refusal(error)
    if refused is not None:
        logger.info(
            "Refused %s %s: %d %s",
            scope.get("method", "WEBSOCKET"),
            scope.get("path", ""),
            refused.status,
            refused.body["detail"],
        )
    return refused


@overload
def in_child_scope(fn: Callable[P, T], *, registry: None = None) -> Callable[P, T]: ...
@overload
def in_child_scope(
    fn: Callable[Concatenate[Scope, P], T], *, registry: Registry
) -> Callable[P, T]: ...
def in_child_scope(
    fn: Callable[..., Any], *, registry: Registry | None = None
) -> Callable[..., Any]:
    """
    Wrap *fn* to run later under a child of the current context, with a scope
    of its own.

    A request's resources are closed when its response has been sent, so work
    that outlives the response (Starlette's ``BackgroundTasks``, a task spawned
    for later) must not use them. Wrap that work with this function while the
    request runs: each call of the wrapper then binds ``current().child()`` (the
    same user, a new request id whose parent is the request's). Given a
    *registry*, it also opens a scope of it for the child and passes that
    scope to *fn* as its first argument; the scope is closed when *fn*
    returns, and its resources are committed or rolled back like a request's.

    A coroutine function (or an object whose ``__call__`` is one) is wrapped
    by a coroutine function (its scope is ``async with``); a plain function by
    a plain function (its scope is ``with``, so its providers must not need
    awaiting), which Starlette runs in a worker thread.

    >>> import usercontext as uc
    >>> from usercontext.asgi import in_child_scope
    >>> registry = uc.Registry()
    >>> registry.register("greeting", lambda ctx: f"hello {ctx.user_id}")
    >>> def report(scope, n): return scope.get("greeting"), uc.current().depth, n
    >>> with uc.bind(uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")):
    ...     later = in_child_scope(report, registry=registry)
    >>> later(7)
    ('hello u-1', 1, 7)

    Raises:
        NoContextError: If no context is bound when *fn* is wrapped.

    .. versionadded:: 0.1.0
    """
    parent = current()
    call = getattr(fn, "__call__", None)  # noqa: B004  # an object may have an async __call__
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):

        async def async_child(*args: Any, **kwargs: Any) -> Any:
            child = parent.child()
            if registry is None:
                with bind(child):
                    return await fn(*args, **kwargs)
            async with registry.scope(child) as scope:
                return await fn(scope, *args, **kwargs)

        return functools.wraps(fn)(async_child)

    def child_call(*args: Any, **kwargs: Any) -> Any:
        child = parent.child()
        if registry is None:
            with bind(child):
                return fn(*args, **kwargs)
        with registry.scope(child) as scope:
            return fn(scope, *args, **kwargs)

    return functools.wraps(fn)(child_call)
