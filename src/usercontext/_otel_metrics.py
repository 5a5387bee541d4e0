"""
The metrics of `usercontext.otel`: the stats of quotas, engine factories,
registries and hubs as OpenTelemetry observable instruments, read from each
object's ``stats()`` when a reader collects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Literal, cast

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation, get_meter_provider

from usercontext import EmitterHub, EngineFactory, Quota, Registry, ThreadQuota


if TYPE_CHECKING:
    from usercontext import EmitterStats, FactoryStats


__all__ = ["METRICS", "instrument"]

_Kind = Literal["counter", "updowncounter", "gauge"]
_Read = Callable[[Any], Iterable[tuple[int, Mapping[str, str]]]]
_NONE: Mapping[str, str] = {}
_ATTEMPTS = 100
_SHED_REASONS = ("user_queue", "queue", "deadline")
_BREAKER_STATES = ("closed", "open", "half_open")


def _one(read: Callable[[Any], int | None]) -> _Read:
    def values(stats: Any) -> Iterable[tuple[int, Mapping[str, str]]]:
        value = read(stats)
        return () if value is None else ((value, _NONE),)

    return values


def _waiting(s: FactoryStats) -> int:
    return s.quota.waiting + (s.thread_quota.waiting if s.thread_quota else 0)


def _rejected(s: FactoryStats) -> int:
    return s.quota.rejected + (s.thread_quota.rejected if s.thread_quota else 0)


def _timed_out(s: FactoryStats) -> int:
    return s.quota.timed_out + (s.thread_quota.timed_out if s.thread_quota else 0)


def _part(part: str, field: str) -> _Read:
    """
    Read *field* of the *part* (``rate``, ``shed`` or ``breaker``) of a
    factory's admission stats: nothing for a factory without that part.
    """

    def values(s: FactoryStats) -> Iterable[tuple[int, Mapping[str, str]]]:
        stats = None if s.admission is None else getattr(s.admission, part)
        return () if stats is None else ((getattr(stats, field), _NONE),)

    return values


def _shed(s: FactoryStats) -> Iterable[tuple[int, Mapping[str, str]]]:
    shed = None if s.admission is None else s.admission.shed
    if shed is None:
        return ()
    return [
        (getattr(shed, reason), {"usercontext.factory.shed_reason": reason})
        for reason in _SHED_REASONS
    ]


def _breaker_state(s: FactoryStats) -> Iterable[tuple[int, Mapping[str, str]]]:
    # One series per state, 1 for the breaker's state and 0 for the others:
    # a state is a label, not a number.
    breaker = None if s.admission is None else s.admission.breaker
    if breaker is None:
        return ()
    return [
        (int(breaker.state == state), {"usercontext.factory.breaker_state": state})
        for state in _BREAKER_STATES
    ]


def _dropped(s: EmitterStats) -> Iterable[tuple[int, Mapping[str, str]]]:
    return [(n, {"usercontext.hub.drop_reason": reason}) for reason, n in s.dropped.items()]


#: Each family's instruments: (name, kind, unit, description, how to read it).
METRICS: dict[str, tuple[tuple[str, _Kind, str, str, _Read], ...]] = {
    "quota": (
        ("in_use", "updowncounter", "{lease}", "Slots held right now.", _one(lambda s: s.in_use)),
        (
            "waiting",
            "updowncounter",
            "{request}",
            "Requests waiting for a slot right now.",
            _one(lambda s: s.waiting),
        ),
        ("peak", "gauge", "{lease}", "The most slots ever held at once.", _one(lambda s: s.peak)),
        ("limit", "gauge", "{lease}", "The global limit, when set.", _one(lambda s: s.total)),
        ("granted", "counter", "{lease}", "Slots granted.", _one(lambda s: s.granted)),
        (
            "rejected",
            "counter",
            "{request}",
            "Requests refused at once (a full quota and no wait).",
            _one(lambda s: s.rejected),
        ),
        (
            "timed_out",
            "counter",
            "{request}",
            "Requests that gave up after their timeout.",
            _one(lambda s: s.timed_out),
        ),
        (
            "cancelled",
            "counter",
            "{request}",
            "Requests cancelled while waiting.",
            _one(lambda s: s.cancelled),
        ),
    ),
    "factory": (
        (
            "in_use",
            "updowncounter",
            "{engine}",
            "Engines in use right now.",
            _one(lambda s: s.in_use),
        ),
        ("idle", "updowncounter", "{engine}", "Engines in the idle pool.", _one(lambda s: s.idle)),
        ("peak", "gauge", "{engine}", "The most engines in use at once.", _one(lambda s: s.peak)),
        (
            "waiting",
            "updowncounter",
            "{request}",
            "Requests waiting for the factory's quota right now.",
            _one(_waiting),
        ),
        ("created", "counter", "{engine}", "Engines created.", _one(lambda s: s.created)),
        ("closed", "counter", "{engine}", "Engines closed.", _one(lambda s: s.closed)),
        (
            "reused",
            "counter",
            "{engine}",
            "Engines handed out again from the idle pool.",
            _one(lambda s: s.reused),
        ),
        (
            "rejected",
            "counter",
            "{request}",
            "Requests refused by the factory's quota.",
            _one(_rejected),
        ),
        (
            "timed_out",
            "counter",
            "{request}",
            "Requests that timed out waiting for the factory's quota.",
            _one(_timed_out),
        ),
        (
            "create_errors",
            "counter",
            "{error}",
            "Engine creations that raised.",
            _one(lambda s: s.create_errors),
        ),
        (
            "close_errors",
            "counter",
            "{error}",
            "Engine closes that raised or timed out.",
            _one(lambda s: s.close_errors),
        ),
        (
            "deadline_errors",
            "counter",
            "{error}",
            "Bodies cancelled by the factory's deadline.",
            _one(lambda s: s.deadline_errors),
        ),
        (
            "rate_admitted",
            "counter",
            "{request}",
            "Requests the admission policy's rate limit admitted.",
            _part("rate", "admitted"),
        ),
        (
            "rate_limited",
            "counter",
            "{request}",
            "Requests the admission policy's rate limit refused (429).",
            _part("rate", "limited"),
        ),
        (
            "shed",
            "counter",
            "{request}",
            "Requests the admission policy shed instead of queueing, by reason.",
            _shed,
        ),
        (
            "shed_peak_waiting",
            "gauge",
            "{request}",
            "The most requests that waited at once under the shedding policy.",
            _part("shed", "peak_waiting"),
        ),
        (
            "breaker_state",
            "gauge",
            "1",
            "1 for the circuit breaker's state (closed, open or half_open), 0 for the others.",
            _breaker_state,
        ),
        (
            "breaker_open",
            "updowncounter",
            "{breaker}",
            "Circuit breakers open right now (one per user with per_user).",
            _part("breaker", "open"),
        ),
        (
            "breaker_opened",
            "counter",
            "{event}",
            "Times a circuit breaker opened.",
            _part("breaker", "opened"),
        ),
        (
            "breaker_refused",
            "counter",
            "{request}",
            "Requests refused because a circuit breaker was open (503).",
            _part("breaker", "refused"),
        ),
        (
            "breaker_probes",
            "counter",
            "{request}",
            "Creations let through as probes of an open circuit breaker.",
            _part("breaker", "probes"),
        ),
        (
            "breaker_failures",
            "counter",
            "{error}",
            "Failed creations the circuit breaker counted.",
            _part("breaker", "failures"),
        ),
    ),
    "registry": (
        (
            "in_use",
            "updowncounter",
            "{resource}",
            "Resources open right now.",
            _one(lambda s: s.in_use),
        ),
        ("scopes", "updowncounter", "{scope}", "Scopes open right now.", _one(lambda s: s.scopes)),
        ("opened", "counter", "{scope}", "Scopes entered.", _one(lambda s: s.opened)),
        ("created", "counter", "{resource}", "Resources created.", _one(lambda s: s.created)),
        ("closed", "counter", "{resource}", "Resources closed.", _one(lambda s: s.closed)),
        (
            "close_errors",
            "counter",
            "{error}",
            "Cleanups that raised or timed out.",
            _one(lambda s: s.close_errors),
        ),
    ),
    "hub": (
        ("users", "updowncounter", "{user}", "Users with state held.", _one(lambda s: s.users)),
        (
            "attached",
            "updowncounter",
            "{sink}",
            "Sinks attached right now.",
            _one(lambda s: s.attached),
        ),
        (
            "waiting",
            "updowncounter",
            "{request}",
            "Emits waiting for room right now.",
            _one(lambda s: s.waiting),
        ),
        (
            "peak_pending",
            "gauge",
            "{event}",
            "The most events ever pending for one sink.",
            _one(lambda s: s.peak_pending),
        ),
        ("emitted", "counter", "{event}", "Events accepted by emit.", _one(lambda s: s.emitted)),
        (
            "delivered",
            "counter",
            "{event}",
            "Events accepted by a sink.",
            _one(lambda s: s.delivered),
        ),
        (
            "dropped",
            "counter",
            "{event}",
            "Events a sink will not get, by usercontext.hub.drop_reason.",
            _dropped,
        ),
        (
            "rejected",
            "counter",
            "{event}",
            "Emits refused because a buffer was full.",
            _one(lambda s: s.rejected),
        ),
        (
            "timed_out",
            "counter",
            "{event}",
            "Emits that waited for room past their timeout.",
            _one(lambda s: s.timed_out),
        ),
        (
            "retried",
            "counter",
            "{send}",
            "Sends retried after an error.",
            _one(lambda s: s.retried),
        ),
        (
            "dead_lettered",
            "counter",
            "{event}",
            "Events handed to the dead-letter hook.",
            _one(lambda s: s.dead_lettered),
        ),
        (
            "send_errors",
            "counter",
            "{error}",
            "Sends that raised or timed out.",
            _one(lambda s: s.send_errors),
        ),
        (
            "publish_errors",
            "counter",
            "{error}",
            "Emits the hub's bus failed.",
            _one(lambda s: s.publish_errors),
        ),
    ),
}


def _checked(
    argument: str, objects: object, kinds: tuple[type, ...], what: str
) -> tuple[tuple[str, Any], ...]:
    if not isinstance(objects, Mapping):
        msg = (
            f"instrument({argument}=...) takes a mapping from a name to {what}, such as "
            f"{argument}={{'engines': obj}}, got a {type(objects).__name__}. The name becomes "
            f"the usercontext.{argument[:-1] if argument != 'factories' else 'factory'}.name "
            "attribute of its measurements."
        )
        raise TypeError(msg)
    out: list[tuple[str, Any]] = []
    for name, obj in cast("Mapping[object, object]", objects).items():
        if not isinstance(name, str) or not name:
            msg = (
                f"instrument({argument}=...) names {what} with a non-empty str, got "
                f"{name!r}. Name it after its use, such as 'engines'."
            )
            raise ValueError(msg)
        if not isinstance(obj, kinds):
            msg = (
                f"instrument({argument}=...) takes {what} under {name!r}, got a "
                f"{type(obj).__name__}. Pass the object whose stats() to observe."
            )
            raise TypeError(msg)
        out.append((name, obj))
    return tuple(out)


def _stats(obj: Any) -> Any:
    # A metric reader may collect from its own thread (the SDK's periodic
    # reader does) while the event loop changes the tables stats() walks; a
    # walk that meets a change raises RuntimeError ("changed size during
    # iteration") and is tried again. The counters it reads are plain ints.
    for _ in range(_ATTEMPTS - 1):
        try:
            return obj.stats(top=0)
        except RuntimeError:  # noqa: PERF203  # raised only when a walk met a change
            continue
    return obj.stats(top=0)


def _callback(
    objects: tuple[tuple[str, Any], ...], attribute: str, read: _Read
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:  # noqa: ARG001  # the API's signature
        observations: list[Observation] = []
        for name, obj in objects:
            for value, extra in read(_stats(obj)):
                observations.append(Observation(value, {attribute: name, **extra}))
        return observations

    return observe


def instrument(
    *,
    meter_provider: MeterProvider | None = None,
    quotas: Mapping[str, Quota | ThreadQuota] | None = None,
    factories: Mapping[str, EngineFactory[Any]] | None = None,
    registries: Mapping[str, Registry] | None = None,
    hubs: Mapping[str, EmitterHub] | None = None,
) -> None:
    """
    Observe the stats of quotas, engine factories, registries and hubs
    through OpenTelemetry metrics.

    Each object is given by a name, which becomes the attribute
    ``usercontext.<family>.name`` of its measurements (``usercontext.quota.name``,
    ``usercontext.factory.name``, ``usercontext.registry.name``,
    ``usercontext.hub.name``). The instruments are observable: when a metric
    reader collects, they read each object's ``stats()`` once per
    instrument, so nothing is measured on the request path. They are named
    ``usercontext.<family>.<field>`` after the field of the stats they read,
    with OpenTelemetry's kinds and units (see the how-to's table):
    asynchronous up-down counters for what is held or waiting right now
    (``usercontext.quota.in_use``, unit ``{lease}``), gauges for peaks and
    limits, and counters for what only grows (``usercontext.quota.rejected``,
    ``usercontext.factory.close_errors``, ``usercontext.hub.dropped`` with a
    ``usercontext.hub.drop_reason`` attribute, ...).

    A reader may collect from its own thread, as the SDK's periodic reader
    does, while requests run: a snapshot that meets a table being changed is
    taken again.

    The meter is ``usercontext``, at the library's version. The objects are
    held for the meter provider's life: call it once per object, at startup.

    Args:
        meter_provider: Where to register the instruments; by default the
            global meter provider.
        quotas: Quotas (`usercontext.LocalQuota`, `usercontext.ThreadQuota`,
            `usercontext.redis.RedisQuota` or any `usercontext.Quota`) by name.
        factories: `usercontext.EngineFactory` objects by name; their
            ``waiting``, ``rejected`` and ``timed_out`` are those of their
            quotas. A factory with an admission policy reports it too, for
            each part it has: ``rate_admitted`` and ``rate_limited``,
            ``shed`` (by ``usercontext.factory.shed_reason``) and
            ``shed_peak_waiting``, ``breaker_state`` (1 for the state named
            by ``usercontext.factory.breaker_state``, 0 for the others),
            ``breaker_open``, ``breaker_opened``, ``breaker_refused``,
            ``breaker_probes`` and ``breaker_failures``.
        registries: `usercontext.Registry` objects by name; their scopes are
            counted too.
        hubs: `usercontext.EmitterHub` objects by name.

    Raises:
        TypeError: If an argument is not a mapping, or holds an object of the
            wrong kind.
        ValueError: If a name is not a non-empty str, or nothing is given to
            observe.

    .. versionadded:: 0.1.0
    """
    families = {
        "quota": _checked("quotas", quotas or {}, (Quota, ThreadQuota), "a quota"),
        "factory": _checked("factories", factories or {}, (EngineFactory,), "an EngineFactory"),
        "registry": _checked("registries", registries or {}, (Registry,), "a Registry"),
        "hub": _checked("hubs", hubs or {}, (EmitterHub,), "an EmitterHub"),
    }
    if not any(families.values()):
        msg = (
            "instrument() was given nothing to observe. Pass quotas=, factories=, "
            "registries= or hubs=, each a mapping from a name to an object."
        )
        raise ValueError(msg)
    provider = get_meter_provider() if meter_provider is None else meter_provider
    meter = provider.get_meter("usercontext", version("usercontext"))
    create = {
        "counter": meter.create_observable_counter,
        "updowncounter": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for family, objects in families.items():
        if not objects:
            continue
        attribute = f"usercontext.{family}.name"
        for field, kind, unit, description, read in METRICS[family]:
            create[kind](
                f"usercontext.{family}.{field}",
                callbacks=[_callback(objects, attribute, read)],
                unit=unit,
                description=description,
            )
