"""The documents a user reads point only at files of the repository (issue 18: the README sent
readers to ../shared/DESIGN.md, which a user of the package does not have)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "config.example.toml",
    *sorted((ROOT / "docs").glob("*.md")),
]
# A markdown link's target, or a path in backticks that names a file by a relative path.
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_no_document_names_a_file_outside_the_repository() -> None:
    outside = [
        f"{doc.relative_to(ROOT)}:{n}: {line.strip()}"
        for doc in DOCUMENTS
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if "../shared" in line or "DESIGN.md" in line
    ]
    assert outside == []


def test_every_relative_link_resolves_to_a_file_of_the_repository() -> None:
    links = [
        (doc, target)
        for doc in DOCUMENTS
        for target in _LINK.findall(doc.read_text())
        if "://" not in target
    ]
    assert (ROOT / "docs" / "contract.md", "../config.example.toml") in links
    assert (ROOT / "README.md", "docs/contract.md") in links
    broken = [
        f"{doc.relative_to(ROOT)}: {target}"
        for doc, target in links
        if not (doc.parent / target).resolve().is_file()
        or ROOT.resolve() not in (doc.parent / target).resolve().parents
    ]
    assert broken == []
