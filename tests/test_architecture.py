"""The package's shape, held by tests: no import cycle; storage backends and the codec's
open kept to the vault, storage and the composition root; a run that writes nowhere
outside its temporary directories. Each check is also shown to catch what it is for.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import platformdirs
import pytest

from custodes.devtools.boundaries import Violation, check_boundaries
from custodes.devtools.imports import describe_cycle, find_cycles, import_graph, main

SOURCE = Path(__file__).resolve().parents[1] / "src" / "custodes"


def assert_no_import_cycle(root: Path) -> None:
    graph = import_graph(root)
    cycles = find_cycles(graph)
    lines = [f"{', '.join(cycle)}: {'; '.join(describe_cycle(graph, cycle))}" for cycle in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def assert_within_boundaries(root: Path) -> None:
    violations = check_boundaries(root)
    assert not violations, "outside the vault's boundary:\n" + "\n".join(map(str, violations))


def plant(root: Path, files: dict[str, str]) -> Path:
    """A fake package at root, its files given by path relative to it."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


# -- import cycles ----------------------------------------------------------------


def test_the_package_has_no_import_cycle() -> None:
    assert_no_import_cycle(SOURCE)


CYCLES = {
    "__init__.py": "",
    "a.py": "from custodes import b\n",
    "b.py": """\
        def later():
            from custodes.a import thing
        """,
    "web/__init__.py": "from custodes.web import app\n",
    "web/app.py": """\
        import importlib

        def routers():
            return importlib.import_module("custodes.web.api")
        """,
    "web/api.py": "from custodes.web.app import create_app\n",
    # Only a type checker follows this one back: no cycle.
    "typed.py": """\
        from typing import TYPE_CHECKING

        import custodes.hinted

        if TYPE_CHECKING:
            from custodes.hinted import Hint
        """,
    "hinted.py": """\
        import typing

        if typing.TYPE_CHECKING:
            from custodes import typed
        """,
}


def test_a_planted_import_cycle_fails_the_cycle_test(tmp_path: Path) -> None:
    package = plant(tmp_path / "src" / "custodes", CYCLES)
    graph = import_graph(package)
    assert find_cycles(graph) == [
        ["custodes.a", "custodes.b"],
        ["custodes.web.api", "custodes.web.app"],
    ]
    assert graph.edges(type_only=True)["custodes.hinted"] == {"custodes.typed"}
    with pytest.raises(AssertionError, match=r"custodes\.a, custodes\.b"):
        assert_no_import_cycle(package)
    # The command says as much, and fails; run outside the fake package's parent, lest
    # `python -m` import the fake in place of custodes.
    command = [sys.executable, "-m", "custodes.devtools.imports", str(package)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert run.returncode == 1, run.stderr
    assert "custodes.web.api, custodes.web.app" in run.stdout
    assert "custodes.web.app -> custodes.web.api  (line 4)" in run.stdout
    assert "if TYPE_CHECKING: custodes.typed" in run.stdout


def test_a_package_without_a_cycle_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acyclic = {k: v for k, v in CYCLES.items() if not k.startswith(("b.py", "web/api"))}
    package = plant(tmp_path / "custodes", acyclic)
    assert_no_import_cycle(package)
    assert main([str(package)]) == 0
    assert "no import cycle" in capsys.readouterr().out


# -- the vault's boundary ---------------------------------------------------------


def test_only_the_vault_storage_and_bootstrap_touch_backends_or_open_records() -> None:
    assert_within_boundaries(SOURCE)


BOUNDARY = {
    "__init__.py": "",
    "storage/__init__.py": """\
        from custodes.storage.base import Storage
        from custodes.storage.sqlite import SQLiteStorage
        """,
    "storage/base.py": "class Storage: ...\n",
    "storage/sqlite.py": "class SQLiteStorage: ...\n",
    "storage/memory.py": "class MemoryStorage: ...\n",
    "codec.py": "class RecordCodec: ...\n",
    # Inside the boundary: the vault opens records, bootstrap picks the backend.
    "vault.py": """\
        from custodes.storage.memory import MemoryStorage

        class Vault:
            def read(self, stored):
                return self._codec.open(stored)
        """,
    "bootstrap.py": "from custodes.storage import SQLiteStorage\n",
    # Outside it, what is allowed: sealing, the Protocol, files opened by path.
    "ingest/pipeline.py": """\
        from custodes.codec import RecordCodec
        from custodes.storage import Storage

        def work(schema, keys, path, record):
            codec = RecordCodec(schema, keys)
            with path.open() as f:
                f.read()
            return codec.seal(record)
        """,
}


def test_a_planted_backend_import_and_codec_open_fail_the_boundary_test(tmp_path: Path) -> None:
    package = plant(
        tmp_path / "custodes",
        {
            **BOUNDARY,
            "doctor.py": """\
                def check(path):
                    from custodes.storage import SQLiteStorage
                    return SQLiteStorage(path)
                """,
            "audit/report.py": """\
                def build(vault, stored):
                    return vault.codec.open(stored)
                """,
        },
    )
    assert check_boundaries(package) == [
        Violation("custodes.audit.report", 2, "opens a record with the codec"),
        Violation("custodes.doctor", 2, "imports SQLiteStorage from custodes.storage"),
    ]
    with pytest.raises(AssertionError, match=r"custodes\.doctor:2: imports SQLiteStorage"):
        assert_within_boundaries(package)


def test_a_backup_adapter_reaches_its_own_backend_and_nothing_else(tmp_path: Path) -> None:
    package = plant(
        tmp_path / "custodes",
        {
            **BOUNDARY,
            "backup/__init__.py": "",
            "backup/postgres.py": """\
                from custodes.storage.postgres import connect_pinned
                from custodes.storage.sqlite import SQLiteStorage

                def copy(vault, stored):
                    return vault.codec.open(stored)
                """,
        },
    )
    assert check_boundaries(package) == [
        Violation("custodes.backup.postgres", 2, "imports custodes.storage.sqlite.SQLiteStorage"),
        Violation("custodes.backup.postgres", 5, "opens a record with the codec"),
    ]


@pytest.mark.parametrize(
    "crossing",
    [
        "import custodes.storage.sqlite",
        "from custodes.storage import memory",
        "from custodes.storage.postgres import PostgresStorage",
        "from .storage import MemoryStorage",
        "importlib.import_module('custodes.storage.sqlite')",
        "from custodes import storage; storage.SQLiteStorage",
        "codec.open(stored)",
        "self.codec.open(stored)",
        "self._codec.open(stored)",
        "vault.codec.open(stored)",
        "from custodes.codec import RecordCodec as C; opener = C(s, k); opener.open(stored)",
        "from custodes.codec import RecordCodec; RecordCodec(s, k).open(stored)",
    ],
)
def test_every_way_across_the_boundary_is_caught(tmp_path: Path, crossing: str) -> None:
    statements = "\n".join(f"    {part.strip()}" for part in crossing.split(";"))
    package = plant(
        tmp_path / "custodes",
        {
            **BOUNDARY,
            "cli.py": f"import importlib\n\ndef verb(self, vault, stored, s, k):\n{statements}\n",
        },
    )
    assert [v.module for v in check_boundaries(package)] == ["custodes.cli"]


# -- a run that writes nowhere else -----------------------------------------------


def test_user_files_of_the_run_land_in_its_own_home(private_home: Path) -> None:
    assert platformdirs.user_config_path("custodes").is_relative_to(private_home)
    command = [
        sys.executable,
        "-c",
        "import platformdirs; print(platformdirs.user_config_path('custodes'))",
    ]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    assert Path(run.stdout.strip()).is_relative_to(private_home)
