"""Training-loop behaviour: non-finite steps are skipped and counted, then stop the run; log shape."""
import json
import re

import pytest
import torch

from megadual.arguments import parse_args
from megadual.parallel.topology import Layout, Topology
from megadual.pipeline.stage_model import build_full_model
from megadual.training import loop
from megadual.training.optimizer import build_optimizer
from megadual.training.step import StepResult, train_step
from tests.helpers import TINY_MOE, single_process_group


def test_non_finite_loss_skips_update_and_leaves_weights_and_biases():
    config = parse_args(TINY_MOE)
    with single_process_group() as device:
        topo = Topology(Layout(1), 0)
        model = build_full_model(config.model, seed=1).to(device)
        optimizer = build_optimizer(list(model.named_parameters()), config.optim)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        biases = [r.expert_bias.clone() for r, _ in model.routers()]
        with torch.no_grad():
            model.layers["0"].attention.q.weight[0, 0] = float("nan")
        tokens = torch.randint(0, 512, (2, 32), device=device)
        result = train_step(model, optimizer, [{"tokens": tokens, "labels": tokens}], topo, 1e-3, 1.0, 1e-2,
                            device, bf16=False)
    assert result.skipped
    for name, p in model.named_parameters():
        if name != "layers.0.attention.q.weight":
            assert torch.equal(p, before[name]), name
    assert all(torch.equal(r.expert_bias, b) for r, b in zip((r for r, _ in model.routers()), biases))


def test_too_many_consecutive_skips_stop_the_run(monkeypatch):
    bad = StepResult(torch.tensor([float("nan")], dtype=torch.float64), 0, float("nan"), True)
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: bad)
    with single_process_group() as device, pytest.raises(loop.NonFiniteLossError, match="3 iterations in a row"):
        loop.pretrain(parse_args(TINY_MOE + ["--train-iters", "10", "--max-consecutive-skipped-iters", "3"]),
                      device, log=lambda line: None)


@pytest.mark.parametrize("lm_loss, grad_norm, nan", [(2.0, float("inf"), 0), (float("nan"), float("nan"), 1)])
def test_skipped_and_nan_iterations_are_counted_apart(monkeypatch, lm_loss, grad_norm, nan):
    skipped = StepResult(torch.tensor([lm_loss], dtype=torch.float64), 0, grad_norm, True)
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: skipped)
    lines = []
    with single_process_group() as device:
        loop.pretrain(parse_args(TINY_MOE + ["--train-iters", "1", "--log-interval", "1", "--lr-warmup-iters", "0"]),
                      device, lines.append)
    iteration_line = next(line for line in lines if line.startswith(" iteration"))  # after the memory report
    assert f"| number of skipped iterations:   1 | number of nan iterations: {nan:3d} |" in iteration_line


def test_pretrain_resolves_bf16_for_its_device(tmp_path):
    with single_process_group() as device:
        loop.pretrain(parse_args(TINY_MOE + ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(tmp_path)]),
                      device, log=lambda line: None)
    meta = json.loads(next(tmp_path.glob("iter_*/megadual_meta.json")).read_text())
    # BF16 on CUDA, FP32 on CPU: the checkpoint records the resolved run
    assert meta["config"]["train"]["bf16"] is (device.type == "cuda")


def test_log_line_has_megatron_shape():
    lines = []
    with single_process_group() as device:
        loop.pretrain(parse_args(TINY_MOE + ["--train-iters", "4", "--log-interval", "2"]), device, lines.append)
    assert lines[0].startswith(" > phase from iteration 0")  # what the run trains with (schedule, length, ...)
    lines = lines[1:]
    assert lines[0].startswith("[Rank 0] (after 1 iterations) memory (MB) |")  # once, after the first iteration
    lines = lines[1:]
    assert len(lines) == 2
    pattern = (r"^ iteration +2/ +4 \| consumed samples: +16 \| elapsed time per iteration \(ms\): [\d.]+ \| "
               r"tokens per second: [\d.]+ \| learning rate: [\d.]+E[-+]\d+ \| global batch size: +8 \| "
               r"lm loss: [\d.]+E[-+]\d+ \| load_balancing_loss: .* \| grad norm: [\d.]+ \| "
               r"number of skipped iterations: +0 \| number of nan iterations: +0 \|$")
    assert re.match(pattern, lines[0]), lines[0]


def test_bf16_autocast_trains_close_to_fp32():
    args = TINY_MOE + ["--train-iters", "3"]
    with single_process_group() as device:
        fp32 = loop.pretrain(parse_args(args + ["--no-bf16"]), device, log=lambda line: None).losses
        bf16 = loop.pretrain(parse_args(args + ["--bf16"]), device, log=lambda line: None).losses
    assert bf16 != fp32  # the GEMMs really ran in bf16
    assert bf16 == pytest.approx(fp32, rel=1e-3)
