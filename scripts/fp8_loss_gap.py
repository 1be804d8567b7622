"""FP8 vs FP32 training loss gap (issue 5): one tiny MoE, same seed and data, trained with
`--fp8-format e4m3` and without, in this process; prints both loss curves and the relative gap.

    python scripts/fp8_loss_gap.py --threads 1                      # mock data, 300 steps
    python scripts/fp8_loss_gap.py --threads 1 --data-prefix data/stdlib_text_document \\
        --tokenizer data/stdlib_tokenizer.json                      # after scripts/prepare_sample_corpus.sh

The gap is (fp8 - fp32) / fp32 of the mean training loss over the last --window
iterations, and of the validation loss after the last step where there is a
validation split. The hidden size and the FFN sizes default to 128, so activation
tiles (1x128) and weight blocks (128x128) are whole. FP8 GEMM calls are counted
to show the FP8 path ran.

Two runs that differ at all drift apart, so part of any gap is trajectory noise,
not FP8 error. `--noise-floor` measures it: a third run in FP32 with every linear's
output scaled by 1 + 2^-20, compared with the FP32 run the same way.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megadual.fp8.linear as fp8_linear_module
from megadual.arguments import parse_args
from megadual.data.tokenizer import build_tokenizer
from megadual.parallel.linear import linear
from megadual.training import loop
from megadual.training.distributed import init_distributed


@dataclass
class Run:
    losses: list[float]
    validation: float | None
    fp8_gemm_calls: int


def model_args(steps: int, hidden: int, layers: int, seq_length: int, data_prefix: str | None = None,
               tokenizer: str | None = None, seed: int = 1234, mla: bool = False) -> list[str]:
    """A dense first layer, then MoE layers of 8 routed experts (top-2) and one shared expert;
    one micro-batch of 8 sequences a step; the validation loss (real data only) after the last step.
    `mla`: multi-head latent attention instead of MHA (query and key/value latents 3/4 and 1/2 of
    the hidden size, head dims 1/4 of it plus 1/8 for RoPE)."""
    data = (["--mock-data", "--vocab-size", "512"] if data_prefix is None else
            ["--data-path", data_prefix, "--split", "98,2,0", "--eval-interval", str(steps), "--eval-iters", "16",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer])
    return data + [
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "4",
        "--seq-length", str(seq_length), "--num-experts", "8", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", str(hidden), "--moe-shared-expert-intermediate-size", str(hidden),
        "--moe-first-k-dense", "1", "--moe-router-bias-update-rate", "1e-3", "--moe-aux-loss-coeff", "1e-3",
        "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-warmup-iters", str(max(1, steps // 10)), "--train-iters", str(steps),
        "--log-interval", str(steps), "--seed", str(seed),
    ] + (mla_args(hidden) if mla else [])


def mla_args(hidden: int) -> list[str]:
    return ["--multi-latent-attention", "--q-lora-rank", str(hidden * 3 // 4), "--kv-lora-rank", str(hidden // 2),
            "--qk-head-dim", str(hidden // 4), "--qk-pos-emb-head-dim", str(hidden // 8),
            "--v-head-dim", str(hidden // 4)]


def vocab_size(argv: list[str]) -> int | None:
    """The tokenizer's vocabulary size, as pretrain_moe.py derives it (None for mock data)."""
    if "--tokenizer-model" not in argv:
        return None
    return build_tokenizer("HuggingFaceTokenizer", argv[argv.index("--tokenizer-model") + 1], None).vocab_size


def nudged_linear(x: torch.Tensor, weight: torch.Tensor, wgrad_store=None) -> torch.Tensor:
    """The FP32 linear with its output scaled by 1 + 2^-20: a rounding-sized push off the FP32 trajectory."""
    return linear(x, weight, wgrad_store) * (1 + 2 ** -20)


def train(argv: list[str], mode: str, device: torch.device) -> Run:
    """One run of `argv` in `mode` ("fp32", "fp8" or "nudged"), counting the FP8 GEMMs it makes."""
    validation: list[float] = []

    def log(line: str) -> None:
        if "throughput per GPU" in line:  # --log-throughput: the run's one iteration line
            print(f"{mode:>6}:{line}", flush=True)
        if "validation loss" in line:
            validation.append(float(line.split("lm loss value:")[1].split("|")[0]))

    config = parse_args(argv + (["--fp8-format", "e4m3"] if mode == "fp8" else []),
                        tokenizer_vocab_size=vocab_size(argv))
    fp8_gemm, calls = fp8_linear_module.fp8_gemm, 0

    def counted_fp8_gemm(a, b):  # (a mock's `wraps=` would keep every operand alive in call_args_list)
        nonlocal calls
        calls += 1
        return fp8_gemm(a, b)

    gemm = (lambda config: nudged_linear) if mode == "nudged" else loop.linear_gemm
    with (mock.patch.object(loop, "linear_gemm", gemm),
          mock.patch.object(fp8_linear_module, "fp8_gemm", counted_fp8_gemm)):
        losses = loop.pretrain(config, device, log=log).losses
    return Run(losses, validation[-1] if validation else None, calls)


def relative_gap(other: float, fp32: float) -> float:
    return (other - fp32) / fp32


def smoothed(losses: list[float], window: int) -> float:
    return sum(losses[-window:]) / len(losses[-window:])


def compare(argv: list[str], device: torch.device, window: int, modes: tuple[str, ...] = ("fp32", "fp8"),
            log: Callable[[str], None] = print) -> dict[str, Run]:
    """Train once per mode (the first is the baseline) and log each run and its gap to the baseline."""
    runs: dict[str, Run] = {}
    for mode in modes:
        run = runs[mode] = train(argv, mode, device)
        marks = sorted({0, len(run.losses) // 4, len(run.losses) // 2, 3 * len(run.losses) // 4})
        curve = "  ".join(f"{i + 1}: {run.losses[i]:.4f}" for i in marks)
        val = "" if run.validation is None else f" | validation {run.validation:.5f}"
        log(f"{mode:>6}: loss at {curve} | mean of last {window}: {smoothed(run.losses, window):.5f}{val} "
            f"| FP8 GEMM calls: {run.fp8_gemm_calls}")
    base = runs[modes[0]]
    for mode in modes[1:]:
        run = runs[mode]
        gap = f"{relative_gap(smoothed(run.losses, window), smoothed(base.losses, window)):+.4%}"
        if base.validation is not None:
            gap += f", validation loss {relative_gap(run.validation, base.validation):+.4%}"
        log(f"relative gap ({mode} - {modes[0]}) / {modes[0]}: mean of last {window} losses {gap}")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden-size", type=int, default=128, help="also the expert and shared-expert FFN size")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--window", type=int, default=20, help="iterations the final training loss is averaged over")
    p.add_argument("--data-prefix", help="indexed dataset prefix (default: --mock-data)")
    p.add_argument("--tokenizer", help="HuggingFace tokenizer.json for --data-prefix")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--multi-latent-attention", action="store_true", help="MLA instead of MHA (see model_args)")
    p.add_argument("--noise-floor", action="store_true", help="also run the nudged FP32 control")
    p.add_argument("--log-throughput", action="store_true",
                   help="print each run's iteration line with its TFLOP/s per GPU (averaged over all steps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; 1 is as fast here and not slowed by busy cores")
    a = p.parse_args()
    if (a.data_prefix is None) != (a.tokenizer is None):
        p.error("--data-prefix and --tokenizer go together")
    if a.threads:
        torch.set_num_threads(a.threads)
    argv = model_args(a.steps, a.hidden_size, a.num_layers, a.seq_length, a.data_prefix, a.tokenizer, a.seed,
                      a.multi_latent_attention) + (["--log-throughput"] if a.log_throughput else [])
    print(f"{a.steps} steps, hidden {a.hidden_size}, {a.num_layers} layers, seq {a.seq_length}, "
          f"{'MLA' if a.multi_latent_attention else 'MHA'}, "
          f"data {a.data_prefix or 'mock'}, seed {a.seed}, {torch.get_num_threads()} threads", flush=True)
    modes = ("fp32", "fp8", "nudged") if a.noise_floor else ("fp32", "fp8")
    compare(argv, init_distributed(), a.window, modes, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
