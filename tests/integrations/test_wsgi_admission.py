"""
`usercontext.wsgi.UserContextMiddleware` answering the refusals a Flask view
raises (the ``429`` and ``503`` of an `EngineFactory` with an admission
policy) with their status, problem document and ``Retry-After``, under a
real threaded server.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

import usercontext as uc


flask = pytest.importorskip("flask", reason="flask is not installed: pip install flask")
httpx2 = pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

from usercontext.wsgi import request_state  # noqa: E402  # after the skips

from wsgi_helpers import (  # noqa: E402  # the fixtures by their functions' names
    TIMEOUT,
    _log,  # noqa: F401
    _registry,  # noqa: F401
    _serve,  # noqa: F401
    problem,
    wrap,
)


class FakeClock:
    """
    A clock that moves only when told to.
    """

    def __init__(self, now=500.0):
        self.now = now

    def __call__(self):
        return self.now


class Service:
    """
    A Flask service whose view uses an engine of a factory with an admission
    policy: a rate limit of 1 request/s with a burst of 2, no waiting
    behind a user's one engine, and a breaker that opens after 2 failed
    creations.
    """

    def __init__(self):
        self.clock = FakeClock()
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.breaker = uc.CircuitBreaker(failures=2, cool_down=30, clock=self.clock)
        self.factory = uc.EngineFactory(
            self.create,
            per_user=1,
            admission=uc.Admission(
                rate=uc.LocalRateLimiter(1, burst=2, clock=self.clock),
                shed=uc.Shed(max_waiting_per_user=0, clock=self.clock),
                breaker=self.breaker,
            ),
        )
        app = flask.Flask("engines")
        app.config["PROPAGATE_EXCEPTIONS"] = True  # a view's exception reaches the middleware

        @app.get("/run")
        def run():
            request_state(flask.request.environ).resources.get("session")
            with self.factory.engine() as engine:
                if flask.request.args.get("hold"):
                    self.holding.set()
                    self.hold.wait(TIMEOUT)
                return {"engine_of": engine}

        self.app = app

    def create(self, ctx):
        if ctx.user_id == "u-broken":
            msg = "the engine backend refused the user's settings"
            raise OSError(msg)
        return ctx.user_id


@pytest.fixture(name="service")
def _service(serve, registry):
    service = Service()
    service.app.wsgi_app = wrap(service.app.wsgi_app, registry)
    return service, serve(service.app)


def get(url, user, **params):
    return httpx2.get(f"{url}/run", headers={"x-user": user}, params=params, timeout=TIMEOUT)


class TestRefusalsOfTheApplication:
    def test_rate_limited(self, service, log):
        """
        The third request of a user within a frozen second gets ``429`` with
        ``Retry-After: 1`` and a problem document with the request id; its
        session rolls back; another user is not limited.
        """
        svc, url = service
        assert [get(url, "u-1").status_code for _ in range(2)] == [200, 200]
        refused = get(url, "u-1")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        body = problem(refused)
        assert (body["error"], body["status"], body["retry_after"]) == ("rate_limited", 429, 1)
        assert "u-1" in body["detail"]
        assert get(url, "u-2").json() == {"engine_of": "u-2"}
        assert log[-4:] == [
            "open u-1",
            "rollback u-1 RateLimitedError",
            "open u-2",
            "commit u-2",
        ]
        stats = svc.factory.stats()
        assert (stats.created, stats.admission.rate.limited) == (3, 1)
        svc.clock.now += 1  # a second later, one more request of u-1 is admitted
        assert get(url, "u-1").status_code == 200

    def test_shed_while_the_users_engine_is_in_use(self, service):
        """
        While one request of a user holds its engine (in another server
        thread), the next of that user is shed at once with ``429`` (its
        queue is full: it may not wait), and gets its engine afterwards.
        """
        svc, url = service
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(get, url, "u-3", hold="1")
            assert svc.holding.wait(TIMEOUT)
            refused = get(url, "u-3")
            svc.hold.set()
            assert held.result().json() == {"engine_of": "u-3"}
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        body = problem(refused)
        assert (body["error"], body["retry_after"]) == ("user_queue_full", 1)
        shed = svc.factory.stats().admission.shed
        assert (shed.shed, shed.user_queue, shed.waiting) == (1, 1, 0)
        svc.clock.now += 1  # both requests passed the rate limit: wait for the next
        assert get(url, "u-3").status_code == 200

    def test_breaker_open(self, service, log):
        """
        Two failed creations (``500``, a crash) open the breaker: the next
        request gets ``503`` with the cool-down as ``Retry-After``, and
        create is not called.
        """
        svc, url = service
        for _ in range(2):
            crashed = get(url, "u-broken")
            assert crashed.status_code == 500
            assert problem(crashed)["error"] == "internal_error"
            svc.clock.now += 1  # within the rate limit
        refused = get(url, "u-broken")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "29"  # opened 1 s ago, for 30 s
        body = problem(refused)
        assert (body["error"], body["retry_after"]) == ("circuit_open", 29)
        assert log[-2:] == ["open u-broken", "rollback u-broken CircuitOpenError"]
        assert svc.breaker.stats() == uc.BreakerStats(
            state="open", open=1, opened=1, refused=1, probes=0, failures=2
        )
        assert svc.factory.stats().create_errors == 2
