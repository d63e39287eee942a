"""The documents cite tests as their proof (``tests/test_x.py::test_y``, or ``::test_z`` after
one in the same table cell): every cited test must exist, or a guarantee is backed by nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"(?:(test_\w+)\.py)?::(test_\w+)")


def _defined() -> dict[str, set[str]]:
    return {
        path.stem: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
        for path in (ROOT / "tests").glob("test_*.py")
    }


def test_every_test_the_documents_cite_exists() -> None:
    defined = _defined()
    missing = []
    for doc in DOCS:
        module = None
        for line in doc.read_text().splitlines():
            for found in CITED.finditer(line):
                module = found.group(1) or module  # "::name" belongs to the last module named
                if module is None or found.group(2) not in defined.get(module, set()):
                    missing.append(f"{doc.name}: {module}.py::{found.group(2)}")
    assert not missing, "\n".join(missing)
    assert sum(len(names) for names in defined.values()) > 300  # the tests were found at all
