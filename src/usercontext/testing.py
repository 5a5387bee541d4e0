"""
Helpers for testing code built on usercontext.

`QuotaConformance` is the conformance suite of the `usercontext.Quota`
protocol. This module imports neither pytest nor anything beyond the core's
dependencies; `import usercontext` does not import it.
"""

from __future__ import annotations

from ._quota_conformance import QuotaConformance


__all__ = ["QuotaConformance"]
