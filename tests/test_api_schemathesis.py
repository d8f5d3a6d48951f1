"""Property-based: schemathesis generates requests from /api/v1/schema of a running service and
checks that nothing answers 5xx and every answer matches the document.

Driven through hypothesis directly (one bounded run per operation and generation mode), which
keeps the whole run well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.generation.case import Case

from .apiutil import TOKEN, Api, running_api

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
EXAMPLES = 50


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(Path(tmp_path_factory.mktemp("schemathesis"))) as api:
        yield api


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_keeps_its_schema(service: Api, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/api/v1/schema", headers=AUTH)
    extra = [checks.negative_data_rejection] if mode == GenerationMode.NEGATIVE else []
    tested, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and not operation.definition.raw.get("parameters"):
            continue  # nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: Case) -> None:
            # a negative case that broke the headers (left out the required Authorization)
            # goes as generated: the token added back would make it a valid request, which
            # the service rightly accepts (seen once in a loaded run, with byte_size=0)
            broken = case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER)
            headers = None if broken else AUTH
            case.call_and_validate(base_url=service.url, headers=headers, checks=CHECKS + extra)
            calls.append(case.operation.label)

        run()
        tested.append(operation.label)
    # every operation but the document itself (schemathesis leaves out the schema's own URL)
    assert len(tested) == (9 if mode == GenerationMode.POSITIVE else 5), tested
    assert len(calls) >= len(tested) * 10, len(calls)
