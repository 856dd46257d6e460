"""The API against its own OpenAPI document, with generated requests and a live session:
no request, however odd, gets a 5xx, and every answer matches the documented schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from custodes.policy import Role
from custodes.vault import Vault
from custodes.web import api
from tests.conftest import make_vault
from tests.test_web_api import TestClient, build_app, new_account, session_headers

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, population_file: Path
) -> Iterator[tuple[FastAPI, dict[str, dict[str, str]]]]:
    vault: Vault = make_vault(tmp_path_factory.mktemp("schemathesis"), "memory")
    assert vault.ingest(vault.operator, population_file).rejected == 0
    app = build_app(vault)
    with TestClient(app) as client:
        headers = {
            "official": session_headers(client, vault, new_account(vault, Role.INVESTIGATOR)),
            "auditor": session_headers(client, vault, new_account(vault, Role.AUDITOR)),
        }
    yield app, headers
    vault.close()


def operations(app: FastAPI) -> list[Any]:
    schema = schemathesis.openapi.from_dict(api.openapi_document(app))
    schema.app = app
    found = [result.ok() for result in schema.get_all_operations()]
    # Opening and closing sessions has tests of its own; here a logout would end the run's.
    return [op for op in found if op.path != "/api/v1/session"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx_and_documented_answers(
    served: tuple[FastAPI, dict[str, dict[str, str]]], mode: GenerationMode
) -> None:
    app, headers = served
    ops = operations(app)
    assert len(ops) >= 7
    for operation in ops:
        who = "auditor" if operation.path.startswith("/api/v1/audit") else "official"
        fuzz(operation, mode, headers[who])


def fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()
