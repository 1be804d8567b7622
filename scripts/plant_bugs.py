"""Plant known bugs, one at a time, in a scratch copy of the repository and check that the tests catch each.

    python scripts/plant_bugs.py                       # every mutation
    python scripts/plant_bugs.py grad-norm-tp-twice    # the ones named
    python scripts/plant_bugs.py --list

For each mutation: copy the working tree (tracked files and untracked ones git does not ignore,
as they are on disk) to a temporary directory, replace the mutation's text (which must occur
exactly once) and run each of its pytest node ids there with this Python. Each must fail:
CAUGHT when it does; MISSED when it passes, NOT RUN when it is skipped, ERROR when pytest cannot
run it (or the text is not there once). The exit status is 1 unless every mutation was CAUGHT.
docs/testing.md lists the mutations; every new feature adds one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS, Mutation


class MutationError(ValueError):
    pass


def working_tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore, relative to `repo`, as far as they exist."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout
    names = sorted({os.fsdecode(name) for name in listed.split(b"\0") if name})
    return [name for name in names if (repo / name).is_file()]  # a tracked file deleted on disk is gone


def copy_working_tree(repo: Path, dst: Path) -> None:
    for name in working_tree_files(repo):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, dst / name)


def plant(mutation: Mutation, root: Path) -> None:
    """Apply `mutation` to the tree at `root`, refusing unless its text occurs exactly once."""
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.find)
    if count != 1:
        raise MutationError(f"{mutation.id}: the text to replace occurs {count} times in {mutation.file}, "
                            f"not once: {mutation.find!r}")
    path.write_text(text.replace(mutation.find, mutation.replace))


def run_test(node: str, root: Path, timeout: float) -> tuple[str, str]:
    """(verdict, pytest's output) of running the test `node` in the tree at `root`."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", node]
    try:
        result = subprocess.run(command, cwd=root, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "ERROR", f"{node}: pytest ran past {timeout:.0f} s"
    output = result.stdout + result.stderr
    if result.returncode == 1:
        return "CAUGHT", output
    if result.returncode != 0:
        return "ERROR", output
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return ("MISSED" if " passed" in f" {summary}" else "NOT RUN"), output


def check(mutation: Mutation, repo: Path, timeout: float) -> list[tuple[str, str]]:
    """(verdict, pytest's output) of each of `mutation`'s tests, run with it planted in a scratch copy of `repo`."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{mutation.id}-") as scratch:
        root = Path(scratch)
        copy_working_tree(repo, root)
        plant(mutation, root)
        return [run_test(node, root, timeout) for node in mutation.tests]


def overall(verdicts: list[str]) -> str:
    """CAUGHT only when every test failed; otherwise the worst of the others."""
    return next((v for v in ("ERROR", "MISSED", "NOT RUN") if v in verdicts), "CAUGHT")


def report(mutation: Mutation, timeout: float, verbose: bool) -> str:
    """Plant `mutation` in a scratch copy of this repository; print its verdict and each test's; return it."""
    try:
        results = check(mutation, REPO, timeout)
    except MutationError as err:
        print(f"ERROR    {err}", flush=True)
        return "ERROR"
    verdict = overall([v for v, _ in results])
    print(f"{verdict:<8} {mutation.id}", flush=True)
    for node, (node_verdict, output) in zip(mutation.tests, results):
        print(f"    {node_verdict:<8} {node}", flush=True)
        if verbose or node_verdict in ("ERROR", "NOT RUN"):
            print(output[-3000:], flush=True)
    return verdict


def select(ids: list[str]) -> list[Mutation]:
    by_id = {m.id: m for m in MUTATIONS}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; known: {list(by_id)}")
    return [by_id[i] for i in ids] if ids else MUTATIONS


def markdown_table(mutations: list[Mutation]) -> str:
    rows = ["| id | the bug | the tests that must fail |", "|---|---|---|"]
    rows += [f"| `{m.id}` | {m.description} | " + "<br>".join(f"`{t.removeprefix('tests/')}`" for t in m.tests) + " |"
             for m in mutations]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="mutations to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--markdown", action="store_true", help="print docs/testing.md's table and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each test run may take")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of each")
    args = parser.parse_args(argv)
    mutations = select(args.ids)
    if args.list:
        for m in mutations:
            print(f"{m.id:<34} {m.file:<34} {m.description}")
        return 0
    if args.markdown:
        print(markdown_table(mutations))
        return 0
    verdicts = [report(m, args.timeout, args.verbose) for m in mutations]
    return 0 if all(v == "CAUGHT" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
