"""A run never replaces another run's checkpoints, nor newer ones of its own: the probes of issue 21
(a --finetune into the --save it loads from, an older folder loaded into a --save holding newer
ones, --load A --save B where B is another run's) are refused at start-up in one line naming both
checkpoints, leaving --save untouched, unless --overwrite-checkpoints is given."""
import json
import shutil
from pathlib import Path

import pytest

from megadual.training.checkpoint import CheckpointError
from tests.checkpoint_runs import contents, train, train_expecting_error

TRACKER = "latest_checkpointed_iteration.txt"


def run_id(root: Path, iteration: int) -> str:
    return json.loads((root / f"iter_{iteration:07d}" / "megadual_meta.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run A saved iterations 2 and 4 (tracker 4); B holds iteration 6 of another run (A's files,
    its META naming another run: all the refusal reads)."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    train(["--train-iters", "4", "--save", str(a), "--save-interval", "2"])
    shutil.copytree(a / "iter_0000004", b / "iter_0000006")
    meta = b / "iter_0000006" / "megadual_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "run_id": "0ther0run0id"}))
    (b / TRACKER).write_text("6")
    return {"a": a, "b": b}


@pytest.fixture
def copies(runs, tmp_path) -> dict[str, Path]:
    return {name: Path(shutil.copytree(root, tmp_path / name)) for name, root in runs.items()}


def refused(args: list[str], save: Path) -> str:
    before = contents(save)
    message, logged = train_expecting_error(args, CheckpointError)
    assert contents(save) == before and not logged.has("saving checkpoint")
    assert "\n" not in message
    return message


def test_each_run_has_one_id_and_a_resume_keeps_it(copies):
    a = copies["a"]
    assert run_id(a, 2) == run_id(a, 4)
    train(["--train-iters", "6", "--load", str(a), "--save", str(a), "--save-interval", "2"])
    assert run_id(a, 6) == run_id(a, 2) and (a / TRACKER).read_text() == "6"


def test_finetune_into_the_save_it_loads_from_is_refused(copies):
    a = copies["a"]
    args = ["--train-iters", "2", "--load", f"{a}/iter_0000002", "--save", str(a), "--finetune"]
    message = refused(args, a)
    ours = message.split("starts run ")[1].split()[0]
    assert ours != run_id(a, 2)
    assert message == (f"--load {a}/iter_0000002 with --finetune starts run {ours} at iteration 0, and its saves "
                       f"would replace what --save {a} holds: iter_0000002 (run {run_id(a, 2)}), iter_0000004 (run "
                       f"{run_id(a, 4)}); give another --save, or --overwrite-checkpoints to replace them")
    run = train(args + ["--overwrite-checkpoints"])  # asked for: replaced, and said so
    assert run.has("replacing them as --overwrite-checkpoints allows")
    assert (a / TRACKER).read_text() == "2" and run_id(a, 2) not in (ours, run_id(a, 4))  # each start a new run


@pytest.mark.parametrize("load", ["folder", "copy"])
def test_an_older_checkpoint_loaded_into_a_save_holding_newer_ones_is_refused(copies, tmp_path, load):
    a = copies["a"]
    older = f"{a}/iter_0000002"
    if load == "copy":  # a directory holding only the older checkpoint of the same run
        older = str(tmp_path / "older")
        shutil.copytree(a / "iter_0000002", Path(older) / "iter_0000002")
        (Path(older) / TRACKER).write_text("2")
    message = refused(["--train-iters", "6", "--load", older, "--save", str(a)], a)
    assert message.startswith(f"--load {older if load == 'folder' else older + '/iter_0000002'} starts run "
                              f"{run_id(a, 2)} at iteration 2, and its saves would replace what --save {a} holds: "
                              f"iter_0000004 (this run's, newer); give another --save")


def test_load_a_save_b_holding_another_runs_checkpoints_is_refused(copies):
    a, b = copies["a"], copies["b"]
    message = refused(["--train-iters", "6", "--load", str(a), "--save", str(b)], b)
    assert message.startswith(f"--load {a}/iter_0000004 starts run {run_id(a, 4)} at iteration 4, and its saves "
                              f"would replace what --save {b} holds: iter_0000006 (run 0ther0run0id)")
