"""
Benchmarks of what signing costs a context crossing between services:
``to_headers`` then ``from_headers``, with and without a signer and verifier.

Every call runs ``BATCH`` (20) round trips of one realistic context (a child
with a connection id and two metadata entries): divide the times that
pytest-benchmark prints by 20 for one round trip. Small batches, many rounds:
on a shared machine the least disturbed of many short batches is the figure.
`test_signing_interleaved` times both in turn within every call and stores the
ratio of their best batches in ``extra_info``: the figure to read on a busy
machine. benchmarks/README.md gives the target.
"""

from __future__ import annotations

import functools
import hmac
import time
import timeit

from typing import Any

import pytest

from usercontext import HeaderSigner, HeaderVerifier, UserContext


BATCH = 20
ROUNDS = 500
KEY = bytes(range(32))
CTX = UserContext(
    user_id="user-42", thread_id="thread-7", run_id="run-1", connection_id="ws-3"
).child(metadata={"plan": "pro", "tenant": "acme"})
SIGNER = HeaderSigner(KEY, key_id="orders-2026-12", ttl=30)
VERIFIER = HeaderVerifier({"orders-2026-12": KEY})


def _batch(stmt: str, **names: Any) -> functools.partial[float]:
    """
    Return a function that runs *stmt* ``BATCH`` times with *names* as its globals.
    """
    return functools.partial(timeit.Timer(stmt, globals=names).timeit, BATCH)


def _plain() -> functools.partial[float]:
    return _batch("from_headers(ctx.to_headers())", ctx=CTX, from_headers=UserContext.from_headers)


def _signed() -> functools.partial[float]:
    return _batch(
        "from_headers(ctx.to_headers(signer=signer), verifier=verifier)",
        ctx=CTX,
        from_headers=UserContext.from_headers,
        signer=SIGNER,
        verifier=VERIFIER,
    )


@pytest.mark.benchmark(group="signing")
def test_round_trip(benchmark):
    """
    Benchmark ``UserContext.from_headers(ctx.to_headers())``: the floor of
    the signed round trip.
    """
    assert UserContext.from_headers(CTX.to_headers()) == CTX
    benchmark.extra_info["ops_per_call"] = BATCH
    benchmark(_plain())


@pytest.mark.benchmark(group="signing")
def test_round_trip_signed(benchmark):
    """
    Benchmark the same round trip signed by a `HeaderSigner` and checked by a
    `HeaderVerifier`.

    Target: at most 1.7x `test_round_trip` (see `test_signing_interleaved`).
    """
    assert UserContext.from_headers(CTX.to_headers(signer=SIGNER), verifier=VERIFIER) == CTX
    benchmark.extra_info["ops_per_call"] = BATCH
    benchmark(_signed())


@pytest.mark.benchmark(group="signing")
def test_hmac_floor(benchmark):
    """
    Benchmark two bare ``hmac.digest`` calls (SHA-256) over a message of the
    size signing covers: what any HMAC signing must add to a round trip.
    """
    headers = CTX.to_headers()
    message = b"".join(f"{k}{v}".encode() for k, v in sorted(headers.items()))
    benchmark.extra_info["ops_per_call"] = BATCH
    benchmark(
        _batch(
            "digest(key, m, 'sha256'); digest(key, m, 'sha256')",
            digest=hmac.digest,
            key=KEY,
            m=message,
        )
    )


@pytest.mark.benchmark(group="signing, interleaved")
def test_signing_interleaved(benchmark):
    """
    The unsigned and the signed round trip timed in turn within every call:
    the ratio of their best batches, and the added nanoseconds per round
    trip beside those of two bare HMACs, are in ``extra_info``.

    Target: ``ratio`` <= 1.7.
    """
    headers = CTX.to_headers()
    message = b"".join(f"{k}{v}".encode() for k, v in sorted(headers.items()))
    runs = {
        "plain": _plain(),
        "signed": _signed(),
        "hmac": _batch(
            "digest(key, m, 'sha256'); digest(key, m, 'sha256')",
            digest=hmac.digest,
            key=KEY,
            m=message,
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())

    def call() -> None:
        order.reverse()  # each goes first in turn
        for name, run in order:
            started = time.perf_counter_ns()
            run()
            times[name].append((time.perf_counter_ns() - started) / BATCH)

    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=10)
    best = {name: min(ts) for name, ts in times.items()}
    benchmark.extra_info.update(
        {
            "plain_ns": best["plain"],
            "signed_ns": best["signed"],
            "added_ns": best["signed"] - best["plain"],
            "two_hmacs_ns": best["hmac"],
            "ratio": best["signed"] / best["plain"],
        }
    )
