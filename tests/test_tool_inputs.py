"""The tools around training, given what a careless colleague gives them: preprocess_data.py killed
at each stage of a second run into the same prefix, an --output-prefix whose folder cannot be made,
and a verify layout that cannot mean what it says."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadual.data.indexed_dataset import IndexedDataset
from megadual.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "preprocess_data.py"
OLD = [f"def old_{i}(x):\n    return x * {i}\n" for i in range(40)]
NEW = [f"class New{i}:\n    size = {i % 5}\n" for i in range(40)]


def corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def preprocess_args(source: Path, prefix: Path) -> list[str]:
    return ["--input", str(source), "--output-prefix", str(prefix), "--vocab-size", "300", "--append-eod"]


def trio(prefix: Path) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes()
            for suffix in ("_tokenizer.json", "_text_document.bin", "_text_document.idx")}


def texts_of(prefix: Path) -> list[str]:
    """The documents as the dataset and the tokenizer beside it read them."""
    tokenizer = build_tokenizer("HuggingFaceTokenizer", f"{prefix}_tokenizer.json", None)
    dataset = IndexedDataset(f"{prefix}_text_document")
    return [tokenizer.detokenize(dataset[i].tolist()[:-1]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def old_trio(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("old")
    prefix = folder / "data"
    subprocess.run([sys.executable, str(SCRIPT), *preprocess_args(corpus(folder / "old.jsonl", OLD), prefix)],
                   check=True, capture_output=True)
    assert texts_of(prefix) == OLD
    return prefix


# (how the old dataset was written, where the second run is killed, what the prefix reads then)
KILLS = [("plain", "tokenizer", OLD), ("plain", "adopting", OLD),
         ("plain", "commit", OLD), ("plain", "committed", NEW),
         ("versioned", "idx", OLD), ("versioned", "commit", OLD), ("versioned", "committed", NEW)]


@pytest.mark.parametrize(("layout", "stage", "expected"), KILLS,
                         ids=[f"{layout}-{stage}" for layout, stage, _ in KILLS])
def test_a_second_run_killed_at_any_stage_leaves_the_old_dataset_or_the_new_one(
        old_trio, tmp_path, layout, stage, expected):
    """Killed at any stage before its commit point (one rename of the pointer), the old tokenizer,
    .bin and .idx read back, whether they were plain files (an older run, Megatron's tool) or
    published through the pointer; after it, the new ones; the next run leaves no other version."""
    prefix = tmp_path / "data"
    if layout == "plain":
        for suffix, data in trio(old_trio).items():
            Path(f"{prefix}{suffix}").write_bytes(data)
    else:
        shutil.copytree(old_trio.parent, tmp_path, symlinks=True, dirs_exist_ok=True)
    marker, args = tmp_path / "paused", preprocess_args(corpus(tmp_path / "new.jsonl", NEW), prefix)
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "preprocess_paused.py"), stage, str(marker), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    if stage == "adopting":  # midway: the old tokenizer taken under the pointer, the old .bin not yet
        assert os.path.islink(f"{prefix}_tokenizer.json")
        assert not os.path.islink(f"{prefix}_text_document.bin")
    if expected is OLD:
        assert trio(prefix) == trio(old_trio)
    assert texts_of(prefix) == expected
    rerun = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert texts_of(prefix) == NEW
    current = os.path.basename(os.readlink(tmp_path / ".data.current"))
    assert os.listdir(tmp_path / ".data.versions") == [current]  # no other version left
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    prefix = tmp_path / "file" / "sub" / "data"
    result = subprocess.run([sys.executable, str(SCRIPT), *preprocess_args(corpus(tmp_path / "c.jsonl", OLD), prefix),
                             "--tokenizer-type", "NullTokenizer"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"preprocess_data.py: error: --output-prefix {prefix}: cannot make the folder {prefix.parent} "
        "(Not a directory)")


def test_verify_refuses_sequence_parallelism_without_tensor_parallelism(capsys):
    from megadual.verify import main
    assert main(["--layouts", "sp,dp2"]) == 2
    assert capsys.readouterr().err.strip() == ("megadual.verify: error: layout 'sp,dp2': sp needs tpN (sequence "
                                               "parallelism splits the sequence over TP ranks)")


def test_an_exit_signal_torchrun_would_not_pass_on_is_refused(monkeypatch, capsys):
    """torchrun puts its --signals-to-handle in the workers' environment; without SIGUSR1 there it
    would die of SIGUSR1 with its workers, and nothing would be saved."""
    sys.path.insert(0, str(ROOT))
    import pretrain_moe
    # --load names a file: a run that got past the check would stop at once (exit status 1), not train.
    flags = ["--mock-data", "--vocab-size", "512", "--exit-signal-handler", "--exit-signal", "SIGUSR1", "--load",
             __file__]
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    assert pretrain_moe.main(flags) == 2
    assert capsys.readouterr().err.strip().startswith(
        "pretrain_moe.py: error: --exit-signal SIGUSR1: torchrun passes on only SIGTERM,SIGINT,SIGHUP,SIGQUIT "
        "(its --signals-to-handle)")
