"""Multi-rank checkpoints verified file by file: a DP2 and a PP2 x EP2 save list every rank's DCP
shards in the manifest with their own checksums, and a flipped byte in any rank's shard is named
by the verification --load runs."""
import json
import re
from pathlib import Path

import pytest

from megadual import verify as layout_checker
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.integrity import file_checksum, verify
from megadual.training.checkpoint.layout import MANIFEST
from tests.helpers import TINY_MOE, single_process_group

ARGS = TINY_MOE + ["--num-layers", "2", "--train-iters", "1", "--lr-warmup-iters", "0", "--save-interval", "1"]
LAYOUTS = {"DP2": "dp2", "PP2xEP2": "pp2,ep2"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (world, the checkpoint folder)}, both saved in one launch_all (a launch per world size)."""
    root = tmp_path_factory.mktemp("ranks")
    specs = {name: layout_checker.parse_layout(text, ARGS) for name, text in LAYOUTS.items()}
    layout_checker.launch_all({name: (spec.world, ARGS + spec.flags + ["--save", str(root / name)])
                               for name, spec in specs.items()})
    return {name: (spec.world, root / name / "iter_0000001") for name, spec in specs.items()}


@pytest.mark.parametrize("name", LAYOUTS)
def test_manifest_lists_and_verifies_every_ranks_shards(saved, name):
    world, folder = saved[name]
    manifest = json.loads((folder / MANIFEST).read_text())["files"] \
        if (folder / MANIFEST).exists() else None
    assert manifest is not None, sorted(p.name for p in folder.iterdir())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == on_disk
    writers = {int(m.group(1)) for n in on_disk if (m := re.match(r"__(\d+)_", n))}
    assert writers == set(range(world))  # every rank wrote a shard, and every one is listed
    for file in on_disk:
        assert manifest[file] == file_checksum(str(folder / file)), file
    with single_process_group():
        coord = Coordination()
        assert verify(str(folder), coord) is None
        for rank in range(world):
            shard = next(folder.glob(f"__{rank}_*.distcp"))
            original = shard.read_bytes()
            middle = len(original) // 2
            shard.write_bytes(original[:middle] + bytes([original[middle] ^ 0x40]) + original[middle + 1:])
            try:
                assert verify(str(folder), coord).startswith(f"{shard.name} is corrupt (CRC-32 "), rank
            finally:
                shard.write_bytes(original)
