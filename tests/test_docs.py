"""The docs cite tests that exist: every `test_file.py::test_name` (and each `::test_name`
continuing it) in docs/security.md and docs/architecture.md names a file of tests/ and a
top-level test function in it.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# A file with an optional test, or a `::test` alone, continuing the last file named.
CITATION = re.compile(
    r"(?<![\w/.])(?:tests/)?(?P<file>(?:\w+/)*test_\w+\.py)(?:::(?P<name>\w+))?"
    r"|(?<![\w.:])::(?P<continued>\w+)"
)
# Where a new row, list item or paragraph starts, a `::test` no longer continues the last.
NEW_CONTEXT = re.compile(r"\s*(?:\||[-*+] |\d+\. |$)")


@dataclass(frozen=True)
class Citation:
    line: int
    file: str | None  # None: a `::test` with no file named before it in its row
    name: str | None  # None: the file alone is cited


def cited_tests(text: str) -> list[Citation]:
    """Every citation of a test in a Markdown text, in order."""
    found = []
    last_file: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if NEW_CONTEXT.match(line):
            last_file = None
        for match in CITATION.finditer(line):
            if match["file"] is not None:
                last_file = match["file"]
                found.append(Citation(number, last_file, match["name"]))
            else:
                found.append(Citation(number, last_file, match["continued"]))
    return found


@cache
def top_level_functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_bytes(), filename=path.name)
    return frozenset(
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


def broken_citations(text: str, tests: Path = TESTS) -> list[str]:
    """What in a text cites a test file or function that is not there, one line each."""
    broken = []
    for cited in cited_tests(text):
        where = f"line {cited.line}"
        if cited.file is None:
            broken.append(f"{where}: ::{cited.name} follows no test file in its row")
        elif not (tests / cited.file).is_file():
            broken.append(f"{where}: {cited.file} is not a file of tests/")
        elif cited.name is not None and cited.name not in top_level_functions(tests / cited.file):
            broken.append(f"{where}: {cited.file} has no function {cited.name}")
    return broken


def test_every_test_named_in_security_md_exists() -> None:
    text = (REPO / "docs" / "security.md").read_text()
    assert len(cited_tests(text)) > 50  # the parser still finds the table's citations
    assert broken_citations(text) == []


def test_every_test_named_in_architecture_md_exists() -> None:
    assert broken_citations((REPO / "docs" / "architecture.md").read_text()) == []


def test_a_planted_bad_citation_is_reported() -> None:
    text = textwrap.dedent(
        """\
        | # | tests |
        |---|---|
        | 1 | `test_docs.py::cited_tests`, `::test_gone`, `tests/test_docs.py` |
        | 2 | `::broken_citations`, `test_nowhere.py`, `test_docs.py::CITATION` |

        - **an invariant** — held by
          (`test_docs.py::cited_tests`, `::broken_citations`,
          `::test_also_gone`).
        - and `::top_level_functions` starts an item of its own.
        """
    )
    assert broken_citations(text) == [
        "line 3: test_docs.py has no function test_gone",
        "line 4: ::broken_citations follows no test file in its row",
        "line 4: test_nowhere.py is not a file of tests/",
        "line 4: test_docs.py has no function CITATION",
        "line 8: test_docs.py has no function test_also_gone",
        "line 9: ::top_level_functions follows no test file in its row",
    ]
