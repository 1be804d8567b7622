"""The memory table: what python -m megadual.plan predicts against the memory report measured
after the first iteration, per pipeline rank, on the layouts of issue 13 (CPU, gloo).

    python scripts/bench_memory.py [pretrain_moe.py model flags]

Default model: tests/helpers.py's TINY_MOE with 8 layers and micro-batch 1. Prints one markdown
row per layout and pipeline rank (the data/expert-parallel ranks of a stage report the same
parameter, gradient and optimizer bytes; the peak activations shown are their largest).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.plan.check import measure_and_predict
from megadual.training.memory import MB
from tests.helpers import TINY_MOE

RUN = ["--train-iters", "1", "--lr-warmup-iters", "0"]
DEFAULT_MODEL = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1"]
SELECTIVE = ["--recompute-granularity", "selective"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
LAYOUTS = {  # name: (extra flags, verify layout)
    "1 process": ([], ""),
    "1 process, selective": (SELECTIVE, ""),
    "1 process, full": (FULL, ""),
    "DP2 x EP2": ([], "dp2,ep2"),
    "PP2 DualPipe x EP2": ([], "pp2:dualpipe,ep2"),
    "PP2 1F1B": ([], "pp2"),
    "PP4 DualPipeV, selective": (SELECTIVE, "pp4:dualpipev"),
}


def main() -> None:
    model = sys.argv[1:] or DEFAULT_MODEL
    checked = measure_and_predict({name: (model + RUN + extra, layout) for name, (extra, layout) in LAYOUTS.items()})
    print("| layout | pipeline rank | parameters (MB) | gradients (MB) | optimizer state (MB) | "
          "peak activations measured (MB) | predicted (MB) | predicted / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, check in checked.items():
        by_stage: dict[int, list] = {}
        for report, rank in check.pairs():
            by_stage.setdefault(rank.pp_rank, []).append((report, rank))
        for pp_rank, pairs in sorted(by_stage.items()):
            report = max((r for r, _ in pairs), key=lambda r: r.peak_activations)
            rank = pairs[0][1]
            same = all((r.parameters, r.gradients, r.optimizer_state) == (rank.parameters, rank.gradients,
                                                                           rank.optimizer_state_held) for r, _ in pairs)
            print(f"| {name} | {pp_rank} | {report.parameters / MB:.3f} | {report.gradients / MB:.3f} | "
                  f"{report.optimizer_state / MB:.3f}{'' if same else ' (predicted differs)'} | "
                  f"{report.peak_activations / MB:.3f} | {rank.peak_activations / MB:.3f} | "
                  f"{rank.peak_activations / report.peak_activations:.3f} |")


if __name__ == "__main__":
    main()
