# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of `UserContext`, its derivations and its codec, checked by mypy and pyright.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import assert_type

import usercontext as uc


ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

assert_type(ctx.user_id, str)
assert_type(ctx.thread_id, str)
assert_type(ctx.run_id, str)
assert_type(ctx.request_id, str)
assert_type(ctx.connection_id, str | None)
assert_type(ctx.parent_request_id, str | None)
assert_type(ctx.depth, int)
assert_type(ctx.created_at, float)
assert_type(ctx.metadata, Mapping[str, Any])

assert_type(ctx.child(), uc.UserContext)
assert_type(ctx.child(run_id="r-1.tool"), uc.UserContext)
assert_type(ctx.evolve(run_id="r-2"), uc.UserContext)

assert_type(ctx.to_dict(), dict[str, Any])
assert_type(uc.UserContext.from_dict(ctx.to_dict()), uc.UserContext)
assert_type(ctx.to_headers(), dict[str, str])
assert_type(uc.UserContext.from_headers(ctx.to_headers()), uc.UserContext)
assert_type(uc.UserContext.from_headers([(b"x-usercontext-user-id", b"u-42")]), uc.UserContext)


class TenantContext(uc.UserContext):
    """
    Derivations and decoders of a subclass return the subclass.
    """


tenant = TenantContext(user_id="u-42", thread_id="t-7", run_id="r-1")
assert_type(tenant.child(), TenantContext)
assert_type(tenant.evolve(run_id="r-2"), TenantContext)
assert_type(TenantContext.from_dict(tenant.to_dict()), TenantContext)
assert_type(TenantContext.from_headers(tenant.to_headers()), TenantContext)

# Every field is keyword-only, and ids are str.
uc.UserContext("u-42", "t-7", "r-1")  # type: ignore[call-arg]
uc.UserContext(user_id=42, thread_id="t-7", run_id="r-1")  # type: ignore[arg-type]
uc.UserContext(user_id="u-42", thread_id="t-7")  # type: ignore[call-arg]
ctx.user_id = "u-7"  # type: ignore[misc]

rules = uc.IdRules(max_length=64, placeholders=uc.DEFAULT_PLACEHOLDERS - {"default"})
assert_type(rules.max_length, int)
assert_type(rules.placeholders, frozenset[str])
assert_type(rules.pattern, str | None)
assert_type(uc.configure(id_rules=rules, max_depth=8), None)
uc.configure(rules)  # type: ignore[call-arg]

error = uc.InvalidContextError("message", field="user_id", value=None, reason="is missing")
assert_type(error.field, str)
assert_type(error.value, object)
assert_type(error.reason, str)
