"""
The frozen `UserContext` value, its validation rules, and `configure`.
"""

from __future__ import annotations

import functools
import math
import re
import time

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from . import _codec
from ._ids import new_id
from ._messages import invalid, short_repr
from ._metadata import EMPTY, check_metadata
from .exceptions import IsolationError


if TYPE_CHECKING:
    from collections.abc import Mapping

    from typing_extensions import Self

    from ._signing import HeaderSigner, HeaderVerifier


__all__ = [
    "DEFAULT_PLACEHOLDERS",
    "IdRules",
    "UserContext",
    "configure",
]

DEFAULT_PLACEHOLDERS: frozenset[str] = frozenset(
    {
        "none",
        "null",
        "nil",
        "undefined",
        "placeholder",
        "registry",
        "default",
        "temp",
        "tmp",
        "xxx",
        "example",
        "unknown",
        "n/a",
        "-",
    }
)
"""
Ids refused by default, compared case-insensitively.

.. versionadded:: 0.1.0
"""

_FIELD_SET = frozenset(_codec.FIELDS)


@attrs.frozen
class IdRules:
    """
    The rules every id of a `UserContext` must follow.

    The defaults suit most services; pass a customised instance to `configure`
    once, at startup. Every id must be a `str`, non-empty, without leading or
    trailing whitespace, made of printable characters only (no control, format
    or line-separator characters), at most *max_length* characters long, and not
    one of *placeholders* (compared case-insensitively). With *pattern*, ids must
    also match that regular expression in full.

    Args:
        max_length: The longest id accepted, in characters.
        placeholders: Values that signal a missing id, such as ``"null"``.
        pattern: An optional regular expression every id must match in full.

    .. versionadded:: 0.1.0
    """

    max_length: int = 256
    placeholders: frozenset[str] = DEFAULT_PLACEHOLDERS
    pattern: str | None = None

    def __attrs_post_init__(self) -> None:
        if type(self.max_length) is not int or self.max_length < 1:
            msg = (
                f"IdRules.max_length must be a positive int, got {short_repr(self.max_length)}. "
                "Pass the longest id your service accepts, such as 256."
            )
            raise ValueError(msg)
        placeholders: object = self.placeholders
        if not isinstance(placeholders, frozenset) or not all(
            isinstance(p, str) for p in placeholders
        ):
            msg = (
                "IdRules.placeholders must be a frozenset of str, got "
                f"{short_repr(self.placeholders)}. Wrap your values in frozenset({{...}})."
            )
            raise TypeError(msg)
        object.__setattr__(self, "placeholders", frozenset(p.lower() for p in self.placeholders))
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except (re.error, TypeError) as e:
                msg = (
                    f"IdRules.pattern {self.pattern!r} is not a valid regular expression ({e}). "
                    "Pass a pattern that re.compile() accepts."
                )
                raise ValueError(msg) from e


# The rules in force, flattened into module globals that the hot path reads.
_rules = IdRules()
_max_len = 256
_placeholders = DEFAULT_PLACEHOLDERS
_placeholder_len = max(map(len, DEFAULT_PLACEHOLDERS))
_pattern: re.Pattern[str] | None = None
_max_depth = 32


def _describe_rules(rules: IdRules, max_depth: int) -> str:
    """
    Describe *rules* and *max_depth* in a text that equal rules give in every
    process (placeholders sorted: a frozenset's order varies with the hash seed).
    """
    placeholders = ", ".join(map(repr, sorted(rules.placeholders)))
    return (
        f"IdRules(max_length={rules.max_length}, placeholders=frozenset({{{placeholders}}}), "
        f"pattern={rules.pattern!r}) with max_depth={max_depth}"
    )


_described = _describe_rules(_rules, _max_depth)


def configure(*, id_rules: IdRules | None = None, max_depth: int | None = None) -> None:
    """
    Set the validation rules for every `UserContext` created afterwards.

    Call it once, at startup, before the first context is created. The same
    rules then apply to construction, `UserContext.evolve`,
    `UserContext.from_dict` and `UserContext.from_headers`. Arguments left as
    `None` keep their current value.

    The rules hold in the calling process only. A worker process started by
    spawn or forkserver begins with the defaults: call `configure` with the same
    rules in the pool's initializer (`ContextExecutor` refuses tasks sent to a
    worker whose rules differ, saying so).

    Args:
        id_rules: The rules for ids; see `IdRules`.
        max_depth: How deep `UserContext.child` may nest (default 32).

    Raises:
        TypeError: If *id_rules* is not an `IdRules`.
        ValueError: If *max_depth* is not a non-negative int.

    .. versionadded:: 0.1.0
    """
    global _rules, _max_len, _placeholders, _placeholder_len, _pattern, _max_depth, _described  # noqa: PLW0603
    if id_rules is not None:
        rules: object = id_rules
        if not isinstance(rules, IdRules):
            msg = f"id_rules must be a usercontext.IdRules, got {type(id_rules).__name__}."
            raise TypeError(msg)
        _rules = id_rules
        _max_len = id_rules.max_length
        _placeholders = id_rules.placeholders
        _placeholder_len = max(map(len, _placeholders), default=0)
        _pattern = None if id_rules.pattern is None else re.compile(id_rules.pattern)
        _valid_ids.clear()
        _old_ids.clear()
    if max_depth is not None:
        if type(max_depth) is not int or max_depth < 0:
            msg = (
                f"max_depth must be a non-negative int, got {short_repr(max_depth)}; "
                "the default is 32."
            )
            raise ValueError(msg)
        _max_depth = max_depth
    _described = _describe_rules(_rules, _max_depth)


def current_rules() -> tuple[IdRules, int]:
    """
    Return the `IdRules` and the maximum depth in force.
    """
    return _rules, _max_depth


def described_rules() -> str:
    """
    Return the rules in force as a text that equal rules give in every process,
    for a worker process to compare with its submitter's.
    """
    return _described


def _id_error(  # noqa: PLR0911  # one return per rule
    field: str, value: object, *, pattern: bool = True
) -> Exception:
    """
    Explain why *value* failed the fast check in `_check_id`.
    """
    if type(value) is not str:
        return TypeError(
            f"UserContext.{field} must be a str, got {type(value).__name__} "
            f"({short_repr(value)}). Convert it with str() where it enters your service."
        )
    if not value:
        return invalid(
            field, value, "must not be empty", "Pass the real id, such as the authenticated user's."
        )
    if len(value) > _max_len:
        return invalid(
            field,
            value,
            f"must be at most {_max_len} characters, not {len(value)}",
            "Shorten it, or pass a digest such as hashlib.sha256(value.encode()).hexdigest().",
        )
    for i, ch in enumerate(value):
        if not ch.isprintable():
            return invalid(
                field,
                value,
                f"must contain only printable characters, found {ch!r} at index {i}",
                "Remove control, format and line-separator characters.",
            )
    if value.strip() != value:
        return invalid(
            field,
            value,
            "must not start or end with whitespace",
            "Strip it with value.strip() where it enters your service.",
        )
    if value.lower() in _placeholders:
        return invalid(
            field,
            value,
            "is a placeholder, not a real id",
            "Pass the real id. If this value is legitimate in your service, leave it out of "
            "IdRules.placeholders and pass those rules to usercontext.configure().",
        )
    assert pattern  # noqa: S101  # request ids fail an earlier rule
    assert _pattern is not None  # noqa: S101  # the only rule left
    return invalid(
        field,
        value,
        f"does not match the pattern {_pattern.pattern!r} of the configured IdRules",
        "Pass an id that matches it, or change IdRules.pattern in usercontext.configure().",
    )


# User, thread and run ids that passed the rules in force. The same ids come
# back request after request, and a set lookup costs a fraction of the checks.
# Two generations keep the hot ids when one-off ids fill the young one: when it
# is full it becomes the old one, and a hit in the old one is promoted. Both are
# bounded and emptied whenever the rules change.
_valid_ids: set[str] = set()
_old_ids: set[str] = set()
_VALID_IDS_MAX = 4096  # per generation
_ID_CACHE_MAX = 2 * _VALID_IDS_MAX  # both generations: the figure the README gives


def _passes(value: str) -> bool:
    return (
        0 < len(value) <= _max_len
        and value.isprintable()
        and value.strip() == value
        and (len(value) > _placeholder_len or value.lower() not in _placeholders)
    )


def _check_id(field: str, value: object) -> None:
    """
    Check a user, thread, run or connection id against every rule.
    """
    global _valid_ids, _old_ids
    if type(value) is not str:
        raise _id_error(field, value)
    if value in _valid_ids:
        return
    if value not in _old_ids and not (
        _passes(value) and (_pattern is None or _pattern.fullmatch(value) is not None)
    ):
        raise _id_error(field, value)
    if len(_valid_ids) >= _VALID_IDS_MAX:
        _old_ids, _valid_ids = _valid_ids, set()
    _valid_ids.add(value)


def _check_request_id(field: str, value: object) -> None:
    """
    Check a request id: every rule but the pattern, which is for the ids your
    service assigns; request ids are generated here or come from upstream.
    They are not cached: nearly every one is new.
    """
    if type(value) is not str or not _passes(value):
        raise _id_error(field, value, pattern=False)


def _check_depth(depth: object, parent_request_id: object) -> None:
    if type(depth) is not int:
        msg = f"UserContext.depth must be an int, got {type(depth).__name__} ({short_repr(depth)})."
        raise TypeError(msg)
    if not 0 <= depth <= _max_depth:
        raise invalid(
            "depth",
            depth,
            f"must be between 0 and {_max_depth}",
            "Derive children with ctx.child() instead of nesting deeper; raise the limit with "
            "usercontext.configure(max_depth=...) if deep nesting is intended.",
        )
    if (depth == 0) != (parent_request_id is None):
        raise invalid(
            "depth",
            depth,
            "must be 0 exactly when parent_request_id is None",
            "Create child contexts with ctx.child(), which sets both.",
        )


def _check_created_at(created_at: object) -> float:
    if type(created_at) is not float and type(created_at) is not int:
        msg = (
            "UserContext.created_at must be a float of epoch seconds, got "
            f"{type(created_at).__name__} ({short_repr(created_at)})."
        )
        raise TypeError(msg)
    try:
        # An int too large for a float overflows here, not in isfinite below.
        seconds = float(created_at)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise invalid(
            "created_at",
            created_at,
            "must be a finite, non-negative number of epoch seconds",
            "Leave it out to use time.time().",
        )
    return seconds


@attrs.frozen(init=False, repr=False, weakref_slot=False)
class UserContext:
    """
    Who a piece of work runs for: a frozen, validated set of ids.

    A context names the user, the conversation thread, the run (an agent run,
    a job) and the request it belongs to. It is immutable, all the way down:
    *metadata* becomes a read-only mapping whose values are immutable too
    (lists become tuples, sets frozensets, dicts read-only mappings; any other
    mutable value is refused). Derive new contexts with `child` and `evolve`.

    Every id is checked by the `IdRules` in force (see `configure`); a broken
    rule raises `usercontext.exceptions.InvalidContextError` naming the field,
    and a value of the wrong type raises `TypeError`.

    Args:
        user_id: The user this work runs for. It never changes in derived contexts.
        thread_id: The conversation or session thread.
        run_id: The run (agent run, job) within the thread.
        request_id: This request's id; a new 128-bit random id when omitted.
        connection_id: The client connection (such as a WebSocket), if any.
        parent_request_id: The request this one was derived from, for children.
        depth: 0 for a root context, the parent's depth + 1 for a child.
        created_at: Creation time in epoch seconds; now when omitted.
        metadata: Extra immutable data, at most 64 entries with non-empty
            string keys that do not name a field.

    >>> import usercontext as uc
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> sub = ctx.child(run_id="r-1.tool")
    >>> (sub.user_id, sub.depth, sub.parent_request_id == ctx.request_id)
    ('u-42', 1, True)

    .. versionadded:: 0.1.0
    """

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    connection_id: str | None
    parent_request_id: str | None
    depth: int
    created_at: float
    metadata: Mapping[str, Any] = attrs.field(hash=False)

    _ALLOWED_CHILD_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"thread_id", "run_id", "connection_id", "metadata"}
    )

    def __new__(  # noqa: PLR0913
        cls,
        *,
        user_id: str,
        thread_id: str,
        run_id: str,
        request_id: str | None = None,
        connection_id: str | None = None,
        parent_request_id: str | None = None,
        depth: int = 0,
        created_at: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Self:
        # Inlined fast path of _check_id: this is the hottest line of the library.
        if type(user_id) is not str or user_id not in _valid_ids:
            _check_id("user_id", user_id)
        if type(thread_id) is not str or thread_id not in _valid_ids:
            _check_id("thread_id", thread_id)
        if type(run_id) is not str or run_id not in _valid_ids:
            _check_id("run_id", run_id)
        if request_id is None:
            request_id = new_id()
        else:
            _check_request_id("request_id", request_id)
        if connection_id is not None:
            _check_id("connection_id", connection_id)
        if parent_request_id is not None:
            _check_request_id("parent_request_id", parent_request_id)
        if type(depth) is not int or depth or parent_request_id is not None:
            _check_depth(depth, parent_request_id)
        draft = _draft()
        draft.user_id = user_id
        draft.thread_id = thread_id
        draft.run_id = run_id
        draft.request_id = request_id
        draft.connection_id = connection_id
        draft.parent_request_id = parent_request_id
        draft.depth = depth
        draft.created_at = _now() if created_at is None else _check_created_at(created_at)
        draft.metadata = EMPTY if metadata is None else check_metadata(metadata)
        draft.__class__ = cls  # type: ignore[assignment]
        return draft  # type: ignore[return-value]

    def child(self, **changes: Any) -> Self:
        """
        Derive a context for sub-work of this request, for the same user.

        The child gets a new *request_id*, ``parent_request_id=self.request_id``,
        ``depth=self.depth + 1`` and a new *created_at*. It keeps every other
        field unless *changes* replace it; only *thread_id*, *run_id*,
        *connection_id* and *metadata* can be changed (*metadata* is replaced
        as a whole, not merged).

        Raises:
            IsolationError: If *changes* hold a different *user_id*: another user
                needs a new root context.
            InvalidContextError: If the child would be deeper than the maximum
                depth (32 by default), or a changed value breaks a rule.
            TypeError: If *changes* name a field a child cannot set.

        .. versionadded:: 0.1.0
        """
        if self.depth >= _max_depth:
            raise invalid(
                "depth",
                self.depth + 1,
                f"must not exceed the maximum depth of {_max_depth}",
                "Look for runaway recursion in the code that derives children; raise the limit "
                "with usercontext.configure(max_depth=...) if deep nesting is intended.",
            )
        new = _draft()
        new.user_id = self.user_id
        new.request_id = new_id()
        new.parent_request_id = self.request_id
        new.depth = self.depth + 1
        new.created_at = _now()
        if changes:
            self._check_changes(changes, self._ALLOWED_CHILD_CHANGES, "child")
        new.thread_id = self.thread_id
        new.run_id = self.run_id
        new.connection_id = self.connection_id
        new.metadata = self.metadata
        for field, value in changes.items():
            _set_field(new, field, value)
        new.__class__ = type(self)  # type: ignore[assignment]
        return new  # type: ignore[return-value]

    def evolve(self, **changes: Any) -> Self:
        """
        Return a validated copy of this context with *changes* applied.

        Unlike `child`, the copy keeps this context's *request_id* and lineage
        unless *changes* set them. *metadata* is replaced as a whole.

        Raises:
            IsolationError: If *changes* hold a different *user_id*.
            InvalidContextError: If a changed value breaks a rule.
            TypeError: If *changes* name an unknown field or hold a wrong type.

        .. versionadded:: 0.1.0
        """
        if "user_id" in changes or not changes.keys() <= _FIELD_SET:
            self._check_changes(changes, _FIELD_SET, "evolve")
        new = _draft()
        new.user_id = self.user_id
        new.thread_id = self.thread_id
        new.run_id = self.run_id
        new.request_id = self.request_id
        new.connection_id = self.connection_id
        new.parent_request_id = self.parent_request_id
        new.depth = self.depth
        new.created_at = self.created_at
        new.metadata = self.metadata
        for field, value in changes.items():
            _set_field(new, field, value)
        if "depth" in changes or "parent_request_id" in changes:
            _check_depth(new.depth, new.parent_request_id)
        new.__class__ = type(self)  # type: ignore[assignment]
        return new  # type: ignore[return-value]

    def _check_changes(self, changes: dict[str, Any], allowed: frozenset[str], how: str) -> None:
        if "user_id" in changes:
            if changes["user_id"] != self.user_id:
                msg = (
                    f"A context for user {self.user_id!r} cannot become one for user "
                    f"{short_repr(changes['user_id'])} through {how}(). Create a new root "
                    "UserContext for the other user."
                )
                raise IsolationError(msg)
            del changes["user_id"]
        unknown = changes.keys() - allowed
        if unknown:
            msg = (
                f"UserContext.{how}() cannot set {', '.join(sorted(unknown))}; "
                f"it accepts {', '.join(sorted(allowed - {'user_id'}))}."
            )
            raise TypeError(msg)

    def to_dict(self) -> dict[str, Any]:
        """
        Return this context as a dict of plain values, for `from_dict`.

        Metadata mappings become plain dicts; tuples, frozensets and bytes stay.

        .. versionadded:: 0.1.0
        """
        return _codec.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """
        Rebuild a context from the output of `to_dict`.

        It is validated exactly like construction, and unknown keys are refused.

        Raises:
            InvalidContextError: If a value breaks a rule or a key is unknown.
            TypeError: If *data* is not a mapping, or a value has a wrong type.

        .. versionadded:: 0.1.0
        """
        return _codec.from_dict(cls, data)

    def to_headers(self, *, signer: HeaderSigner | None = None) -> dict[str, str]:
        """
        Encode this context as HTTP headers named ``x-usercontext-*``.

        Values are percent-encoded ASCII; metadata travels as JSON, so its
        values must be JSON types (str, int, float, bool, None, tuples and
        mappings of those). The headers are at most 8 KiB in total.

        Args:
            signer: When given, the headers also carry
                ``x-usercontext-signature``, an HMAC of all of them that a
                receiver checks with `usercontext.HeaderVerifier` (see
                :doc:`how-to-trust`).

        Raises:
            InvalidContextError: If the headers would exceed 8 KiB, or metadata
                holds bytes or frozensets.
            TypeError: If *signer* is not a `usercontext.HeaderSigner`.

        .. versionadded:: 0.1.0
        """
        return _codec.to_headers(self, signer)

    @classmethod
    def from_headers(
        cls,
        headers: Mapping[str, str] | Mapping[bytes, bytes] | Any,
        *,
        verifier: HeaderVerifier | None = None,
    ) -> Self:
        """
        Rebuild a context from headers made by `to_headers`.

        *headers* may be a mapping or an iterable of ``(name, value)`` pairs, of
        `str` or `bytes` (as in an ASGI scope); names are case-insensitive and
        headers without the ``x-usercontext-`` prefix are ignored. Decoding
        validates like construction and refuses unknown ``x-usercontext-``
        headers. Without *verifier*, an ``x-usercontext-signature`` header is
        ignored: anyone who can send the headers can claim any user, so strip
        them from untrusted requests (`usercontext.strip_context_headers`).

        Args:
            headers: The request's headers.
            verifier: When given, the headers are refused unless their
                signature, made by a `usercontext.HeaderSigner` with one of
                its keys, is valid now and covers exactly the
                ``x-usercontext-*`` headers received.

        Raises:
            InvalidContextError: If a header is missing, unknown, malformed or
                breaks a rule, or the headers exceed 8 KiB.
            usercontext.exceptions.InvalidSignatureError: If *verifier* is
                given and the signature is missing, malformed, made with an
                unknown key, expired, not yet valid, or does not match.
            TypeError: If *verifier* is not a `usercontext.HeaderVerifier`.

        .. versionadded:: 0.1.0
        """
        return _codec.from_headers(cls, headers, verifier)

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickling goes through from_dict, so it is validated like construction.
        return (_from_dict, (type(self), self.to_dict()))

    def __repr__(self) -> str:
        parts = [
            f"user_id={self.user_id!r}",
            f"thread_id={self.thread_id!r}",
            f"run_id={self.run_id!r}",
            f"request_id={self.request_id!r}",
        ]
        if self.connection_id is not None:
            parts.append(f"connection_id={self.connection_id!r}")
        if self.parent_request_id is not None:
            parts.append(f"parent_request_id={self.parent_request_id!r}")
        parts.append(f"depth={self.depth}")
        if self.metadata:
            # Values may hold personal data: show the keys only.
            parts.append(f"metadata_keys={tuple(self.metadata)!r}")
        return f"UserContext({', '.join(parts)})"


def with_request_id(ctx: UserContext, request_id: str) -> UserContext:
    """
    Return *ctx* with *request_id*, as ``ctx.evolve(request_id=request_id)``
    does, without reading the changes of a call that may change any field:
    the middleware gives every request its incoming id this way.

    Raises:
        InvalidContextError: If *request_id* breaks a rule, as `evolve` raises.
    """
    # _check_request_id, written out (every request comes here); the rules
    # stay in _passes, their one home.
    if request_id.__class__ is not str or not _passes(request_id):
        raise _id_error("request_id", request_id, pattern=False)
    new = _draft()
    new.user_id = ctx.user_id
    new.thread_id = ctx.thread_id
    new.run_id = ctx.run_id
    new.request_id = request_id
    new.connection_id = ctx.connection_id
    new.parent_request_id = ctx.parent_request_id
    new.depth = ctx.depth
    new.created_at = ctx.created_at
    new.metadata = ctx.metadata
    new.__class__ = type(ctx)  # type: ignore[assignment]
    return new  # type: ignore[return-value]


def _from_dict(cls: type[UserContext], data: dict[str, Any]) -> UserContext:
    return cls.from_dict(data)


def _set_field(draft: _Draft, field: str, value: Any) -> None:
    if field == "metadata":
        value = check_metadata(value)
    elif field == "depth":
        pass  # checked together with parent_request_id by the caller
    elif field == "created_at":
        value = _check_created_at(value)
    elif field in ("request_id", "parent_request_id"):
        if value is not None or field == "request_id":
            _check_request_id(field, value)
    elif value is not None or field != "connection_id":
        _check_id(field, value)
    setattr(draft, field, value)


class _Draft:
    """
    A mutable twin of `UserContext` with the same slots, filled in and then
    turned into a `UserContext` by assigning ``__class__``.

    Assigning slots of a class without a custom ``__setattr__`` is several times
    cheaper than going around a frozen class's ``__setattr__``, and creating
    contexts is the library's hottest path.
    """

    __slots__ = tuple(field.name for field in attrs.fields(UserContext))

    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    connection_id: str | None
    parent_request_id: str | None
    depth: int
    created_at: float
    metadata: Mapping[str, Any]


_draft = functools.partial(object.__new__, _Draft)
_now = time.time
