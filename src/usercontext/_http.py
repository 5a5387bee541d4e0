"""
What the ASGI and WSGI middlewares share: the checks of the arguments they
have in common, the request ids they take from clients, their exempt paths,
and their refusals, answered with one problem document shape (RFC 9457,
``application/problem+json``).
"""

from __future__ import annotations

import builtins
import importlib
import json
import re

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._pending import Pending
from ._refusals import _check_header, _phrase
from ._registry import Registry
from .exceptions import InvalidContextError, RequestRefusedError


if TYPE_CHECKING:
    from collections.abc import Mapping


PROBLEM_JSON = "application/problem+json"

#: The extension members of the ``500`` answering an application that raised.
INTERNAL_ERROR: Mapping[str, Any] = {
    "error": "internal_error",
    "detail": "The server failed to answer the request; its logs give the reason under "
    "this request id.",
}
#: The extension members of the ``500`` answering a request whose cleanup failed.
CLEANUP_FAILED: Mapping[str, Any] = {
    "error": "cleanup_failed",
    "detail": "The request's resources could not be cleaned up (a commit may have "
    "failed); its changes may not have been saved.",
}

# What a request id taken from a client may look like: visible ASCII, no
# spaces, short enough for any log line.
GOOD_REQUEST_ID = re.compile(r"[!-~]{1,128}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-zA-Z-]+")
# BaseExceptionGroup is a builtin from Python 3.11 on; the backport (a
# dependency on 3.10) provides it before.
_Group: type[BaseException] = (
    getattr(builtins, "BaseExceptionGroup", None)
    or importlib.import_module("exceptiongroup").BaseExceptionGroup
)


def check_arguments(
    registry: object,
    request_id_header: object,
    trust_request_id: object,
    request_id_factory: object,
    strip_context_headers: object,
) -> None:
    """
    Check the arguments both middlewares take, with the same errors.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If *request_id_header* is not a header name.
    """
    if registry is not None and not isinstance(registry, Registry):
        msg = f"registry must be a usercontext.Registry or None, got {type(registry).__name__}."
        raise TypeError(msg)
    if type(request_id_header) is not str or not HEADER_NAME.fullmatch(request_id_header):
        msg = (
            f"request_id_header must be an HTTP header name such as 'x-request-id', "
            f"got {request_id_header!r}."
        )
        raise ValueError(msg)
    if type(strip_context_headers) is not bool:
        msg = f"strip_context_headers must be True or False, got {strip_context_headers!r}."
        raise TypeError(msg)
    if type(trust_request_id) is not bool and not callable(trust_request_id):
        msg = (
            "trust_request_id must be True, False, or a function taking a request id and "
            f"returning whether to take it, got {type(trust_request_id).__name__}."
        )
        raise TypeError(msg)
    if request_id_factory is not None and not callable(request_id_factory):
        msg = (
            "request_id_factory must be a function returning a new request id, or None, "
            f"got {type(request_id_factory).__name__}."
        )
        raise TypeError(msg)


def id_of(request: Pending | None, incoming: str | None, make: Callable[[], str] | None) -> str:
    """
    Return the id a request answers with: the one its logs carry already
    (*request*), else the client's *incoming* id if valid, else a new one.
    """
    return (request or Pending(incoming, make)).get()


def callable_name(fn: object) -> str:
    return repr(getattr(fn, "__qualname__", fn))


def wrong_return(resolver: object, value: object) -> TypeError:
    return TypeError(
        f"The resolver {callable_name(resolver)} returned {type(value).__name__}; it must return a "
        "usercontext.UserContext, or None to let the request through without a user (or "
        "raise usercontext.UnauthenticatedError)."
    )


def exempt_paths(exempt: Iterable[str]) -> tuple[str, ...]:
    """
    Check the exempt paths given to the middleware; return them as a tuple.
    """
    if isinstance(exempt, (str, bytes)) or not isinstance(exempt, Iterable):
        msg = (
            "exempt must be an iterable of paths such as ('/health', '/docs'), got a "
            f"{type(exempt).__name__} ({exempt!r})."
        )
        if isinstance(exempt, str):
            msg += f" Wrap a single path in a tuple: exempt=({exempt!r},)."
        raise TypeError(msg)
    paths = tuple(exempt)
    for path in paths:
        if type(path) is not str or not path.startswith("/"):
            msg = f"exempt holds {path!r}, but each exempt path must be a str starting with '/'."
            raise ValueError(msg)
    return paths


def exempt_matcher(paths: tuple[str, ...]) -> Callable[[str], bool] | None:
    """
    Return a function telling whether a request path is exempt (one of
    *paths*, or below one of them), or `None` when no path is.
    """
    if not paths:
        return None
    exact = frozenset(paths)
    prefixes = tuple(path if path.endswith("/") else f"{path}/" for path in paths)

    def is_exempt(path: str) -> bool:
        return path in exact or path.startswith(prefixes)

    return is_exempt


def checked_factory(factory: Callable[[], str]) -> Callable[[], str]:
    """
    Wrap a request id factory so that every id it makes is checked: it goes
    into a header and the logs.
    """

    def make() -> str:
        request_id = factory()
        if type(request_id) is not str or not GOOD_REQUEST_ID.fullmatch(request_id):
            msg = (
                f"The request_id_factory {callable_name(factory)} returned {request_id!r}; a "
                "request id must be a str of 1 to 128 visible ASCII characters."
            )
            raise ValueError(msg)
        return request_id

    return make


class Refusal:
    """
    How to answer a refused request: its status, problem document and headers.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers


def refusal(error: BaseException) -> Refusal | None:
    """
    Return how to answer a request whose resolver raised *error*, or `None`
    when *error* is not a refusal (it then propagates).
    """
    if isinstance(error, RequestRefusedError):
        body: dict[str, Any] = {
            "type": error.type,
            "title": error.title,
            "detail": error.detail,
            "error": error.error,
        }
        if error.retry_after is not None:
            body["retry_after"] = error.retry_after
        headers = [
            (name.lower().encode("ascii"), value.encode("latin-1"))
            for name, value in error.headers.items()
        ]
        return Refusal(error.status, body, headers)
    if isinstance(error, InvalidContextError):
        body = {"detail": str(error), "error": "invalid_context", "field": error.field}
        return Refusal(400, body, [])
    if isinstance(error, _Group):
        # A task group in the resolver: answered as its first refusal, in the
        # order the group lists them, when it holds nothing but refusals.
        refusals = [refusal(leaf) for leaf in _leaves(error)]
        if None in refusals:
            return None
        return refusals[0]
    return _http_exception(error)


def _leaves(group: Any) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, _Group):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves


def _http_exception(error: BaseException) -> Refusal | None:
    """
    Map an ``HTTPException`` of Starlette or FastAPI (anything with an int
    *status_code* from 400 to 599 and a *detail*) to a refusal, without
    importing either.
    """
    status = getattr(error, "status_code", None)
    if type(status) is not int or not 400 <= status <= 599 or not hasattr(error, "detail"):  # noqa: PLR2004  # error statuses
        return None
    title, code = _phrase(status)
    detail: object = getattr(error, "detail")  # noqa: B009  # checked above: it has one
    body: dict[str, Any] = {"title": title, "detail": detail, "error": code}
    if type(detail) is not str:
        # FastAPI allows any JSON as detail; a problem's detail is a string.
        body["detail"] = title
        body["errors"] = detail
    headers: list[tuple[bytes, bytes]] = []
    given: Mapping[Any, Any] = getattr(error, "headers", None) or {}
    for name, value in given.items():
        _check_header(f"{type(error).__name__}(headers=...) raised by the resolver", name, value)
        headers.append((name.lower().encode("ascii"), value.encode("latin-1")))
    return Refusal(status, body, headers)


def problem_document(status: int, body: Mapping[str, Any], request_id: str) -> bytes:
    """
    Return the JSON of the problem document (RFC 9457) of *status* and *body*
    for the request *request_id*.

    *body* holds ``detail`` and may hold ``type`` (``"about:blank"`` by
    default), ``title`` (the status's reason phrase by default) and extension
    members, such as ``error``.
    """
    problem = {
        "type": body.get("type", "about:blank"),
        "title": body.get("title") or _phrase(status)[0],
        "status": status,
        **body,
        "request_id": request_id,
    }
    # Compact, as Starlette's and FastAPI's JSON responses (an EngineDep's
    # refusal among them) are: one shape for every problem document.
    return json.dumps(problem, separators=(",", ":")).encode()
