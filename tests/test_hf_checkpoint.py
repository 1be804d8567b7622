"""Hugging Face checkpoints both ways, checked against the real transformers DeepseekV3ForCausalLM.

In: a small random DeepseekV3ForCausalLM (float32, YaRN, group-limited routing with K/M = 2, an
expert bias, a vocabulary the run pads) converted with scripts/convert_checkpoint.py's code gives
transformers' logits under one process, TP2 x EP2 and PP2, and `--load --finetune` trains from it.
Out: a megadual MLA + MTP checkpoint trained two steps gives transformers megadual's logits, and
converting it back is bit-exact.
"""
import gc
import importlib.util
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megadual.arguments import parse_args
from megadual.config import ConfigError, ModelConfig
from megadual.fp8.quant import quantize
from megadual.hf import convert
from megadual.hf.config_map import UnsupportedModel, behaviour_differences, hf_config
from megadual.hf.convert import (
    FLAGS_FILE,
    VOCAB_ROWS,
    agreeing_config,
    export_checkpoint,
    import_checkpoint,
    read_checkpoint,
)
from megadual.training.checkpoint import CheckpointError
from megadual.training.distributed import free_port
from megadual.training.loop import pretrain
from tests.helpers import single_process_group
from tests.hf_logits import layout_worker, loaded_logits, relative_error

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

_spec = importlib.util.spec_from_file_location(
    "convert_checkpoint", Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoint.py")
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)

HF_VOCAB = 250  # padded to 256 by --make-vocab-size-divisible-by 128 (x TP 1 or 2)
SEQ = 16
# float32 logits of the same weights agree to 3.0e-7 (one process, PP2) and 3.6e-7 (TP2 x EP2) relative,
# measured; the bound is about 10x that (the issue asks for 1e-5).
LOGITS_RTOL = 4e-6


def random_hf_model(folder: str) -> "transformers.DeepseekV3ForCausalLM":
    config = transformers.DeepseekV3Config(
        vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        max_position_embeddings=32, num_mtp_layers=0, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "e_score_correction_bias" in name:
                tensor.uniform_(-0.05, 0.05)
            elif tensor.dim() == 1:  # norms: away from ones, so a norm mapped wrong shows
                tensor.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def tokens() -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def test_hf_model_converts_in_with_its_logits_under_every_layout(tmp_path, monkeypatch):
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    reference = hf_logits(random_hf_model(hf_dir), tokens())
    alive, most_alive, tensor_in = [], [], convert._tensor_in  # import holds a tensor or two at a time

    def counted(*args):
        gc.collect()
        most_alive.append(sum(ref() is not None for ref in alive))
        tensor = tensor_in(*args)
        alive.append(weakref.ref(tensor.untyped_storage()))  # DCP keeps an alias, not the tensor
        return tensor
    monkeypatch.setattr(convert, "_tensor_in", counted)
    import_checkpoint(hf_dir, ckpt, ["--seq-length", str(SEQ)])
    monkeypatch.undo()
    assert len(most_alive) > 10 and max(most_alive) == 1  # when a tensor is read, only the last one written
    flags = [f"@{os.path.join(ckpt, FLAGS_FILE)}", "--seq-length", str(SEQ)]
    mp.start_processes(layout_worker, args=(2, free_port(), flags, ckpt, tokens(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    with single_process_group():
        logits = {"1": loaded_logits(flags, ckpt, tokens())}
        train = flags + ["--mock-data", "--load", ckpt, "--train-iters", "1", "--micro-batch-size", "2",
                         "--global-batch-size", "2"]
        with pytest.raises(CheckpointError, match="holds model weights only.*give --finetune"):
            pretrain(parse_args(train), torch.device("cpu"), log=lambda line: None)
        # at another length than the import's: --seq-length binds no checkpoint (issue 21)
        finetuned = pretrain(parse_args(train + ["--finetune", "--seq-length", str(2 * SEQ)]), torch.device("cpu"),
                             log=lambda line: None)
    logits.update({name: torch.load(tmp_path / f"{name}.pt") for name in ("TP2xEP2", "PP2")})
    for name, value in logits.items():
        assert value.shape[-1] == 256
        assert relative_error(value[..., :HF_VOCAB], reference) < LOGITS_RTOL, name
    assert finetuned.final_state.iteration == 1 and torch.isfinite(torch.tensor(finetuned.losses)).all()


MLA_MTP = ["--mock-data", "--vocab-size", str(HF_VOCAB), "--num-layers", "2", "--hidden-size", "32",
           "--num-attention-heads", "4", "--seq-length", str(SEQ), "--num-experts", "8", "--moe-router-topk", "4",
           "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "32", "--moe-first-k-dense", "1",
           "--moe-router-num-groups", "4", "--moe-router-max-nodes", "2", "--multi-latent-attention",
           "--q-lora-rank", "0", "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8",
           "--v-head-dim", "8", "--mtp-num-layers", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--lr", "1e-2", "--moe-router-bias-update-rate", "1e-2", "--log-interval", "1000"]


def test_trained_checkpoint_converts_out_and_back_exactly(tmp_path, monkeypatch):
    ckpt, hf_dir, back = (str(tmp_path / name) for name in ("ckpt", "hf", "back"))
    with single_process_group():
        pretrain(parse_args(MLA_MTP + ["--train-iters", "2", "--save", ckpt, "--save-interval", "2"]),
                 torch.device("cpu"), log=lambda line: None)
        ours = loaded_logits(MLA_MTP, ckpt, tokens())
    read_bytes = []  # per read of the checkpoint during export: it holds one shard, not the model
    read_tensors = convert.read_tensors
    monkeypatch.setattr(convert, "read_tensors", lambda path, shapes: read_bytes.append(
        sum(4 * shape.numel() for shape in shapes.values())) or read_tensors(path, shapes))
    files = export_checkpoint(ckpt, hf_dir, max_shard_bytes=64 << 10)
    monkeypatch.undo()
    assert len(files) > 1 and os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    largest = max(4 * t.numel() for t in read_checkpoint(ckpt)[2].values())
    assert len(read_bytes) == len(files) and max(read_bytes) <= max(64 << 10, largest) + largest
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir).float().eval()
    assert relative_error(hf_logits(model, tokens()), ours[..., :HF_VOCAB]) < LOGITS_RTOL
    import_checkpoint(hf_dir, back, MLA_MTP)
    (_, config, saved), (_, config_back, converted) = read_checkpoint(ckpt), read_checkpoint(back)
    assert config_back == config
    assert saved.keys() == converted.keys() and any(name.startswith("mtp.1.") for name in saved)
    for name, tensor in saved.items():
        rows = HF_VOCAB if name in VOCAB_ROWS else None  # the padding rows are not exported
        assert torch.equal(converted[name][:rows], tensor[:rows]), name
    # import checks every name, shape and MTP copy before it writes anything
    for name, change, error in (
            ("model.layers.2.embed_tokens.weight", lambda t: t + 1, "differs from the main model's"),
            ("model.layers.1.mlp.gate.weight", lambda t: t[:, :-1], r"shape \[8, 31\], megadual's"),
            ("model.norm.weight", lambda t: None, "lacks tensors megadual needs: final_norm.weight")):
        edited, written = hf_folder_with(hf_dir, str(tmp_path / name), name, change), tmp_path / f"{name}-in"
        with pytest.raises(UnsupportedModel, match=error):
            import_checkpoint(edited, str(written), MLA_MTP)
        assert not (written / "iter_0000000").exists(), name


def test_fp8_release_converts_in_as_its_dequantized_weights(tmp_path):
    """DeepSeek's FP8 release format: E4M3 weights with one scale per block (DeepSeek's are 128 x 128;
    16 x 8 here, so partial blocks occur and rows and columns differ) import as E4M3 x scale,
    computed here block by block in float64."""
    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    random_hf_model(str(plain))
    quantized, dequantized, (rows, cols) = {}, {}, (16, 8)
    for name, weight in safetensors_torch.load_file(plain / "model.safetensors").items():
        if name.startswith("model.layers.") and weight.dim() == 2 and not name.endswith("mlp.gate.weight"):
            q = quantize(weight, (rows, cols))
            quantized[name], quantized[name + "_scale_inv"] = q.data, q.scale
            reference = torch.empty(weight.shape, dtype=torch.float64)
            for i in range(0, weight.shape[0], rows):
                for j in range(0, weight.shape[1], cols):
                    reference[i:i + rows, j:j + cols] = \
                        q.data[i:i + rows, j:j + cols].double() * q.scale[i // rows, j // cols].item()
            dequantized[name] = reference.float()
        else:
            quantized[name] = dequantized[name] = weight
    config = json.loads((plain / "config.json").read_text())
    for folder, tensors, extra in ((plain, dequantized, {}), (fp8, quantized, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [rows, cols]}})):
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config | extra))
        safetensors_torch.save_file(tensors, folder / "model.safetensors")
    flags = ["--seq-length", str(SEQ)]
    import_checkpoint(str(plain), str(tmp_path / "plain-in"), flags)
    import_checkpoint(str(fp8), str(tmp_path / "fp8-in"), flags)
    (_, _, expected), (_, _, imported) = read_checkpoint(str(tmp_path / "plain-in")), read_checkpoint(str(tmp_path / "fp8-in"))
    assert expected.keys() == imported.keys()
    assert sum(name.endswith("_scale_inv") for name in quantized) > 10
    for name, tensor in expected.items():
        assert torch.equal(imported[name], tensor), name


def hf_folder_with(hf_dir: str, dest: str, name: str, change) -> str:
    """A copy of the sharded HF folder with tensor `name` changed (removed where `change` gives None)."""
    shutil.copytree(hf_dir, dest)
    index_path = os.path.join(dest, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = os.path.join(dest, index["weight_map"][name])
    tensors = safetensors_torch.load_file(shard)
    changed = change(tensors.pop(name))
    if changed is None:
        del index["weight_map"][name]
        with open(index_path, "w") as f:
            json.dump(index, f)
    else:
        tensors[name] = changed.contiguous()
    safetensors_torch.save_file(tensors, shard)
    return dest


def test_conversion_refuses_what_hugging_face_would_compute_differently(tmp_path, capsys):
    with pytest.raises(UnsupportedModel, match="only --multi-latent-attention models export"):
        hf_config(ModelConfig(), 100)
    routing = parse_args(MLA_MTP + ["--moe-router-num-groups", "2", "--moe-router-max-nodes", "1"]).model  # K/M = 4
    assert [d for d in behaviour_differences(routing) if "top --moe-router-topk / --moe-router-max-nodes = 4" in d]
    assert not behaviour_differences(parse_args(MLA_MTP).model)
    with pytest.raises(ConfigError, match="--hidden-size: checkpoint has 32, this run has 64"):
        agreeing_config(["--hidden-size", "32", "--vocab-size", "100"], ["--hidden-size", "64"])
    assert convert_checkpoint.main(["--to-hf", str(tmp_path / "none"), str(tmp_path / "hf")]) == 2
    assert f"{tmp_path / 'none'} has no latest_checkpointed_iteration.txt" in capsys.readouterr().err
