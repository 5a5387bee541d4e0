"""
Give every request of a WSGI application (Flask, Django, Pyramid, Bottle, ...)
its own `usercontext.UserContext`, and optionally its own scope of resources.

`UserContextMiddleware` is plain WSGI (PEP 3333) and needs nothing beyond the
core. Install it with ``pip install usercontext[wsgi]`` (the extra adds
nothing; it exists so that every adapter can be asked for by name).

Each request runs in a fresh copy of the Context of the server's thread, and
so does each step of its response, so nothing one request binds or sets can be
seen by the next request served by the same thread.
"""

from __future__ import annotations

import inspect
import logging

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from usercontext import (
    InvalidContextError,
    NoContextError,
    Registry,
    UserContext,
)
from usercontext._context import with_request_id
from usercontext._current import _fresh_context, _var
from usercontext._edge import strip_environ
from usercontext._http import (
    CLEANUP_FAILED,
    GOOD_REQUEST_ID,
    INTERNAL_ERROR,
    PROBLEM_JSON,
    Refusal,
    callable_name,
    check_arguments,
    checked_factory,
    exempt_matcher,
    exempt_paths,
    id_of,
    problem_document,
    refusal,
    wrong_return,
)
from usercontext._pending import Pending, pending, readers
from usercontext._refusals import _phrase
from usercontext.asgi import RequestState
from usercontext.exceptions import RequestRefusedError


if TYPE_CHECKING:
    import contextvars

    from collections.abc import Iterable, Iterator, Mapping

    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from usercontext import Scope

__all__ = ["STATE_KEY", "Resolver", "UserContextMiddleware", "request_state"]

#: A resolver: takes the WSGI environ, returns the request's context, or `None`
#: to let it through with no user.
Resolver = Callable[[dict[str, Any]], "UserContext | None"]

#: The key of the WSGI environ under which the middleware keeps the
#: `usercontext.asgi.RequestState` of the request.
STATE_KEY = "usercontext"

# The middleware's logger: what this module logs is about its requests.
_logger = logging.getLogger("usercontext.wsgi")


def request_state(environ: Mapping[str, Any]) -> RequestState:
    """
    Return the `usercontext.asgi.RequestState` that `UserContextMiddleware`
    put in *environ*.

    *environ* is the WSGI environ: ``flask.request.environ`` under Flask,
    ``request.META`` under Django.

    Raises:
        NoContextError: If the request did not pass through the middleware, or
            passed with no user (its path is exempt, or the resolver returned
            `None`); the message says which.

    .. versionadded:: 0.1.0
    """
    try:
        state: RequestState | None = environ[STATE_KEY]
    except KeyError:
        msg = (
            "This request did not pass through usercontext.wsgi.UserContextMiddleware. "
            "Wrap the WSGI application with it: app.wsgi_app = UserContextMiddleware("
            "app.wsgi_app, resolver=...) under Flask, application = UserContextMiddleware("
            "get_wsgi_application(), resolver=...) under Django."
        )
        raise NoContextError(msg) from None
    if state is None:
        msg = (
            "This request passed through usercontext.wsgi.UserContextMiddleware with no user: "
            "its path is exempt, or the resolver returned None. Serve it without the "
            "request's context and resources (usercontext.current_or_none() is None), or "
            "make the resolver return a UserContext, or raise UnauthenticatedError, for it."
        )
        raise NoContextError(msg)
    return state


class UserContextMiddleware:
    """
    UserContextMiddleware(app, *, resolver, registry=None, \
    request_id_header="x-request-id", exempt=(), trust_request_id=True, \
    request_id_factory=None, strip_context_headers=False)

    Bind a `usercontext.UserContext` to every request of the WSGI application
    *app*, as `usercontext.asgi.UserContextMiddleware` does for ASGI.

    For each request the middleware:

    1. with *strip_context_headers*, drops the ``x-usercontext-*`` headers and
       the ``usercontext.*`` members of the ``baggage`` header, in a copy of
       the environ that the resolver and *app* get (see
       `usercontext.strip_context_headers`);
    2. takes the request id the client sent in *request_id_header*, if
       *trust_request_id* accepts it (by default: 1 to 128 visible ASCII
       characters that the library's id rules accept), and else makes one;
    3. calls ``resolver(environ)`` for the request's context, unless the
       request's ``PATH_INFO`` is *exempt*. If it raises
       `usercontext.exceptions.RequestRefusedError` (such as
       `usercontext.exceptions.UnauthenticatedError` for ``401``),
       `usercontext.exceptions.InvalidContextError` (``400``), an exception
       with an int ``status_code`` from 400 to 599 and a ``detail`` (as
       Starlette's ``HTTPException``), or an exception group holding only
       such refusals (the first is answered), the client gets that status
       with a problem document (RFC 9457, ``application/problem+json``)
       carrying the request id. If it returns `None`, or the path is exempt,
       the request goes on with no user bound and no scope.
    4. runs *app*, and each step of its response, in a fresh copy of the
       thread's Context with the context bound (its request id is the one of
       step 2), and with a scope of *registry* open (`request_state`); the
       response carries the request id in *request_id_header*.

    The scope is closed (with ``with`` semantics: its providers must not need
    awaiting) after *app*'s response iterable is closed (PEP 3333's
    ``close()``), and before the client can see the response complete:

    - A response whose whole body is known (a list or tuple, a body with a
      ``Content-Length``, Django's ``HttpResponse``) is held until the scope
      is closed; if a cleanup failed, such as a commit, the client gets a
      ``500`` problem document (``"error": "cleanup_failed"``) instead.
    - A streamed response (a generator without ``Content-Length``) is passed
      on chunk by chunk, and the scope is closed when the application's
      iterable is exhausted. If a cleanup failed then, the middleware raises
      to the server, which drops the connection, so the client sees a
      truncated response, never a complete one.
    - An application that raises, while calling it or while iterating its
      response, before anything was sent, has its scope closed with the
      exception (sessions roll back) and the client gets a ``500`` problem
      document (``"error": "internal_error"``) with the request id; the
      exception is logged on the ``usercontext.wsgi`` logger. Once part of
      the body is sent, the exception propagates to the server.
    - An application that raises a refusal
      (`usercontext.exceptions.RequestRefusedError`) before anything was
      sent, such as the ``429`` or ``503`` of an `usercontext.EngineFactory`
      with an admission policy, has its scope closed the same way, and the
      client gets the refusal's status, problem document and headers
      (``Retry-After``), as for a refusal of *resolver*.
    - A response the server stops sending (the client disconnected) has its
      scope closed as if the request failed, so sessions roll back.

    Args:
        app: The WSGI application.
        resolver: Returns the `usercontext.UserContext` of a request from its
            WSGI environ, or `None` to let it through without a user. It runs
            in the server's worker thread: it may block.
        registry: Per-request resources, opened lazily in each request's scope.
        request_id_header: The header carrying the request id, both ways.
        exempt: Paths served without calling the resolver, with no user bound:
            each matches the path itself and every path below it (``"/docs"``
            matches ``/docs`` and ``/docs/index.html``, not ``/docsets``). They
            are compared with ``PATH_INFO``, the path within the application.
        trust_request_id: ``True`` to take a valid request id from the client,
            ``False`` to never take one, or a function that takes the id (1 to
            128 visible ASCII characters) and returns whether to take it.
        request_id_factory: Makes the request id of each request whose client
            sent none (or one not taken), instead of the context's own; each
            id must be 1 to 128 visible ASCII characters.
        strip_context_headers: Drop the headers that carry a context between
            services before anything reads them, where untrusted clients reach
            the application.

    Raises:
        TypeError: If an argument has the wrong type, or *resolver* is a
            coroutine function.
        ValueError: If *request_id_header* is not a header name, or an
            *exempt* path does not start with ``/``.

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913  # one check per argument
        self,
        app: WSGIApplication,
        *,
        resolver: Resolver,
        registry: Registry | None = None,
        request_id_header: str = "x-request-id",
        exempt: Iterable[str] = (),
        trust_request_id: bool | Callable[[str], bool] = True,
        request_id_factory: Callable[[], str] | None = None,
        strip_context_headers: bool = False,
    ) -> None:
        if not callable(app):
            msg = f"app must be a WSGI application, got {type(app).__name__}."  # type: ignore[unreachable]
            raise TypeError(msg)
        if not callable(resolver):
            msg = (  # type: ignore[unreachable]
                f"resolver must be a function taking the WSGI environ and returning a "
                f"UserContext, got {type(resolver).__name__}."
            )
            raise TypeError(msg)
        call = getattr(resolver, "__call__", None)  # noqa: B004  # an object may have an async __call__
        if inspect.iscoroutinefunction(resolver) or inspect.iscoroutinefunction(call):
            msg = (
                f"The resolver {callable_name(resolver)} is a coroutine function, but a WSGI "
                "application has no event loop to run it: make it a plain function."
            )
            raise TypeError(msg)
        check_arguments(
            registry, request_id_header, trust_request_id, request_id_factory, strip_context_headers
        )
        self.app = app
        self.resolver = resolver
        self.registry = registry
        self.request_id_header = request_id_header
        self.exempt: tuple[str, ...] = exempt_paths(exempt)
        self.trust_request_id = trust_request_id
        self.request_id_factory = request_id_factory
        self.strip_context_headers = strip_context_headers
        self._exempt = exempt_matcher(self.exempt)
        self._make_id = None if request_id_factory is None else checked_factory(request_id_factory)
        self._header = request_id_header.lower()
        # PEP 3333 gives request headers as CGI variables: HTTP_X_REQUEST_ID.
        self._environ_key = "HTTP_" + request_id_header.upper().replace("-", "_")

    def __repr__(self) -> str:
        return f"<usercontext.wsgi.UserContextMiddleware(app={self.app!r})>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """
        Serve one WSGI request.
        """
        # A fresh Context per request: what the request binds or sets dies with
        # it, and never reaches the next request served by this thread.
        context = _fresh_context()
        return context.run(self._serve, context, environ, start_response)

    def _incoming_id(self, environ: WSGIEnvironment) -> str | None:
        trust = self.trust_request_id
        if trust is False:
            return None
        text = environ.get(self._environ_key)
        if type(text) is not str or not GOOD_REQUEST_ID.fullmatch(text):
            return None
        if trust is not True and not trust(text):
            return None
        # The library's rules are checked when the id is used: by the context
        # taking it, or by a refusal (`Pending.get`).
        return text

    def _resolve(
        self, environ: WSGIEnvironment, request: Pending | None
    ) -> UserContext | Refusal | None:
        """
        Return the request's context, `None`, or how to refuse it; with
        *request*, its id is visible to the logging adapters meanwhile.
        """
        token = None if request is None else pending.set(request)
        try:
            ctx = self.resolver(environ)
            if ctx is not None and not isinstance(ctx, UserContext):
                raise wrong_return(self.resolver, ctx)  # noqa: TRY301  # not a refusal: propagates
            return ctx
        except Exception as e:
            refused = refusal(e)
            if refused is None:
                raise
            _logger.info(
                "Refused %s %s: %d %s",
                environ.get("REQUEST_METHOD", ""),
                environ.get("PATH_INFO", ""),
                refused.status,
                refused.body["detail"],
            )
            return refused
        finally:
            if token is not None:
                pending.reset(token)

    def _serve(
        self,
        context: contextvars.Context,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        if self.strip_context_headers:
            environ = strip_environ(environ)
        incoming = self._incoming_id(environ)
        make_id = self._make_id
        request = Pending(incoming, make_id) if readers else None
        exempt = self._exempt
        ctx: UserContext | None = None
        if exempt is None or not exempt(environ.get("PATH_INFO", "")):
            try:
                resolved = self._resolve(environ, request)
            except Exception:
                # A resolver that crashed (not a refusal): the client still
                # gets a 500 with the id it can quote.
                crashed = id_of(request, incoming, make_id)
                _logger.exception("The resolver failed on request %s.", crashed)
                status, headers, payload = _problem(500, INTERNAL_ERROR, [], self._header, crashed)
                start_response(status, headers)
                return [payload]
            if isinstance(resolved, Refusal):
                refused = id_of(request, incoming, make_id)
                extra = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resolved.headers]
                status, headers, payload = _problem(
                    resolved.status, resolved.body, extra, self._header, refused
                )
                start_response(status, headers)
                return [payload]
            ctx = resolved
            del resolved  # the resolver's context is not kept alive beside the one bound
        if ctx is None:
            # No user: nothing to bind, no scope to open.
            environ[STATE_KEY] = None
            anonymous = id_of(request, incoming, make_id)
            return _Response(context, start_response, self._header, anonymous, None).run(
                self.app, environ
            )
        chosen = incoming if request is None else request.id
        if make_id is not None:
            chosen = id_of(request, incoming, make_id)
        if chosen is not None and chosen != ctx.request_id:
            try:  # noqa: SIM105  # contextlib.suppress costs an object per request
                ctx = with_request_id(ctx, chosen)
            except InvalidContextError:
                # The client's id breaks the library's rules (a placeholder such
                # as "null"): the context keeps its own.
                pass
        registry = self.registry
        resources = None if registry is None else registry.scope(ctx)
        environ[STATE_KEY] = RequestState(ctx, resources, None)
        # The request's own fresh Context: nothing to reset after it.
        _var.set(ctx)
        response = _Response(context, start_response, self._header, ctx.request_id, resources)
        return response.run(self.app, environ)


def _problem(
    status: int,
    body: Mapping[str, Any],
    headers: list[tuple[str, str]],
    header: str,
    request_id: str,
) -> tuple[str, list[tuple[str, str]], bytes]:
    """
    Return the status line, headers and body of a problem document of *status*
    and *body*, with *headers* and the request id *request_id* in *header*.
    """
    payload = problem_document(status, body, request_id)
    return (
        f"{status} {_phrase(status)[0]}",
        [
            ("Content-Type", PROBLEM_JSON),
            ("Content-Length", str(len(payload))),
            *headers,
            (header, request_id),
        ],
        payload,
    )


class _DisconnectedError(ConnectionError):
    """
    What the request's scope is closed with when the server stopped sending
    the response before it was complete: providers roll back, as for any
    failed request.
    """


class _ResponseCutError(RuntimeError):
    """
    Raised to the server, after part of a response was sent, when the
    request's cleanup failed: the rest is never sent, and the server drops the
    connection, so the client sees a truncated response, never a complete one.
    """


class _Response:
    """
    One request's response: the iterable the server gets, in place of the
    application's. Each step of it runs in the request's Context; it holds the
    application's status and headers until the first chunk is ready, and
    closes the request's scope before the last chunk goes out (see
    `UserContextMiddleware`).
    """

    __slots__ = (
        "_body",
        "_closed",
        "_context",
        "_done",
        "_header",
        "_headers",
        "_iterator",
        "_remaining",
        "_request_id",
        "_resources",
        "_start_response",
        "_status",
        "_whole",
        "_write",
    )

    def __init__(
        self,
        context: contextvars.Context,
        start_response: StartResponse,
        header: str,
        request_id: str,
        resources: Scope | None,
    ) -> None:
        self._context = context
        self._start_response = start_response
        self._header = header
        self._request_id = request_id
        self._resources = resources
        self._status: str | None = None  # the application's, until the server has it
        self._headers: list[tuple[str, str]] = []
        self._write: Callable[[bytes], object] | None = None  # the server's, once started
        self._remaining: int | None = None  # bytes of a Content-Length still to come
        self._body: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] = iter(())
        self._whole = False  # whether the body is all in memory
        self._done = False  # whether the last chunk (or a problem document) was given
        self._closed = False  # whether the application's response and the scope are closed

    # -- the application's side

    def start(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
        /,
    ) -> Callable[[bytes], object]:
        """
        The ``start_response`` the application gets: the server's is called
        when the first chunk of the body is ready.
        """
        if self._write is not None:
            # Sent already: the server re-raises *exc_info* (PEP 3333).
            return self._start_response(status, headers, exc_info)
        header = self._header
        remaining = None
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length" and value.isdigit():
                remaining = int(value)
            elif lower == header:
                break
        else:
            headers = [*headers, (header, self._request_id)]
        self._status = status
        self._headers = headers
        self._remaining = remaining
        return self._legacy_write

    def _legacy_write(self, data: bytes) -> None:
        """
        The ``write`` of PEP 3333, for applications that still use it: the
        response is sent as it is written.
        """
        self._send_start()(data)

    def _send_start(self) -> Callable[[bytes], object]:
        write = self._write
        if write is None:
            if self._status is None:
                msg = (
                    "The WSGI application produced its response without calling "
                    "start_response first (PEP 3333)."
                )
                raise RuntimeError(msg)
            write = self._write = self._start_response(self._status, self._headers)
        return write

    # -- the server's side

    def run(self, app: WSGIApplication, environ: WSGIEnvironment) -> Iterable[bytes]:
        """
        Call *app*; return the iterable for the server.
        """
        resources = self._resources
        if resources is not None:
            resources.__enter__()
        try:
            body = app(environ, self.start)
        except Exception as e:
            return [self._crash(e)]
        except BaseException as e:
            self._finish(e)
            raise
        self._body = body
        self._iterator = iter(body)
        # A list or tuple, or Django's HttpResponse (not streaming): in memory.
        kind = type(body)
        if kind is list or kind is tuple or getattr(body, "streaming", None) is False:
            # The whole body is ready: finish here, in this step, and give the
            # server a list (no step of ours left to run in the Context).
            self._whole = True
            try:
                return [self._next()]
            except StopIteration:
                return []
        return self

    def __iter__(self) -> _Response:
        return self

    def __next__(self) -> bytes:
        return self._context.run(self._next)

    def close(self) -> None:
        """
        Close the application's response and the request's scope, if the
        response was not complete: the server stopped sending it.
        """
        if not self._closed:
            self._context.run(
                self._finish,
                _DisconnectedError("The response was closed before it was complete."),
            )

    def _read(self) -> tuple[bytes, bool]:
        """
        Return the next chunk of the application's body, and whether it is the
        last one.
        """
        if self._whole:
            return b"".join(self._iterator), True
        for chunk in self._iterator:
            remaining = self._remaining
            if remaining is None:
                return chunk, False
            remaining = self._remaining = remaining - len(chunk)
            return chunk, remaining <= 0
        return b"", True

    def _next(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            chunk, final = self._read()
            if self._status is None:
                self._send_start()  # raises: the application never called start_response
        except Exception as e:
            if self._write is not None:
                self._finish(e)
                raise
            return self._crash(e)
        except BaseException as e:
            self._finish(e)
            raise
        if not final:
            self._send_start()
            return chunk
        self._done = True
        error = self._finish(None)
        if error is not None:
            return self._fail(error)
        self._send_start()
        if not chunk:
            raise StopIteration
        return chunk

    def _finish(self, error: BaseException | None) -> Exception | None:
        """
        Close the application's response, then the scope (with *error*, if
        any); return the first error of either, or `None`.
        """
        self._closed = True
        failure: Exception | None = None
        close = getattr(self._body, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                _logger.exception("Closing the response of request %s failed.", self._request_id)
                failure = e
                error = error or e
        resources = self._resources
        if resources is None:
            return failure
        try:
            if error is None:
                resources.__exit__(None, None, None)
            else:  # the scope adds its cleanup errors to *error* as notes
                resources.__exit__(type(error), error, error.__traceback__)
        except Exception as e:  # each error was logged by the scope
            _logger.error(  # noqa: TRY400  # the scope logged each traceback already
                "The resources of request %s were not all cleaned up: %s", self._request_id, e
            )
            return failure or e
        return failure

    def _crash(self, error: Exception) -> bytes:
        """
        Answer ``500`` for an application that raised *error* before anything
        was sent; return the problem document.

        A refusal (`usercontext.exceptions.RequestRefusedError`, such as the
        ``429`` or ``503`` of an `usercontext.EngineFactory`'s admission
        policy) is answered with its own status, problem document and
        headers (``Retry-After``), and logged as a refusal, not a crash.
        """
        self._finish(error)
        if isinstance(error, RequestRefusedError):
            answer = refusal(error)
            assert answer is not None  # noqa: S101  # a RequestRefusedError always has one
            _logger.info(
                "Request %s was refused by the application: %s %s.",
                self._request_id,
                answer.status,
                error.error,
            )
            headers = [
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in answer.headers
            ]
            return self._answer(answer.body, answer.status, headers)
        _logger.error(  # not in the handler: the error is given
            "The application failed on request %s.", self._request_id, exc_info=error
        )
        return self._answer(INTERNAL_ERROR)

    def _fail(self, error: Exception) -> bytes:
        """
        Answer for a response whose cleanup failed with *error*: ``500`` if
        nothing was sent, else cut it short.
        """
        if self._write is None:
            return self._answer(CLEANUP_FAILED)
        msg = (
            f"The resources of request {self._request_id} were not all cleaned up (a commit "
            "may have failed) after part of the response was sent, so the response was cut "
            "short: the connection must be dropped."
        )
        raise _ResponseCutError(msg) from error

    def _answer(
        self,
        body: Mapping[str, Any],
        status: int = 500,
        headers: list[tuple[str, str]] | None = None,
    ) -> bytes:
        """
        Send a problem document of *status* (``500`` by default) and *body*,
        with *headers*, in place of the response.
        """
        self._done = True
        line, headers, payload = _problem(
            status, body, headers or [], self._header, self._request_id
        )
        self._write = self._start_response(line, headers)
        return payload
