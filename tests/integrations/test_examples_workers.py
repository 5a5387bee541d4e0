"""
The tests of the agent service on several workers sharing one Redis
(``docs/examples/agent_service/test_agent_service_workers.py``), run as part of
the suite the way ``test_examples.py`` runs the example's other tests.
"""

from __future__ import annotations

from test_examples import EXAMPLES, _import_tests


globals().update(_import_tests(EXAMPLES / "agent_service", "test_agent_service_workers"))
