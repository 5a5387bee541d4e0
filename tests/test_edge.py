"""
The edge rule: `usercontext.strip_context_headers` drops what untrusted
clients send in the library's propagation formats, and nothing else.
"""

from __future__ import annotations

import usercontext as uc

from usercontext._edge import strip_baggage


def test_drops_every_context_header_whatever_its_case() -> None:
    ctx = uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")
    sent = [(k.encode(), v.encode()) for k, v in ctx.to_headers().items()]
    sent += [(b"X-UserContext-User-Id", b"u-2"), (b"accept", b"*/*")]

    assert len(sent) >= 6
    assert uc.strip_context_headers(sent) == [(b"accept", b"*/*")]


def test_keeps_other_baggage_members_in_order() -> None:
    headers = [
        (b"baggage", b"a=1, usercontext.user_id=u-1;p=2 ,b=2;q"),
        (b"baggage", b"usercontext.run_id=r-1"),
        (b"x-request-id", b"req-1"),
    ]

    assert uc.strip_context_headers(headers) == [
        (b"baggage", b"a=1,b=2;q"),
        (b"x-request-id", b"req-1"),
    ]


def test_baggage_without_library_members_is_unchanged_in_content() -> None:
    assert strip_baggage("a=1,b=2") == "a=1,b=2"
    assert strip_baggage("") == ""
    assert strip_baggage(" , ,a=1") == "a=1"
    # A member named like the prefix but not under it stays.
    assert strip_baggage("usercontextual=1") == "usercontextual=1"


def test_input_is_not_changed() -> None:
    headers = [(b"x-usercontext-user-id", b"u-1"), (b"baggage", b"usercontext.user_id=u-1")]
    before = list(headers)

    assert uc.strip_context_headers(headers) == []
    assert headers == before
