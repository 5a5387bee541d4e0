# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of signed context headers, checked by mypy and pyright.
"""

from __future__ import annotations

import secrets

from typing_extensions import assert_type

import usercontext as uc


key = secrets.token_bytes(32)
signer = uc.HeaderSigner(key, key_id="2026-12", ttl=30)
verifier = uc.HeaderVerifier({"2026-12": key}, leeway=5, max_ttl=300.0, clock=lambda: 0.0)
ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

headers = ctx.to_headers(signer=signer)
assert_type(headers, dict[str, str])
assert_type(uc.UserContext.from_headers(headers, verifier=verifier), uc.UserContext)
assert_type(uc.to_job(ctx, signer=signer), dict[str, str])
assert_type(uc.child_from_job(headers, verifier=verifier), uc.UserContext)
with uc.bound_from_job(headers, verifier=verifier) as job_ctx:
    assert_type(job_ctx, uc.UserContext)

error = uc.InvalidSignatureError("...", field="signature", value=None, reason="missing")
assert_type(error.reason, str)

uc.HeaderSigner("not bytes", key_id="k")  # type: ignore[arg-type]
uc.HeaderVerifier({"k": key}, leeway="5")  # type: ignore[arg-type]
ctx.to_headers(signer=verifier)  # type: ignore[arg-type]
uc.UserContext.from_headers(headers, verifier=signer)  # type: ignore[arg-type]
