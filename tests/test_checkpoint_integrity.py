"""Every checkpoint file is checksummed: a corrupt, truncated or missing file is named in one line,
and --load of a directory falls back to the newest checkpoint that verifies."""
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megadual.training.checkpoint import CheckpointError
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.integrity import verify
from tests.checkpoint_runs import SMALL, train, train_expecting_error
from tests.helpers import single_process_group

ROOT = Path(__file__).resolve().parents[1]
SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Checkpoints of iterations 2 and 4 of a 6-iteration run; the tracker names 4."""
    root = tmp_path_factory.mktemp("pristine")
    train(["--train-iters", "6", "--save", str(root), "--save-interval", "2", "--exit-interval", "4"])
    return root


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    """A copy of `pristine` to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "saved"))


def test_every_flipped_run_of_bytes_is_found(saved):
    """Before checksums, 7 of 8 such flips in a shard loaded without a word."""
    folder = saved / "iter_0000004"
    rng = random.Random(0)
    with single_process_group():
        coord = Coordination()
        assert verify(str(folder), coord) is None
        for name in [SHARD] * 8 + [".metadata", "megadual_meta.json"]:
            path = folder / name
            original = path.read_bytes()
            offset = rng.randrange(len(original) - 8)
            flipped = bytes(b ^ rng.randrange(1, 256) for b in original[offset:offset + 8])
            path.write_bytes(original[:offset] + flipped + original[offset + 8:])
            assert verify(str(folder), coord).startswith(f"{name} is corrupt (CRC-32 ")
            path.write_bytes(original)


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), f"{SHARD} is truncated ("),
    (lambda p: p.unlink(), f"{SHARD} is missing"),
])
def test_a_damaged_file_is_named_in_one_line(saved, damage, expected):
    folder = saved / "iter_0000004"
    damage(folder / SHARD)
    message, _ = train_expecting_error(["--train-iters", "6", "--load", str(folder)], CheckpointError)
    assert message.startswith(f"--load {folder}: {expected}") and "\n" not in message


def test_a_save_without_its_manifest_is_not_a_checkpoint(saved):
    (saved / "iter_0000004" / "megadual_manifest.json").unlink()
    shutil.rmtree(saved / "iter_0000002")
    message, logged = train_expecting_error(["--train-iters", "6", "--load", str(saved)], CheckpointError)
    assert logged.has(f"skipping checkpoint {saved}/iter_0000004: megadual_manifest.json is missing: "
                      f"the save did not complete")
    assert message == (f"--load {saved}: no checkpoint verifies (iter_0000004: megadual_manifest.json is missing: "
                       f"the save did not complete)")


def test_corrupt_checkpoint_is_skipped_and_a_failed_save_keeps_the_previous(saved):
    """A real process: --load falls back past the corrupt iteration 4 and resumes from 2; its next
    save fails (a file-size limit stops the shard's write, where the serializer reports only its own
    internal failure), says so in words in one line, keeps the tracker and stops."""
    shard = saved / "iter_0000004" / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    limit = 1 << 20  # above the tracker, lock and metadata files; below the shard (2.4 MB)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    args = SMALL + ["--train-iters", "6", "--load", str(saved), "--save", str(saved), "--save-interval", "1"]
    out = subprocess.run([sys.executable, "pretrain_moe.py", *args], cwd=ROOT, capture_output=True, text=True,
                         check=False, timeout=300, preexec_fn=limit_file_size,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert f" skipping checkpoint {saved}/iter_0000004: {SHARD} is corrupt (CRC-32 " in out.stdout
    assert f" successfully loaded checkpoint from {saved}/iter_0000002 at iteration 2" in out.stdout
    error = out.stderr.strip().splitlines()
    assert error == [(f"pretrain_moe.py: error: saving checkpoint at iteration 3 to {saved} failed: file size limit "
                      f"reached: a checkpoint file grew to the limit of {limit} bytes that `ulimit -f` (RLIMIT_FSIZE) "
                      f"sets for this process; the previous checkpoint (iteration 4) is kept. The run stops (--save-failures-continue "
                      f"would keep training)")], out.stderr[-3000:]
    assert (saved / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(os.listdir(saved)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]


def test_a_full_disk_is_named_in_words(tmp_path):
    """A save into a 1.2 MB tmpfs (needs root to mount): the serializer's own failure becomes "no space left"."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        message, _ = train_expecting_error(["--train-iters", "2", "--save", str(disk / "ckpt")], CheckpointError)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert message.startswith(f"saving checkpoint at iteration 2 to {disk}/ckpt failed: no space left on the "
                              f"device holding {disk}/ckpt ("), message
    assert "enforce fail" not in message
