"""--load resolves to a checkpoint, or to a fresh start that is logged, or is refused naming the paths:
a typo in --load never trains from scratch over real checkpoints."""
import pytest

from megadual.training.checkpoint import CheckpointError
from tests.checkpoint_runs import contents, train, train_expecting_error


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """Checkpoints of iterations 2 and 4 of a 6-iteration run; the tracker names 4."""
    root = tmp_path_factory.mktemp("saved")
    train(["--train-iters", "6", "--save", str(root), "--save-interval", "2", "--exit-interval", "4"])
    return str(root)


def refused_cases(saved: str, tmp_path) -> dict[str, tuple[list[str], str]]:
    typo, empty, a_file, other = tmp_path / "typo", tmp_path / "empty", tmp_path / "a_file", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    a_file.write_text("")
    return {
        "typo, --save has checkpoints": (["--load", str(typo), "--save", saved],
                                         (f"--load {typo} does not exist, but --save {saved} holds checkpoints "
                                          f"(the tracker names iteration 4)")),
        "no --load, --save has checkpoints": (["--save", saved],
                                              f"--load was not given, but --save {saved} holds checkpoints"),
        "missing": (["--load", str(typo)], f"--load {typo} does not exist"),
        "a file": (["--load", str(a_file)], f"--load {a_file} is a file"),
        "no checkpoint in it": (["--load", str(other)], f"--load {other} holds no checkpoint"),
        "finetune from nothing": (["--load", str(empty), "--finetune"],
                                  f"--finetune needs a checkpoint, but --load {empty} is empty"),
    }


@pytest.mark.parametrize("case", ["typo, --save has checkpoints", "no --load, --save has checkpoints", "missing",
                                  "a file", "no checkpoint in it", "finetune from nothing"])
def test_a_load_that_cannot_be_meant_is_refused(saved, tmp_path, case):
    args, expected = refused_cases(saved, tmp_path)[case]
    before = contents(saved)
    message, _ = train_expecting_error(["--train-iters", "2"] + args, CheckpointError)
    assert expected in message and "\n" not in message
    assert contents(saved) == before


@pytest.mark.parametrize("where", ["empty directory", "--save, not there yet"])
def test_nothing_to_load_starts_from_scratch_and_says_so(tmp_path, where):
    load = tmp_path / "checkpoints"
    args = ["--load", str(load)]
    if where == "empty directory":
        load.mkdir()
    else:
        args += ["--save", str(load)]  # the first launch of a job that always passes --load and --save
    run = train(["--train-iters", "2"] + args)
    assert run.has(f"--load {load} is empty: starting from scratch at iteration 0")
    assert run.result.final_state.iteration == 2


def test_load_naming_an_iteration_folder_loads_that_folder(saved):
    run = train(["--train-iters", "6", "--load", f"{saved}/iter_0000002"])
    assert run.has(f"loading checkpoint from {saved}/iter_0000002 at iteration 2")
    assert len(run.result.losses) == 4


def test_train_iters_at_or_below_the_checkpoint_exits_writing_nothing(saved):
    before = contents(saved)
    for iters in (4, 3):
        run = train(["--train-iters", str(iters), "--load", saved, "--save", saved])
        assert run.has(f"nothing to train: --train-iters {iters} is at or below the iteration of "
                       f"{saved}/iter_0000004 (4); no checkpoint written")
        assert run.result.losses == [] and run.result.final_state.iteration == 4
    assert contents(saved) == before
