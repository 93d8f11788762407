"""Every design document the code cites is in the repository, and every cited section exists in it.

Docstrings and docs cite ``docs/architecture.md §N`` and the method notes ``docs/research/X.md §N``. This scans the
code and docs for such citations (and for the old forms that pointed outside the repository: ``DESIGN §N``, a bare
``research/X.md``) and checks each cited file exists and has a heading numbered with each cited section. Relative
markdown links in the docs and the README must resolve too. Pure text work: nothing of the package is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "operators", "jobs", "benchmarks", "tests", "docs", "configs")
SUFFIXES = {".py", ".md", ".yaml", ".yml"}
SKIP = {Path(__file__).resolve()}

# A repository path of a markdown file, optionally followed by section numbers: "§3", "§3-§5", "§3-4", "§4, §9".
SECTION = r"§\d+(?:\.\d+)*(?:\s*[-–]\s*§?\d+(?:\.\d+)*)?"
CITATION = re.compile(rf"(?<![\w./-])(/?(?:[\w.-]+/)*[\w.-]+\.md)((?:[ \t]*{SECTION})(?:,[ \t]*{SECTION})*)?")
SECTION_NUMBER = re.compile(r"§?(\d+(?:\.\d+)*)")
MD_LINK = re.compile(r"\]\(([\w./#-]+)\)")
# A heading that opens a numbered section: "## §3 Command line", "### §5.4 ...", "## 4. DSSI", "### 1.3 The loss".
HEADING = re.compile(r"^#{1,6}\s+§?(\d+(?:\.\d+)*)\.?\s")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and path.resolve() not in SKIP \
                    and "tests/data" not in path.relative_to(ROOT).as_posix():
                files.append(path)
    return files


def sections(doc: Path) -> set[str]:
    return {m.group(1) for line in doc.read_text(encoding="utf-8").splitlines() if (m := HEADING.match(line))}


def cited_numbers(text: str) -> list[str]:
    """"§3-§5, §9" -> ["3", "5", "9"]: both ends of a range and every single section."""
    return SECTION_NUMBER.findall(text or "")


def problems() -> list[str]:
    found = []
    for path in scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        fenced = False  # inside a markdown code block: no links there
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{rel}:{lineno}"
            if re.search(r"\bDESIGN\b", line):
                found.append(f"{where}: cites DESIGN, which is not in the repository (docs/architecture.md is)")
            if path.suffix == ".md" and line.lstrip().startswith("```"):
                fenced = not fenced
            if path.suffix == ".md" and not fenced:  # relative links resolve from the document's folder
                for target in MD_LINK.findall(line):
                    if re.match(r"^[a-z]+:|^#", target):
                        continue
                    if not (path.parent / target.split("#")[0]).exists():
                        found.append(f"{where}: link to {target}, which does not exist")
                line = MD_LINK.sub("]()", line)
            for m in CITATION.finditer(line):
                cited, numbers = m.group(1), cited_numbers(m.group(2))
                is_doc = cited.startswith("docs/") or "research/" in cited or cited == "DESIGN.md"
                if not is_doc and not numbers:
                    continue  # another file name in passing (OUTPUT/README.md, a repo's README.md ...)
                if "research/" in cited and not cited.startswith("docs/research/"):
                    found.append(f"{where}: cites {cited}; the method notes are docs/research/*.md")
                    continue
                doc = ROOT / cited
                if not doc.is_file():
                    found.append(f"{where}: cites {cited}, which is not in the repository")
                    continue
                have = sections(doc)
                found += [f"{where}: cites {cited} §{n}, which has no heading §{n}" for n in numbers if n not in have]
    return found


def test_cited_documents_and_sections_exist():
    assert problems() == []


def test_the_design_documents_are_there():
    for doc in ("docs/architecture.md", "docs/research/sissi.md", "docs/research/ad.md",
                "docs/research/ecosystem.md"):
        assert (ROOT / doc).is_file(), doc
    assert {str(n) for n in range(1, 11)} <= sections(ROOT / "docs/architecture.md")


def test_the_scanner_catches_what_it_should(tmp_path):
    assert cited_numbers(" §3-§5, §9") == ["3", "5", "9"]
    assert cited_numbers(" §1.3") == ["1.3"]
    hits = [(m.group(1), cited_numbers(m.group(2))) for m in CITATION.finditer(
        "(docs/architecture.md §10) and docs/research/ad.md §3-4, see /work/shared/research/sissi.md §4")]
    assert hits == [("docs/architecture.md", ["10"]), ("docs/research/ad.md", ["3", "4"]),
                    ("/work/shared/research/sissi.md", ["4"])]
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n## §3 Command line\n### §5.4 Lease\n## 4. DSSI\n### 1.3 The loss formula\n")
    assert sections(doc) == {"3", "5.4", "4", "1.3"}
