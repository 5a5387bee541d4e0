"""
Tests of the refusal exceptions of `usercontext.exceptions`: what a resolver
raises to answer a request with an HTTP error.
"""

from __future__ import annotations

import pickle

import pytest

import usercontext as uc

from usercontext.exceptions import (
    ForbiddenError,
    RequestRefusedError,
    ServiceUnavailableError,
    TooManyRequestsError,
    UnauthenticatedError,
)


class TestRequestRefused:
    def test_members(self):
        """
        A refusal keeps every member of its problem document; the title and
        the error code default to the status's phrase and name.
        """
        e = RequestRefusedError("No tea here.", status=418)

        assert (e.status, e.title, e.type, e.error, e.detail) == (
            418,
            "I'm a Teapot",
            "about:blank",
            "im_a_teapot",
            "No tea here.",
        )
        assert e.headers == {}
        assert e.retry_after is None
        assert str(e) == "No tea here."
        assert isinstance(e, uc.UserContextError)

    def test_explicit_members(self):
        """
        Title, type, error code and headers given are kept as given.
        """
        e = RequestRefusedError(
            "Your plan does not include exports.",
            status=402,
            title="Upgrade needed",
            type="https://example.com/problems/plan",
            error="plan_limit",
            headers={"Link": '</plans>; rel="upgrade"'},
        )

        assert (e.title, e.type, e.error) == (
            "Upgrade needed",
            "https://example.com/problems/plan",
            "plan_limit",
        )
        assert e.headers == {"Link": '</plans>; rel="upgrade"'}

    def test_unknown_status_has_a_generic_title(self):
        """
        A status HTTP does not name gets the title "Error".
        """
        e = RequestRefusedError("odd", status=599)

        assert (e.title, e.error) == ("Error", "error")

    @pytest.mark.parametrize(
        ("retry_after", "header"), [(1, "1"), (2.5, "3"), (0.01, "1"), (60, "60")]
    )
    def test_retry_after_is_whole_seconds(self, retry_after, header):
        """
        *retry_after* is rounded up to whole seconds, at least 1, and becomes
        the Retry-After header.
        """
        e = TooManyRequestsError(retry_after=retry_after)

        assert e.retry_after == int(header)
        assert e.headers == {"Retry-After": header}

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"status": 200}, ValueError, r"status=\.\.\.\) must be an int from 400 to 599"),
            ({"status": 600}, ValueError, r"from 400 to 599, got 600"),
            ({"status": "401"}, ValueError, r"got '401'"),
            ({"status": 400, "title": ""}, TypeError, r"title=\.\.\.\) must be a non-empty str"),
            ({"status": 400, "type": 7}, TypeError, r"type=\.\.\.\) must be a non-empty str"),
            ({"status": 400, "error": b"x"}, TypeError, r"error=\.\.\.\) must be a non-empty"),
            ({"status": 429, "retry_after": "5"}, TypeError, r"a number of seconds, got '5'"),
            ({"status": 429, "retry_after": True}, TypeError, r"a number of seconds, got True"),
            ({"status": 429, "retry_after": 0}, ValueError, r"finite number of seconds > 0"),
            ({"status": 429, "retry_after": float("inf")}, ValueError, r"> 0, got inf"),
            ({"status": 429, "retry_after": float("nan")}, ValueError, r"> 0, got nan"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        """
        Bad arguments are refused at construction, with a message naming the
        argument.
        """
        with pytest.raises(error, match=match):
            RequestRefusedError("d", **kwargs)

    def test_detail_must_be_a_str(self):
        """
        The detail is the text the client reads: it must be a str.
        """
        with pytest.raises(TypeError, match=r"^RequestRefusedError\(detail=\.\.\.\) must be a str"):
            RequestRefusedError({"why": "no"}, status=400)

    @pytest.mark.parametrize(
        "value",
        [
            "Bearer\r\nSet-Cookie: session=stolen",
            "Bearer\n",
            "Bearer\x00",
            "Bearer\x7f",
            'Bearer realm="\u2603"',
        ],
        ids=["crlf", "lf", "nul", "del", "beyond-latin-1"],
    )
    def test_illegal_header_values_are_refused_at_construction(self, value):
        """
        A header value holding CR, LF, another control character, or a
        character beyond Latin-1 is refused when the exception is made, with a
        message naming the header and the character: it is never sent.
        """
        with pytest.raises(ValueError, match=r"the value of header 'X-Why' holds") as e:
            RequestRefusedError("d", status=403, headers={"X-Why": value})

        assert "which a header cannot carry" in str(e.value)

    def test_tab_and_latin_1_are_legal(self):
        """
        A tab and Latin-1 characters are legal in a header value (RFC 9110
        obs-text).
        """
        e = ForbiddenError(headers={"X-Why": "a\tb caf\xe9"})

        assert e.headers == {"X-Why": "a\tb caf\xe9"}

    @pytest.mark.parametrize("name", ["", "X Why", "X-Why:", "X-Wh\xfd", b"X-Why", None])
    def test_illegal_header_names_are_refused(self, name):
        """
        A header name that is not an HTTP token is refused.
        """
        with pytest.raises(ValueError, match=r"has an invalid header name"):
            RequestRefusedError("d", status=403, headers={name: "v"})

    def test_header_values_must_be_str(self):
        """
        A header value of another type is refused.
        """
        with pytest.raises(
            TypeError, match=r"the value of header 'X-Count' must be a str, got int"
        ):
            RequestRefusedError("d", status=403, headers={"X-Count": 3})


class TestFamily:
    def test_unauthenticated(self):
        """
        `UnauthenticatedError` is the 401 refusal: its challenge is the
        WWW-Authenticate header, and it stays a PermissionError.
        """
        e = UnauthenticatedError("The token expired.", challenge='Bearer error="invalid_token"')

        assert isinstance(e, RequestRefusedError)
        assert isinstance(e, PermissionError)
        assert (e.status, e.title, e.error, e.detail) == (
            401,
            "Unauthorized",
            "unauthenticated",
            "The token expired.",
        )
        assert e.challenge == 'Bearer error="invalid_token"'
        assert e.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}

    def test_unauthenticated_defaults_and_extra_headers(self):
        """
        By default the message asks for authentication and the challenge is
        Bearer; extra headers are kept beside the challenge.
        """
        e = UnauthenticatedError(headers={"X-Login": "/login"})

        assert str(e) == "Authentication is required."
        assert e.headers == {"WWW-Authenticate": "Bearer", "X-Login": "/login"}

    def test_crlf_in_a_challenge_is_refused(self):
        """
        A challenge with CR or LF (a header injection) is refused when the
        exception is made.
        """
        with pytest.raises(
            ValueError, match=r"^UnauthenticatedError\(challenge=\.\.\.\): the value"
        ):
            UnauthenticatedError(challenge="Bearer\r\nSet-Cookie: session=stolen")

    @pytest.mark.parametrize(
        ("error", "status", "code", "builtin"),
        [
            (ForbiddenError(), 403, "forbidden", PermissionError),
            (TooManyRequestsError(), 429, "too_many_requests", RequestRefusedError),
            (ServiceUnavailableError(), 503, "service_unavailable", RequestRefusedError),
        ],
    )
    def test_statuses(self, error, status, code, builtin):
        """
        Each member of the family has its status and code, and a default
        detail for the client.
        """
        assert isinstance(error, RequestRefusedError)
        assert isinstance(error, builtin)
        assert (error.status, error.error) == (status, code)
        assert error.detail

    def test_exported(self):
        """
        The family is importable from `usercontext` too.
        """
        assert uc.RequestRefusedError is RequestRefusedError
        assert uc.ForbiddenError is ForbiddenError
        assert uc.TooManyRequestsError is TooManyRequestsError
        assert uc.ServiceUnavailableError is ServiceUnavailableError


class TestPickle:
    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    @pytest.mark.parametrize(
        "make",
        [
            lambda: RequestRefusedError(
                "No tea.", status=418, type="https://example.com/tea", headers={"X-A": "1"}
            ),
            lambda: UnauthenticatedError(
                "The token expired.", challenge='Bearer error="invalid_token"'
            ),
            lambda: ForbiddenError("Not your document.", error="not_owner"),
            lambda: TooManyRequestsError(retry_after=2.5),
            lambda: ServiceUnavailableError("Down for maintenance.", retry_after=30),
        ],
        ids=["RequestRefused", "Unauthenticated", "Forbidden", "TooManyRequests", "Unavailable"],
    )
    def test_round_trip(self, make, protocol):
        """
        Every refusal survives pickling, on every protocol, with every member:
        a worker process can report why it refused.
        """
        error = make()
        error.__notes__ = ["seen by a worker"]  # add_note(), on Python 3.10 too
        copy = pickle.loads(pickle.dumps(error, protocol))  # noqa: S301  # our own pickle

        assert type(copy) is type(error)
        assert copy.args == error.args
        assert vars(copy) == vars(error)
        assert (copy.status, copy.title, copy.type, copy.error, copy.detail) == (
            error.status,
            error.title,
            error.type,
            error.error,
            error.detail,
        )
        assert copy.headers == error.headers
        assert copy.__notes__ == ["seen by a worker"]

    def test_subclass_with_its_own_signature(self):
        """
        A user's subclass whose constructor takes other arguments round-trips
        too: unpickling does not call it.
        """
        copy = pickle.loads(pickle.dumps(PlanLimitError("exports", 3)))  # noqa: S301  # our own pickle

        assert (copy.feature, copy.limit, copy.status, copy.detail) == (
            "exports",
            3,
            402,
            "Your plan allows 3 exports.",
        )


class PlanLimitError(RequestRefusedError):
    """
    A user's refusal, built from its own arguments.
    """

    def __init__(self, feature: str, limit: int) -> None:
        super().__init__(f"Your plan allows {limit} {feature}.", status=402)
        self.feature = feature
        self.limit = limit
