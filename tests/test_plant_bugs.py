"""scripts/plant_bugs.py: its mutations still fit today's code, and it tells a caught bug from a missed one.

The mutations themselves are not run here (each runs multi-process tests); see docs/testing.md.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plant_bugs", REPO / "scripts" / "plant_bugs.py")
plant_bugs = sys.modules["plant_bugs"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(plant_bugs)


@pytest.mark.parametrize("mutation", plant_bugs.MUTATIONS, ids=lambda m: m.id)
def test_mutation_text_occurs_once_and_its_tests_exist(mutation):
    assert (REPO / mutation.file).read_text().count(mutation.find) == 1, \
        f"{mutation.file} moved on: update {mutation.id} in scripts/plant_bugs.py"
    for node in mutation.tests:
        assert (REPO / node.split("::")[0]).is_file(), node
        assert f"def {node.split('::')[1].split('[')[0]}(" in (REPO / node.split("::")[0]).read_text(), node


def test_mutation_ids_are_unique():
    ids = [m.id for m in plant_bugs.MUTATIONS]
    assert len(ids) == len(set(ids))


def mutation(find: str, replace: str):
    return plant_bugs.Mutation("m", "pkg.py", find, replace, ("test_pkg.py",), "")


@pytest.mark.parametrize("text", ["ANSWER = 41\n", "ANSWER = 42\nANSWER = 42\n"], ids=["absent", "twice"])
def test_plant_refuses_text_not_found_exactly_once(tmp_path, text):
    (tmp_path / "pkg.py").write_text(text)
    with pytest.raises(plant_bugs.MutationError, match=f"occurs {text.count('ANSWER = 42')} times"):
        plant_bugs.plant(mutation("ANSWER = 42", "ANSWER = 0"), tmp_path)
    assert (tmp_path / "pkg.py").read_text() == text


@pytest.fixture
def tiny_repo(tmp_path):
    """A git repository with one module, one test of it, and an ignored file."""
    (tmp_path / "pkg.py").write_text("ANSWER = 42  # the answer\n")
    (tmp_path / "test_pkg.py").write_text("from pkg import ANSWER\n\n\ndef test_answer():\n    assert ANSWER == 42\n")
    (tmp_path / ".gitignore").write_text("ignored.txt\n")
    (tmp_path / "ignored.txt").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "pkg.py", ".gitignore"], cwd=tmp_path, check=True)
    return tmp_path


def test_copies_tracked_and_untracked_files_but_not_ignored_ones(tiny_repo):
    assert plant_bugs.working_tree_files(tiny_repo) == [".gitignore", "pkg.py", "test_pkg.py"]


def test_reports_caught_and_missed(tiny_repo):
    caught = mutation("ANSWER = 42", "ANSWER = 41")
    missed = mutation("# the answer", "# a comment")
    assert [v for v, _ in plant_bugs.check(caught, tiny_repo, timeout=60)] == ["CAUGHT"]
    assert [v for v, _ in plant_bugs.check(missed, tiny_repo, timeout=60)] == ["MISSED"]
    assert (tiny_repo / "pkg.py").read_text() == "ANSWER = 42  # the answer\n"  # planted in a copy only


def test_docs_table_lists_every_mutation():
    doc = (REPO / "docs" / "testing.md").read_text()
    start, end = doc.index("<!-- mutations:begin"), doc.index("<!-- mutations:end -->")
    table = doc[doc.index("\n", start) + 1:end].strip()
    assert table == plant_bugs.markdown_table(plant_bugs.MUTATIONS), \
        "docs/testing.md's table is stale: python scripts/plant_bugs.py --markdown"
