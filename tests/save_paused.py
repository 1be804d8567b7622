"""pretrain_moe.py with the save of one iteration stopped halfway, for the tests that kill it there.

    python tests/save_paused.py ITERATION MARKER pretrain_moe.py-flags...

Once DCP has written every shard of ITERATION's checkpoint but not its .metadata (in the
background under --async-save, while training goes on), this creates the file MARKER and
sleeps until killed.
"""
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.filesystem import _FileSystemWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain_moe


def pause_at(iteration: int, marker: str) -> None:
    finish = _FileSystemWriter.finish

    def paused(self, metadata, results):
        if f"iter_{iteration:07d}" in str(self.path):
            Path(marker).touch()
            time.sleep(3600)
        return finish(self, metadata, results)
    _FileSystemWriter.finish = paused


if __name__ == "__main__":
    pause_at(int(sys.argv[1]), sys.argv[2])
    sys.exit(pretrain_moe.main(sys.argv[3:]))
