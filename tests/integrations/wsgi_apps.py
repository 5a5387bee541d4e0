"""
The WSGI application that tests/integrations/test_wsgi_servers.py serves with
real threaded servers (gunicorn's gthread worker, waitress), in a process of
its own: a Flask app under ``/flask`` and a Django view under ``/django``, each
wrapped by its own `usercontext.wsgi.UserContextMiddleware`, and ``/stats``,
which reports what the server process counted.

Django is configured here, minimally and in this process only: the server's.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time

import django
import flask

from django.conf import settings

import usercontext as uc

from usercontext.wsgi import UserContextMiddleware, request_state


settings.configure(
    DEBUG=False,
    # An exception of a view reaches the middleware, which rolls back and
    # answers with its problem document, instead of Django's 500 page.
    DEBUG_PROPAGATE_EXCEPTIONS=True,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="only-for-the-tests",  # noqa: S106  # a test server's, not a secret
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402  # after settings.configure
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


# -- what the process counts, under one lock


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cross_user = 0  # a request that saw another user than its own
        self.leaks = 0  # a request that found what an earlier one set in its thread
        self.opened = 0  # sessions opened (one per request that asked for one)
        self.commits = 0
        self.rollbacks: list[str] = []  # the error each rollback saw
        self.threads: set[int] = set()
        self.requests = 0
        self.engines: dict[str, int] = {}  # in use per user
        self.engine_peak = 0  # the most engines one user held at once

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


counts = Counts()
# Set at the end of each request and never reset: a request that finds it set
# was served in a Context an earlier request left behind.
left_behind: contextvars.ContextVar[str] = contextvars.ContextVar("left_behind")


class Session:
    """
    A stand-in for a database session: it belongs to one user.
    """

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


def open_session(ctx: uc.UserContext):
    counts.add("opened")
    try:
        yield Session(ctx.user_id)
    except BaseException as e:
        with counts.lock:
            counts.rollbacks.append(type(e).__name__)
        raise
    counts.add("commits")


class Engine:
    """
    An expensive engine: at most two per user at once, through a ThreadQuota.
    """

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


quota = uc.ThreadQuota(per_key=2, total=64)


def open_engine(ctx: uc.UserContext):
    with quota.acquire(ctx.user_id, timeout=10.0):
        with counts.lock:
            held = counts.engines[ctx.user_id] = counts.engines.get(ctx.user_id, 0) + 1
            counts.engine_peak = max(counts.engine_peak, held)
        try:
            yield Engine(ctx.user_id)
        finally:
            with counts.lock:
                counts.engines[ctx.user_id] -= 1


flask_registry = uc.Registry()
flask_registry.register(Session, open_session)
flask_registry.register(Engine, open_engine)
django_registry = uc.Registry()
django_registry.register(Session, open_session)
django_registry.register(Engine, open_engine)


def resolve(environ) -> uc.UserContext | None:
    """
    Who is calling: ``authorization: Bearer <user id>``, or the header a
    trusted peer sends (``x-usercontext-user-id``).
    """
    scheme, _, user_id = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme != "Bearer" or not user_id:
        user_id = environ.get("HTTP_X_USERCONTEXT_USER_ID", "")
    if not user_id:
        raise uc.UnauthenticatedError("Send a bearer token.")
    if user_id == "u-anonymous":
        return None
    if user_id == "u-banned":
        raise uc.ForbiddenError("Your account is suspended.")
    if environ.get("HTTP_X_LOAD") == "high":
        raise uc.TooManyRequestsError("Slow down.", retry_after=1)
    if environ.get("HTTP_X_MAINTENANCE") == "1":
        raise uc.ServiceUnavailableError("Down for maintenance.", retry_after=30)
    thread_id = environ.get("HTTP_X_THREAD_ID", "t-1")
    return uc.UserContext(user_id=user_id, thread_id=thread_id, run_id="r-1")


def observe(user_id: str, session: Session, engine: Engine) -> list[str]:
    """
    Check, around a pause that lets other threads run, that the request sees
    its own user everywhere; return the users it saw.
    """
    seen = [uc.current().user_id, session.user_id, engine.user_id]
    time.sleep(0.002)
    seen += [uc.current().user_id, session.user_id, engine.user_id]
    if any(s != user_id for s in seen):
        counts.add("cross_user")
    return seen


def begin(expected: str) -> None:
    with counts.lock:
        counts.requests += 1
        counts.threads.add(threading.get_ident())
    if left_behind.get(None) is not None:
        counts.add("leaks")
    left_behind.set(expected)


# -- Flask

flask_app = flask.Flask("usercontext_wsgi_tests")
# An exception of a view reaches the middleware (see DEBUG_PROPAGATE_EXCEPTIONS).
flask_app.config["PROPAGATE_EXCEPTIONS"] = True


@flask_app.get("/whoami")
def flask_whoami():
    expected = flask.request.headers["authorization"].partition(" ")[2]
    begin(expected)
    resources = request_state(flask.request.environ).resources
    seen = observe(expected, resources.get(Session), resources.get(Engine))
    return {"user": uc.current().user_id, "seen": seen, "request_id": uc.current().request_id}


@flask_app.get("/peer")
def flask_peer():
    environ = flask.request.environ
    return {
        "user": uc.current().user_id,
        "context_headers": sorted(k for k in environ if k.startswith("HTTP_X_USERCONTEXT_")),
        "baggage": environ.get("HTTP_BAGGAGE"),
    }


@flask_app.get("/health")
def flask_health():
    return {"ok": True, "user": uc.current_or_none()}


@flask_app.get("/stream")
def flask_stream():
    n = int(flask.request.args.get("n", "5"))
    pause = float(flask.request.args.get("pause", "0"))
    resources = request_state(flask.request.environ).resources

    @flask.stream_with_context
    def lines():
        for i in range(n):
            time.sleep(pause)
            session = resources.get(Session)
            yield f"{i} {uc.current().user_id} {session.user_id}\n"

    return flask.Response(lines(), mimetype="text/plain")


@flask_app.get("/broken")
def flask_broken():
    request_state(flask.request.environ).resources.get(Session)
    msg = "no such note"
    raise LookupError(msg)


# -- Django


def django_whoami(request: HttpRequest) -> HttpResponse:
    expected = request.headers["authorization"].partition(" ")[2]
    begin(expected)
    resources = request_state(request.META).resources
    seen = observe(expected, resources.get(Session), resources.get(Engine))
    return JsonResponse(
        {"user": uc.current().user_id, "seen": seen, "request_id": uc.current().request_id}
    )


def django_peer(request: HttpRequest) -> HttpResponse:
    return JsonResponse(
        {
            "user": uc.current().user_id,
            "context_headers": sorted(
                k for k in request.META if k.startswith("HTTP_X_USERCONTEXT_")
            ),
            "baggage": request.META.get("HTTP_BAGGAGE"),
        }
    )


def django_health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True, "user": uc.current_or_none()})


def django_stream(request: HttpRequest) -> HttpResponse:
    n = int(request.GET.get("n", "5"))
    pause = float(request.GET.get("pause", "0"))
    resources = request_state(request.META).resources

    def lines():
        for i in range(n):
            time.sleep(pause)
            session = resources.get(Session)
            yield f"{i} {uc.current().user_id} {session.user_id}\n"

    return StreamingHttpResponse(lines(), content_type="text/plain")


def django_broken(request: HttpRequest) -> HttpResponse:
    request_state(request.META).resources.get(Session)
    msg = "no such note"
    raise LookupError(msg)


urlpatterns = [
    path("whoami", django_whoami),
    path("peer", django_peer),
    path("health", django_health),
    path("stream", django_stream),
    path("broken", django_broken),
]


# -- the process's application


def stats(environ, start_response):
    with counts.lock:
        body = {
            "cross_user": counts.cross_user,
            "leaks": counts.leaks,
            "opened": counts.opened,
            "commits": counts.commits,
            "rollbacks": list(counts.rollbacks),
            "threads": len(counts.threads),
            "requests": counts.requests,
            "engine_peak": counts.engine_peak,
            "engines_in_use": sum(counts.engines.values()),
            "open_scopes": flask_registry.stats().scopes + django_registry.stats().scopes,
            "quota_in_use": quota.stats().in_use,
            "bound_outside": uc.current_or_none() is not None,
        }
    payload = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [payload]


flask_wsgi = UserContextMiddleware(
    flask_app.wsgi_app,
    resolver=resolve,
    registry=flask_registry,
    exempt=("/health",),
    # The public face: clients must not assert a user through the headers
    # that carry a context between services.
    strip_context_headers=True,
)
flask_app.wsgi_app = flask_wsgi  # type: ignore[method-assign]
django_wsgi = UserContextMiddleware(
    get_wsgi_application(),
    resolver=resolve,
    registry=django_registry,
    exempt=("/health",),
)


def application(environ, start_response):
    """
    Route ``/flask/...`` to Flask, ``/django/...`` to Django (as a mount
    would: the prefix moves to SCRIPT_NAME), and ``/stats`` to the counts.
    """
    path_info = environ.get("PATH_INFO", "")
    for prefix, app in (("/flask", flask_app), ("/django", django_wsgi)):
        if path_info.startswith(prefix + "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            environ["PATH_INFO"] = path_info[len(prefix) :]
            return app(environ, start_response)
    return stats(environ, start_response)
