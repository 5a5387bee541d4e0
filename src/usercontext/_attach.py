"""
`attach` and `detach`: `bind` split in two, for hooks whose enter and exit
run in different callbacks (signal handlers, the hooks of job queues and
servers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ._context import UserContext
from ._current import _get, _var, bind


if TYPE_CHECKING:
    import contextvars


__all__ = ["AttachToken", "attach", "detach"]


@final
class AttachToken:
    """
    What `attach` returns: pass it to `detach` to undo the attach.

    It is opaque; its only public attribute is the attached context.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_detached", "_token", "ctx")

    ctx: UserContext
    """
    The context that `attach` bound.
    """

    def __init__(self, ctx: UserContext, token: contextvars.Token[UserContext]) -> None:
        self.ctx = ctx
        self._token = token
        self._detached = False

    def __repr__(self) -> str:
        state = "detached" if self._detached else "attached"
        return f"<usercontext.AttachToken(user_id={self.ctx.user_id!r}, {state})>"


def attach(ctx: UserContext) -> AttachToken:
    """
    Bind *ctx* as the current context until `detach` is called with the token.

    It is ``bind(ctx).__enter__()`` with its exit kept in a token, for hooks
    where the work begins in one callback and ends in another. The rules are
    `bind`'s: binding a context of another user while one is bound raises
    `usercontext.exceptions.IsolationError`, and children of the same user nest.
    Prefer ``with bind(ctx):`` wherever one block holds the work: it cannot
    forget to detach.

    Detach each token once, in the same Context (thread, task) as the attach,
    most recent first, as ``ContextVar.reset`` requires.

    Args:
        ctx: The context to bind.

    Returns:
        The token to pass to `detach`.

    Raises:
        TypeError: If *ctx* is not a `UserContext`.
        usercontext.exceptions.IsolationError: If a context of another user
            is bound.

    >>> import usercontext as uc
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> token = uc.attach(ctx)
    >>> uc.current() is ctx
    True
    >>> uc.detach(token)
    >>> uc.current_or_none() is None
    True

    .. versionadded:: 0.1.0
    """
    if type(ctx) is not UserContext and not isinstance(ctx, UserContext):
        msg = f"attach() takes a usercontext.UserContext, got {type(ctx).__name__}."  # type: ignore[unreachable]
        raise TypeError(msg)
    prev = _get(None)
    if prev is not None and prev.user_id != ctx.user_id:
        bind(ctx).__enter__()  # raises IsolationError with bind's explanation
    return AttachToken(ctx, _var.set(ctx))


_OTHER_CONTEXT = (
    "detach() was given a token of another Context: the attach ran in another thread or "
    "task. Detach in the callback that runs where the attach ran (the same thread, the "
    "same task), or use `with usercontext.bind(ctx):` around work that stays in one place."
)


def detach(token: AttachToken) -> None:
    """
    Undo the `attach` that returned *token*: restore the context bound before it.

    Raises:
        TypeError: If *token* is not an `AttachToken`.
        RuntimeError: If *token* was detached already, or if contexts attached
            (or bound) after it are still bound: detach the most recent first.
            The out-of-order call changes nothing, and the token stays good.
        ValueError: If *token* was made in another Context (another thread or
            task), where it cannot undo anything; nothing changes.

    .. versionadded:: 0.1.0
    """
    if type(token) is not AttachToken:
        msg = (  # type: ignore[unreachable]
            f"detach() takes the AttachToken that usercontext.attach() returned, "
            f"got {type(token).__name__}."
        )
        raise TypeError(msg)
    if token._detached:
        msg = (
            f"This token of user {token.ctx.user_id!r} was detached already: detach each "
            "token once, in the callback that ends the work its attach() began."
        )
        raise RuntimeError(msg)
    now = _get(None)
    try:
        _var.reset(token._token)
    except ValueError:  # another Context: reset refuses before changing anything
        raise ValueError(_OTHER_CONTEXT) from None
    if now is token.ctx:
        token._detached = True
        return
    # Out of order, in the right Context: reset went back past the contexts
    # bound since. Put the current one back; the new token restores what the
    # old one would have, so the token can still be detached in order.
    if now is not None:
        token._token = _var.set(now)
    else:  # only after a bind left out of order: no way back to nothing bound
        token._detached = True
    msg = (
        f"detach() of a context of user {token.ctx.user_id!r} while another context is "
        "bound over it: detach (or leave) the contexts attached since first, most recent "
        "first, as with contextvars.ContextVar.reset."
    )
    raise RuntimeError(msg)
