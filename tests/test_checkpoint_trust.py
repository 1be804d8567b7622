"""Checkpoints from elsewhere: loading one runs no code from it, and with a key only checkpoints
signed with that key load.

A crafted checkpoint here is what a hostile colleague can make: a `.metadata` replaced by a pickle
whose `__reduce__` runs a shell command, or a byte item (or tensor item) of a `.distcp` shard
pointed at such a pickle, with the manifest's checksums recomputed so that the folder verifies.
The command would create a marker file; every test checks that it does not exist afterwards."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch

from megadual.training.checkpoint import CheckpointError, iteration_dir
from megadual.training.checkpoint.integrity import KEY_ENV, checksums, problem_with, read_manifest
from tests.checkpoint_runs import train, train_expecting_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert_checkpoint  # noqa: E402

SHARD = "__0_0.distcp"
# An MoE model with MLA, which --to-hf converts.
MODEL = ["--multi-latent-attention", "--q-lora-rank", "0", "--kv-lora-rank", "16", "--qk-head-dim", "8",
         "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "4", "--moe-router-topk", "2",
         "--moe-ffn-hidden-size", "16"]
SAVE = ["--save-interval", "2", "--train-iters", "2"]


def run(flags: list[str]):
    return train(MODEL + flags)


def refused(flags: list[str]) -> str:
    return train_expecting_error(MODEL + flags, CheckpointError)[0]


class Payload:
    """Unpickled, runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def recompute_manifest(folder: Path) -> None:
    """The manifest's CRCs made to match the files again, its signature (if any) kept."""
    manifest = json.loads((folder / "megadual_manifest.json").read_text())
    manifest["files"] = checksums(str(folder), sorted(manifest["files"]), "signature" in manifest)
    (folder / "megadual_manifest.json").write_text(json.dumps(manifest))


def craft_metadata(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    recompute_manifest(folder)


def craft_item(folder: Path, marker: Path, fqn: str) -> None:
    """Point the item `fqn` of the shard at a torch.save'd payload appended to it (the metadata is
    DCP's own, rewritten with the new offset)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own save: trusted
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    shard = folder / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        torch.save(Payload(marker), f)
    info.offset, info.length = offset, shard.stat().st_size - offset
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    recompute_manifest(folder)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    run(["--save", str(root)] + SAVE)
    return root


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    return root


def one_line_naming(message: str, path: Path) -> bool:
    return "\n" not in message and str(path) in message


@pytest.mark.parametrize("how", ["--load", "--finetune", "--to-hf"])
def test_a_crafted_metadata_is_refused_without_running_it(saved, tmp_path, capsys, how):
    marker, folder = tmp_path / "pwned", Path(iteration_dir(str(saved), 2))
    craft_metadata(folder, marker)
    if how == "--to-hf":
        assert convert_checkpoint.main(["--to-hf", str(saved), str(tmp_path / "hf")]) == 2
        message = capsys.readouterr().err.strip()
    else:
        flags = ["--load", str(saved), "--train-iters", "3"] + (["--finetune"] if how == "--finetune" else [])
        message = refused(flags)
    assert one_line_naming(message, folder / ".metadata"), message
    assert "posix.system" in message
    assert not marker.exists(), "the crafted pickle ran"


@pytest.mark.parametrize("fqn", ["optimizer.param_groups.embedding.weight.lr", "model.final_norm.weight"],
                         ids=["byte item", "tensor item"])
def test_a_crafted_shard_item_is_refused_without_running_it(saved, tmp_path, fqn):
    marker, folder = tmp_path / "pwned", Path(iteration_dir(str(saved), 2))
    craft_item(folder, marker, fqn)
    message = refused(["--load", str(saved), "--train-iters", "3"])
    assert one_line_naming(message, folder / SHARD), message
    assert not marker.exists(), "the crafted pickle ran"


def test_metadata_pointing_outside_its_folder_is_refused(saved, tmp_path):
    folder = Path(iteration_dir(str(saved), 2))
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own save: trusted
    next(iter(metadata.storage_data.values())).relative_path = "../../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    recompute_manifest(folder)
    message = refused(["--load", str(saved), "--train-iters", "3"])
    assert message.endswith(f"{folder / '.metadata'}: refused, it points outside its folder "
                            "('../../elsewhere.distcp')")


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> tuple[Path, Path]:
    """(a --save directory whose checkpoints 1 and 2 were saved asynchronously with a key, the key file)."""
    folder = tmp_path_factory.mktemp("signed")
    key = folder / "key"
    key.write_text("a secret\n")
    run(["--save", str(folder / "ckpt"), "--save-interval", "1", "--train-iters", "2", "--async-save",
         "--checkpoint-key-file", str(key)])
    return folder / "ckpt", key


def test_signed_checkpoints_load_only_with_their_key(pristine, signed, tmp_path, monkeypatch):
    """Signed at save (async, then sync), loaded with the key; refused with another key, unsigned, or
    altered with its checksums recomputed; without a key the signed checkpoint loads as any other."""
    root, key = signed
    other = tmp_path / "other"
    other.write_text("another secret\n")
    newest = Path(iteration_dir(str(root), 2))
    logged = run(["--load", str(root), "--save", str(root), "--train-iters", "3", "--save-interval", "3",
                  "--checkpoint-key-file", str(key)])
    assert logged.has(f"loading checkpoint from {newest}")
    assert "signature" in Path(iteration_dir(str(root), 3), "megadual_manifest.json").read_text()
    monkeypatch.setenv(KEY_ENV, str(other))  # the environment variable names the key when the flag is not given
    message = refused(["--load", str(newest), "--train-iters", "4"])
    assert str(newest) in message and "not signed with this key" in message, message
    monkeypatch.delenv(KEY_ENV)
    assert run(["--load", str(newest), "--train-iters", "3"]).has("loading checkpoint")  # no key: unchecked

    (newest / "megadual_meta.json").write_text((newest / "megadual_meta.json").read_text().replace(
        '"skipped_iterations": 0', '"skipped_iterations": 1'))
    recompute_manifest(newest)  # the CRCs match again, the signature does not
    message = refused(["--load", str(newest), "--train-iters", "4", "--checkpoint-key-file",
                                        str(key)])
    assert str(newest) in message and "not signed with this key, or was altered" in message, message

    message = refused(["--load", str(pristine), "--train-iters", "3", "--checkpoint-key-file", str(key)])
    assert "iter_0000002: its megadual_manifest.json is unsigned" in message and str(pristine) in message, message


def convert(*args) -> tuple[int, str]:
    """convert_checkpoint.py's exit status and what it printed to stderr."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = convert_checkpoint.main([str(a) for a in args])
    return status, err.getvalue().strip()


@pytest.fixture(scope="module")
def hf_folder(pristine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert convert("--to-hf", pristine, out) == (0, "")
    return out


def test_converters_write_only_into_new_or_empty_folders(pristine, hf_folder, tmp_path):
    from tests.checkpoint_runs import contents
    taken = tmp_path / "taken"
    shutil.copytree(pristine, taken)
    before = contents(taken)
    status, message = convert("--from-hf", hf_folder, taken)
    assert status == 2 and "holds checkpoints (its tracker names iteration 2)" in message and "--overwrite" in message
    assert contents(taken) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("mine")
    for direction, source in (("--to-hf", pristine), ("--from-hf", hf_folder)):
        status, message = convert(direction, source, notes)
        assert status == 2 and f"{direction}: {notes} holds 1 file(s): config.json" in message, message
        assert (notes / "config.json").read_text() == "mine" and os.listdir(notes) == ["config.json"]
    assert convert("--to-hf", pristine, notes, "--overwrite")[0] == 0
    assert json.loads((notes / "config.json").read_text())["model_type"] == "deepseek_v3"


def nan_in_first_tensor(folder: Path) -> str:
    from safetensors.torch import load_file, save_file
    shard = min(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    name = min(tensors)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return name


def truncate_a_shard(folder: Path) -> str:
    shard = min(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return str(shard)


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / "config.json").write_text("{not json") and f"{folder / 'config.json'}: not JSON",
    lambda folder: (folder / "config.json").write_text("[1]") and "should hold a JSON object, holds a list",
    lambda folder: f"{truncate_a_shard(folder)}: not a readable safetensors file",
    lambda folder: f"{nan_in_first_tensor(folder)} in ",
], ids=["config not JSON", "config not an object", "truncated safetensors", "NaN"])
def test_a_bad_hugging_face_folder_is_refused_in_one_line(hf_folder, tmp_path, damage):
    source = tmp_path / "hf"
    shutil.copytree(hf_folder, source)
    expected = damage(source)
    status, message = convert("--from-hf", source, tmp_path / "ckpt")
    assert status == 2 and "\n" not in message and expected in message, message
    assert not (tmp_path / "ckpt").exists() or not os.listdir(tmp_path / "ckpt")  # nothing left behind


@pytest.mark.parametrize("meta, problem", [
    ("[]", "should hold a JSON object, holds a list"),
    ('{"train_state": {}, "config": {}, "world_size": 1, "surprise": 1}', "unknown key surprise"),
], ids=["not an object", "unknown key"])
def test_a_crafted_meta_file_is_refused_in_one_line(saved, tmp_path, meta, problem):
    folder = Path(iteration_dir(str(saved), 2))
    (folder / "megadual_meta.json").write_text(meta)
    recompute_manifest(folder)
    status, message = convert("--to-hf", saved, tmp_path / "hf")
    assert status == 2 and message.endswith(f"{folder / 'megadual_meta.json'}: {problem}"), message
    message = refused(["--load", str(saved), "--train-iters", "3"])
    assert "\n" not in message and f"{folder / 'megadual_meta.json'}: {problem}" in message, message


def forge_crc(data: bytearray, pos: int, target: int) -> None:
    """Change bits of data[pos:pos + 4] so that the CRC-32 of `data` becomes `target` (a CRC is affine
    in the bits of its input: solve 32 equations over GF(2))."""
    n, basis = len(data), {}
    zero = zlib.crc32(bytes(n))
    for bit in range(32):
        e = bytearray(n)
        e[pos + bit // 8] = 1 << (bit % 8)
        v, m = zlib.crc32(e) ^ zero, 1 << bit
        while v and v.bit_length() - 1 in basis:
            v, m = v ^ basis[v.bit_length() - 1][0], m ^ basis[v.bit_length() - 1][1]
        if v:
            basis[v.bit_length() - 1] = (v, m)
    v, m = zlib.crc32(data) ^ target, 0
    while v:
        v, m = v ^ basis[v.bit_length() - 1][0], m ^ basis[v.bit_length() - 1][1]
    for bit in range(32):
        if m >> bit & 1:
            data[pos + bit // 8] ^= 1 << (bit % 8)


def test_a_file_forged_to_its_crc_is_caught_by_its_signed_sha256(signed, tmp_path):
    root, key = signed
    folder = tmp_path / "iter_0000001"
    shutil.copytree(iteration_dir(str(root), 1), folder)
    shard = folder / SHARD
    data = bytearray(shard.read_bytes())
    crc = zlib.crc32(data)
    data[len(data) // 2] ^= 0xFF
    forge_crc(data, len(data) // 2 + 8, crc)
    shard.write_bytes(bytes(data))
    manifest = read_manifest(str(folder))
    assert problem_with(str(folder), SHARD, manifest[SHARD]) is None  # the CRC-32 is fooled
    message = refused(["--load", str(folder), "--train-iters", "3", "--checkpoint-key-file", str(key)])
    assert message == f"--load {folder}: {SHARD} is not the file that was signed (its SHA-256 differs from the " \
                      "manifest's)"
