"""scripts/preprocess_data.py stopped at one stage of its work, for the tests that kill it there.

    python tests/preprocess_paused.py STAGE MARKER preprocess_data.py-flags...

STAGE: `tokenizer` (the BPE is trained and saved), `idx` (every .bin is written, no .idx yet) or
`publishing` (the new tokenizer is renamed into place, the datasets not yet). There this creates
the file MARKER and sleeps until killed.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import preprocess_data  # noqa: E402


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
    else:
        replace = os.replace

        def paused(source, destination):
            replace(source, destination)
            if str(destination).endswith("_tokenizer.json"):
                pause(marker)
        os.replace = paused


if __name__ == "__main__":
    pause_at(sys.argv[1], sys.argv[2])
    preprocess_data.main(sys.argv[3:])
