"""Schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx, and every
response matches the schema (status codes, content types, bodies). Tiny model, in-process ASGI.

Driven through Hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.2.
"""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from test_tenants import add

from blendrag.api.app import create_app
from blendrag.api.tenants import TenantConfig

# Not checked: that every schema-valid body is accepted. A few rules span fields and JSON Schema
# cannot state them (a chat needs a user message with text; document ids unique in a request):
# such bodies are a 422 with a message, by design. Every other default check runs.

MAX_EXAMPLES = 40  # per operation: 6 of the 9 take parameters, so about 240 cases, 1-2 min here
MAX_TOKENS = 8  # decode length is a matter of time, not of correctness: the load test covers it


def capped(case: schemathesis.Case) -> schemathesis.Case:
    """The generated case with at most ``MAX_TOKENS`` to decode, so the run stays bounded."""
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > MAX_TOKENS:
                case.body[field] = MAX_TOKENS
    return case


def fuzz(app, max_examples: int, headers: dict | None = None) -> dict[str, int]:
    """Run every operation of ``app``'s schema; returns the number of cases per operation."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy().map(capped))
        @settings(
            max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def conforms(case: schemathesis.Case) -> None:
            cases[case.operation.label] = cases.get(case.operation.label, 0) + 1
            case.call_and_validate(headers=headers, timeout=60, excluded_checks=[positive_data_acceptance])

        conforms()
    print(f"schemathesis: {sum(cases.values())} cases over {len(cases)} operations: {cases}")
    return cases


def test_api_conforms_to_its_schema(tiny_engine, new_sample_index):
    app = create_app(tiny_engine, new_sample_index("fuzz-index"), model_name="tiny")
    assert len(fuzz(app, MAX_EXAMPLES)) == 9


def test_api_with_api_keys_conforms_to_its_schema(tiny_engine, tmp_path):
    """With keys configured (one namespace): the key is sent, and schemathesis' ``ignored_auth``
    check also sends each request without it and expects a 401."""
    tenants = TenantConfig({"fuzz-key-0001": "fuzz"})
    app = create_app(tiny_engine, tmp_path, model_name="tiny", tenants=tenants)
    auth = {"Authorization": "Bearer fuzz-key-0001"}
    with TestClient(app) as client:  # one document, so that /query and /search have an index
        add(client, auth, [{"id": "fuzz-doc", "text": "The fuzzing harness lives in tests/test_fuzz.py."}])
    assert len(fuzz(app, MAX_EXAMPLES // 4, headers=auth)) == 9
