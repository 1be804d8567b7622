"""A run stopped at a checkpoint and resumed trains exactly like one that never stopped."""
import json
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from megadual.arguments import parse_args
from megadual.training.checkpoint import CheckpointError, iteration_dir
from megadual.training.checkpoint.integrity import checksums, write_manifest
from megadual.training.checkpoint.layout import MANIFEST
from megadual.training.loop import pretrain
from tests.helpers import TINY_MOE, single_process_group


def run(args):
    with single_process_group() as device:
        return pretrain(parse_args(TINY_MOE + args), device, log=lambda line: None)


DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def test_resumed_losses_equal_uninterrupted(tmp_path):
    """With dropout: its masks follow the samples, so the resumed steps drop what the straight run did."""
    straight = run(DROPOUT + ["--train-iters", "6"]).losses
    first = run(DROPOUT + ["--train-iters", "6", "--save", str(tmp_path), "--save-interval", "3",
                           "--exit-interval", "3"])
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    resumed = run(DROPOUT + ["--train-iters", "6", "--load", str(tmp_path), "--save", str(tmp_path)])
    assert first.losses == straight[:3]
    assert resumed.losses == straight[3:]  # bit-for-bit on CPU
    assert resumed.final_state.consumed_samples == 6 * 8


def test_checkpoint_with_rng_states_of_older_versions_loads(tmp_path):
    """Older checkpoints also hold each rank's RNG state (`rng_rank<r>`); it is not read."""
    run(["--train-iters", "2", "--save", str(tmp_path)])
    path = tmp_path / "iter_0000002"
    state = tmp_path / "state.pt"
    dcp_to_torch_save(path, state)
    with_rng = {**torch.load(state, weights_only=False), "rng_rank0": {"torch": torch.get_rng_state()}}
    torch.save(with_rng, state)
    for shard in [*path.glob("*.distcp"), path / ".metadata"]:
        shard.unlink()
    torch_save_to_dcp(state, path)
    files = sorted(name for name in os.listdir(path) if name != MANIFEST)
    write_manifest(str(path), checksums(str(path), files))  # the rewritten files checksummed anew
    resumed = run(["--train-iters", "3", "--load", str(tmp_path)])
    assert resumed.losses == run(["--train-iters", "3"]).losses[2:]


def test_tracker_only_moves_after_complete_save(tmp_path):
    run(["--train-iters", "2", "--save", str(tmp_path), "--save-interval", "2"])
    # A half-written later checkpoint (no .metadata, tracker untouched) is ignored.
    os.makedirs(iteration_dir(str(tmp_path), 4))
    state = run(["--train-iters", "3", "--load", str(tmp_path)]).final_state
    assert state.iteration == 3 and state.consumed_samples == 3 * 8


def test_mismatched_model_config_lists_differences(tmp_path):
    run(["--train-iters", "2", "--save", str(tmp_path)])
    with pytest.raises(CheckpointError) as err:
        run(["--train-iters", "2", "--load", str(tmp_path), "--hidden-size", "32"])
    assert "--hidden-size: checkpoint has 64, this run has 32" in str(err.value)


def test_finetune_starts_from_iteration_zero_with_loaded_weights(tmp_path):
    run(["--train-iters", "2", "--save", str(tmp_path)])
    meta = json.loads((tmp_path / "iter_0000002" / "megadual_meta.json").read_text())
    assert meta["train_state"]["iteration"] == 2
    fresh = run(["--train-iters", "1", "--lr-warmup-iters", "0"]).losses
    tuned = run(["--train-iters", "1", "--lr-warmup-iters", "0", "--load", str(tmp_path), "--finetune"])
    assert tuned.final_state.iteration == 1
    assert tuned.losses[0] < fresh[0]  # starts from the trained weights, not from scratch
