"""The planner against the memory report: layouts run through verify's harness, each predicted
by megadual.plan, paired rank by rank (used by tests/test_memory_layouts.py and
scripts/bench_memory.py)."""
from __future__ import annotations

from dataclasses import dataclass

from megadual import verify
from megadual.arguments import resolve_device_defaults
from megadual.plan.rank_memory import RankMemory, predict
from megadual.training.capture import Capture
from megadual.training.memory import MemoryReport
from pretrain_moe import load_config


@dataclass
class Checked:
    spec: verify.LayoutSpec
    capture: Capture  # the run: its logged values, gradients and every rank's memory report
    predicted: list[RankMemory]  # by pipeline rank

    def pairs(self) -> list[tuple[MemoryReport, RankMemory]]:
        """(measured, predicted) for every rank."""
        ranks_per_stage = self.spec.world // self.spec.pp
        return [(report, self.predicted[report.rank // ranks_per_stage]) for report in self.capture.memory]


def measure_and_predict(cases: dict[str, tuple[list[str], str]]) -> dict[str, Checked]:
    """Each case (flags, verify layout) trained for its flags' iterations and predicted."""
    specs = {name: verify.parse_layout(layout, flags) for name, (flags, layout) in cases.items()}
    flags = {name: cases[name][0] + spec.flags for name, spec in specs.items()}
    captures = verify.launch_all({name: (spec.world, flags[name]) for name, spec in specs.items()})
    return {name: Checked(spec, captures[name],
                          predict(resolve_device_defaults(load_config(flags[name]), "cpu"), spec.world))
            for name, spec in specs.items()}
