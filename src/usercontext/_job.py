"""
`to_job` and `bound_from_job`: a context carried in the payload of a job,
for any queue (ARQ, SAQ, Dramatiq, RQ, your own).

The payload is the header encoding of `_codec` (flat text, at most
`_codec.MAX_HEADER_BYTES`), so that it fits every queue's serialiser and is
validated on the way in exactly like `UserContext.from_headers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from ._codec import HEADER_PREFIX
from ._context import UserContext
from ._current import bind
from ._messages import short_repr
from .exceptions import InvalidContextError


if TYPE_CHECKING:
    from ._signing import HeaderSigner, HeaderVerifier

__all__ = ["bound_from_job", "child_from_job", "to_job"]


def to_job(ctx: UserContext, *, signer: HeaderSigner | None = None) -> dict[str, str]:
    """
    Return *ctx* as a job payload: a small dict of text, for a job's arguments.

    Put it in the job's arguments or metadata when it is enqueued, and give it
    to `bound_from_job` in the worker. The payload is the ``x-usercontext-*``
    headers of `UserContext.to_headers`: JSON-safe, at most 8 KiB.

    Args:
        ctx: The context to carry.
        signer: When given, the payload is signed (see
            `UserContext.to_headers`), for a worker that checks it with
            ``bound_from_job(payload, verifier=...)``. Give it a *ttl* longer
            than a job may wait in the queue and be retried.

    Raises:
        TypeError: If *ctx* is not a `UserContext`, or *signer* not a
            `usercontext.HeaderSigner`.
        usercontext.exceptions.InvalidContextError: If the payload would exceed
            8 KiB, or metadata holds values JSON cannot carry.

    .. versionadded:: 0.1.0
    """
    if not isinstance(ctx, UserContext):
        msg = f"to_job() takes a usercontext.UserContext, got {type(ctx).__name__}."  # type: ignore[unreachable]
        raise TypeError(msg)
    return ctx.to_headers(signer=signer)


def child_from_job(payload: object, *, verifier: HeaderVerifier | None = None) -> UserContext:
    """
    Decode a payload of `to_job` and return a child of the context it carries.

    The child has the same user, a new request id and the sender's request id
    as its parent (see `UserContext.child`). The payload is validated like
    `UserContext.from_headers`, and must hold nothing else.

    Args:
        payload: What `to_job` returned, as the job received it.
        verifier: When given, the payload is refused unless `to_job` signed
            it with one of the verifier's keys and the signature is still
            valid (see `UserContext.from_headers`).

    Raises:
        TypeError: If *payload* is not a mapping, or *verifier* not a
            `usercontext.HeaderVerifier`.
        usercontext.exceptions.InvalidContextError: If the payload is missing
            a field, holds an unknown key, a malformed or rule-breaking value,
            or exceeds 8 KiB.
        usercontext.exceptions.InvalidSignatureError: If *verifier* is given
            and the payload's signature does not hold.

    .. versionadded:: 0.1.0
    """
    if not isinstance(payload, Mapping):
        msg = (
            f"A job's context payload must be the dict usercontext.to_job() returned, "
            f"got {type(payload).__name__}."
        )
        raise TypeError(msg)
    payload = cast("Mapping[object, object]", payload)
    for key in payload:
        if not (isinstance(key, str) and key.startswith(HEADER_PREFIX)):
            msg = (
                f"Cannot decode a job's context: key {short_repr(key)} is not one "
                "usercontext.to_job() makes. Pass its payload unchanged."
            )
            raise InvalidContextError(msg, field="job", value=key, reason="unknown key")
    return UserContext.from_headers(payload, verifier=verifier).child()


def bound_from_job(payload: object, *, verifier: HeaderVerifier | None = None) -> bind:
    """
    Bind a child of the context a `to_job` payload carries, for a job's run.

    The payload is decoded and checked when this is called (see
    `child_from_job`), so a tampered or oversized one raises before the job's
    work begins. Use the result as `bind` is used: ``with``, ``async with``,
    or as a decorator.

    >>> import usercontext as uc
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> payload = uc.to_job(ctx)
    >>> with uc.bound_from_job(payload) as job_ctx:
    ...     (job_ctx.user_id, job_ctx.parent_request_id == ctx.request_id)
    ('u-42', True)

    Args:
        payload: What `to_job` returned, as the job received it.
        verifier: When given, the payload's signature is checked first, as
            `child_from_job` does.

    Raises:
        TypeError: If *payload* is not a mapping, or *verifier* not a
            `usercontext.HeaderVerifier`.
        usercontext.exceptions.InvalidContextError: As `child_from_job`.

    .. versionadded:: 0.1.0
    """
    return bind(child_from_job(payload, verifier=verifier))
