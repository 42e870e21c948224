"""The docs stay true: every repository file they cite exists, every test they cite exists,
and the command reference is the one the code generates."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
# a path into one of the project's own folders, optionally ::test_name
CITED = re.compile(r"(?<![\w/.])((?:unsafe_experts|cli|tasks|tracking|comparison|flows|schemas|tests|bench|docs)/[\w./-]*\w)"
                   r"(?:::(\w+))?")
LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)")


def cited(doc: Path):
    text = doc.read_text()
    for match in CITED.finditer(text):
        yield match[1], match[2]
    for match in LINK.finditer(text):
        yield str((doc.parent / match[1]).resolve().relative_to(ROOT)), None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_and_test_exists(doc):
    missing = []
    for path, test in cited(doc):
        target = ROOT / path
        if not target.exists() and not target.with_suffix(".py").exists():
            missing.append(path)
        elif test and f"def {test}(" not in target.read_text():
            missing.append(f"{path}::{test}")
    assert missing == []


def test_the_command_reference_is_current():
    from cli.reference import reference

    assert (ROOT / "docs" / "cli.md").read_text() == reference(), \
        "regenerate it: python -m cli.reference > docs/cli.md"


def test_the_module_map_is_current_and_every_module_has_a_docstring():
    import importlib.util

    spec = importlib.util.spec_from_file_location("module_map", ROOT / "scripts" / "module_map.py")
    module_map = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module_map)
    assert module_map.missing_docstrings() == []
    assert (ROOT / "docs" / "modules.md").read_text() == module_map.module_map(), \
        "regenerate it: python scripts/module_map.py > docs/modules.md"
