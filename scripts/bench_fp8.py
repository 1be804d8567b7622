"""FP8 GEMM throughput: every available blockwise FP8 backend against torch's BF16 matmul,
on the linear shapes of DeepSeek-V3 (hidden 7168, expert FFN 2048, dense FFN 18432, MLA).

    python scripts/bench_fp8.py                 # CUDA: M = 4096 and 16384 tokens
    python scripts/bench_fp8.py --device cpu    # small shapes, only checks that the script works

FP8 timings are of the GEMM alone, on operands quantized beforehand (x in 1x128
tiles, W in 128x128 blocks); the time to quantize x is reported on its own line.
`rel.err` is the relative Frobenius distance of the output from the BF16 result.
CPU numbers say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.fp8.gemm import available_backends, fp8_gemm
from megadual.fp8.quant import quantize_blocks, quantize_tiles

# (name, N = out features, K = in features) of y[M, N] = x[M, K] @ W[N, K]^T
V3_SHAPES = [
    ("expert gate+up", 2 * 2048, 7168),
    ("expert down", 7168, 2048),
    ("dense gate+up", 2 * 18432, 7168),
    ("dense down", 7168, 18432),
    ("attn q_a", 1536, 7168),
    ("attn q_b", 128 * 192, 1536),
    ("attn kv_a", 512 + 64, 7168),
    ("attn kv_b", 128 * 256, 512),
    ("attn o", 7168, 128 * 128),
]
GPU_TOKENS = [4096, 16384]
CPU_SHRINK = 16
CPU_TOKENS = [256]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(name: str, m: int, n: int, k: int, device: torch.device, backends: list[str],
                warmup: int, iters: int) -> list[tuple]:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=device) * k**-0.5).to(torch.bfloat16)
    flops = 2 * m * n * k
    ref = x @ w.t()
    bf16_ms = time_ms(lambda: x @ w.t(), device, warmup, iters)
    rows = [(name, m, n, k, "bf16", bf16_ms, flops / bf16_ms / 1e9, 1.0, 0.0)]
    a, b = quantize_tiles(x), quantize_blocks(w.float())
    for backend in backends:
        ms = time_ms(functools.partial(fp8_gemm, a, b, backend), device, warmup, iters)
        err = rel_err(fp8_gemm(a, b, backend), ref)
        rows.append((name, m, n, k, backend, ms, flops / ms / 1e9, bf16_ms / ms, err))
    quant_ms = time_ms(lambda: quantize_tiles(x), device, warmup, iters)
    rows.append((name, m, n, k, "quantize x", quant_ms, float("nan"), float("nan"), float("nan")))
    return rows


def print_table(rows: list[tuple]) -> None:
    header = f"{'shape':<15} {'M':>6} {'N':>6} {'K':>6}  {'backend':<11} {'ms':>9} {'TFLOP/s':>8} " \
             f"{'fp8/bf16':>8} {'rel.err':>8}"
    print(header)
    print("-" * len(header))
    for name, m, n, k, backend, ms, tflops, speedup, err in rows:
        print(f"{name:<15} {m:>6} {n:>6} {k:>6}  {backend:<11} {ms:>9.3f} {tflops:>8.1f} "
              f"{speedup:>8.2f} {err:>8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="FP8 backends to time (default: all available on the device)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="values of M")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu for a smoke test")
    backends = args.backends or available_backends(device)
    if device.type == "cuda":
        shapes, tokens = V3_SHAPES, args.tokens or GPU_TOKENS
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, backends {backends}")
    else:
        shapes = [(name, max(n // CPU_SHRINK, 128), max(k // CPU_SHRINK, 128)) for name, n, k in V3_SHAPES]
        tokens = args.tokens or CPU_TOKENS
        print(f"CPU smoke test (shapes / {CPU_SHRINK}); timings are not meaningful; backends {backends}")

    torch.manual_seed(0)
    rows = []
    for m in tokens:
        for name, n, k in shapes:
            rows += bench_shape(name, m, n, k, device, backends, args.warmup, args.iters)
    print_table(rows)


if __name__ == "__main__":
    main()
