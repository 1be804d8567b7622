"""scripts/preprocess_data.py stopped at one stage of its work, for the tests that kill it there.

    python tests/preprocess_paused.py STAGE MARKER preprocess_data.py-flags...

STAGE: `tokenizer` (the BPE is trained and saved), `idx` (every .bin is written, no .idx yet),
`adopting` (an old plain tokenizer file is replaced by its symlink, the old .bin/.idx not yet),
`commit` (the new version is complete, the pointer not yet moved to it) or `committed` (the pointer
moved, the old version not yet removed). There this creates the file MARKER and sleeps until killed.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import preprocess_data  # noqa: E402

from megadual.data.published_files import PublishedFiles  # noqa: E402


def pause(marker: str) -> None:
    Path(marker).touch()
    time.sleep(3600)


def pause_at(stage: str, marker: str) -> None:
    if stage == "tokenizer":
        train = preprocess_data.train_tokenizer
        preprocess_data.train_tokenizer = lambda *args: (train(*args), pause(marker))[0]
    elif stage == "idx":
        finalize = preprocess_data.IndexedDatasetBuilder.finalize
        preprocess_data.IndexedDatasetBuilder.finalize = lambda self, path: (pause(marker), finalize(self, path))
    elif stage == "adopting":
        point = PublishedFiles._point

        def paused(path, target):
            point(path, target)
            if path.endswith("_tokenizer.json"):
                pause(marker)
        PublishedFiles._point = staticmethod(paused)
    elif stage == "commit":
        commit = PublishedFiles._commit
        PublishedFiles._commit = lambda self: (pause(marker), commit(self))
    else:
        commit = PublishedFiles._commit
        PublishedFiles._commit = lambda self: (commit(self), pause(marker))


if __name__ == "__main__":
    pause_at(sys.argv[1], sys.argv[2])
    preprocess_data.main(sys.argv[3:])
