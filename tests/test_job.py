"""
Tests of the job pair: `to_job` and `bound_from_job` (and `child_from_job`).
"""

from __future__ import annotations

import json

import pytest

import usercontext as uc


class TestJob:
    def test_round_trip_binds_a_child(self, ctx):
        """
        The payload, through JSON as a queue would send it, binds a child:
        same user, thread and run, a new request id, the sender's as parent.
        """
        payload = json.loads(json.dumps(uc.to_job(ctx.evolve(metadata={"plan": "pro"}))))
        with uc.bound_from_job(payload) as job_ctx:
            assert uc.current() is job_ctx
            assert (job_ctx.user_id, job_ctx.thread_id, job_ctx.run_id) == ("u-42", "t-7", "r-1")
            assert job_ctx.request_id != ctx.request_id
            assert job_ctx.parent_request_id == ctx.request_id
            assert job_ctx.depth == 1
            assert job_ctx.metadata == {"plan": "pro"}
        assert uc.current_or_none() is None

    def test_payload_is_text(self, ctx):
        """
        Every key and value of a payload is text, under the header prefix.
        """
        payload = uc.to_job(ctx)
        assert all(isinstance(v, str) for v in payload.values())
        assert all(k.startswith("x-usercontext-") for k in payload)

    def test_refuses_a_non_context(self):
        with pytest.raises(TypeError, match=r"to_job\(\) takes a usercontext\.UserContext"):
            uc.to_job("u-42")  # type: ignore[arg-type]

    def test_refuses_a_non_mapping(self):
        with pytest.raises(TypeError, match=r"must be the dict usercontext.to_job"):
            uc.bound_from_job([("x-usercontext-user-id", "u-42")])

    @pytest.mark.parametrize(
        ("change", "match"),
        [
            ({"x-usercontext-user-id": "u\x01"}, "user_id"),
            ({"x-usercontext-depth": "-1"}, "depth"),
            ({"x-usercontext-admin": "1"}, "not a usercontext header"),
            ({"user": "u-1"}, "key 'user' is not one usercontext.to_job"),
            ({1: "u-1"}, "key 1 is not one"),
        ],
    )
    def test_refuses_a_tampered_payload(self, ctx, change, match):
        """
        A changed value, an unknown key or a key without the prefix is
        refused with InvalidContextError before anything is bound.
        """
        payload = {**uc.to_job(ctx), **change}
        with pytest.raises(uc.InvalidContextError, match=match):
            uc.bound_from_job(payload)
        assert uc.current_or_none() is None

    def test_refuses_a_missing_field(self, ctx):
        payload = uc.to_job(ctx)
        del payload["x-usercontext-user-id"]
        with pytest.raises(uc.InvalidContextError, match=r"user-id is missing"):
            uc.child_from_job(payload)

    def test_refuses_an_oversized_payload(self, ctx):
        """
        Over 8 KiB is refused on both sides.
        """
        big = ctx.evolve(metadata={"blob": "x" * 9000})
        with pytest.raises(uc.InvalidContextError, match=r"over the limit of 8192"):
            uc.to_job(big)
        payload = {**uc.to_job(ctx), "x-usercontext-metadata": json.dumps({"b": "x" * 9000})}
        with pytest.raises(uc.InvalidContextError, match=r"exceed 8192 bytes"):
            uc.bound_from_job(payload)

    def test_binds_under_the_same_user_only(self, ctx, other_ctx):
        """
        A job of another user cannot be bound inside a bound context.
        """
        payload = uc.to_job(other_ctx)
        with uc.bind(ctx), pytest.raises(uc.IsolationError):  # noqa: SIM117
            with uc.bound_from_job(payload):
                pass
