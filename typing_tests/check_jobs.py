# pyright: reportUnnecessaryTypeIgnoreComment=true
"""
Types of attach/detach, the job pair and the Celery adapter, checked by mypy and pyright.
"""

from __future__ import annotations

import celery

from typing_extensions import assert_type

import usercontext as uc
import usercontext.celery


ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")

token = uc.attach(ctx)
assert_type(token, uc.AttachToken)
assert_type(token.ctx, uc.UserContext)
assert_type(uc.detach(token), None)

payload = uc.to_job(ctx)
assert_type(payload, dict[str, str])
assert_type(uc.child_from_job(payload), uc.UserContext)
with uc.bound_from_job(payload) as job_ctx:
    assert_type(job_ctx, uc.UserContext)

app = celery.Celery("jobs")
assert_type(usercontext.celery.install(app, registry=uc.Registry()), None)
assert_type(usercontext.celery.scope(), uc.Scope)

uc.attach("u-42")  # type: ignore[arg-type]
