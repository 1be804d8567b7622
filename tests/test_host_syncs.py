"""The device contract and the host-sync budget, checked on the CPU.

A collective given a tensor off the run's device, of a dtype NCCL does not carry, or
non-contiguous is refused naming the line that passed it (parallel/collectives.py). Under
MEGADUAL_DEVICE_CHECK (tests/conftest.py sets it for the suite) a step that makes a tensor
without a device or brings a value to the host outside the allowed list fails naming the line
(training/device_check.py), and each step counts its host transfers: one per MoE layer per
micro-batch forward (the dispatch counts) and one for the step (the gradient norm and whether
the step is finite, which decide the update); the logged values stay on the device until
--log-interval prints them, one more transfer on a step that logs. The same budget under EP2 and
PP2 DualPipe x TP2 x EP2 is held in test_parallel_layouts.py and test_parallel_pp.py (their runs
count too).
"""
import os

import pytest
import torch

from megadual.arguments import parse_args
from megadual.parallel import collectives
from megadual.training import device_check
from megadual.training.loop import pretrain
from tests.helpers import TINY_MOE, single_process_group

MICRO_BATCHES = 4  # TINY_MOE: global batch 8 of micro-batches of 2, one process
MOE_LAYERS = 2  # 3 layers, the first dense


def test_one_process_step_holds_the_sync_budget_and_the_device_contract():
    assert device_check.enabled()  # conftest: every step of the suite is watched
    config = parse_args(TINY_MOE + ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1"])
    with single_process_group() as device:
        result = pretrain(config, device, log=lambda line: None)
    assert [step.host_syncs for step in result.steps] == [MOE_LAYERS * MICRO_BATCHES + 1] * 2
    assert len(result.validation_losses) == 1


def test_only_a_step_that_logs_brings_the_logged_values_over_and_the_line_averages_the_interval():
    """--log-interval 2: steps 1 and 3 keep their losses and routing statistics on the device, steps 2
    and 4 bring the interval's over in one transfer; the line averages the interval's steps as
    Megatron's does (the maxima its maxima, the grad norm the last step's)."""
    lines = []
    config = parse_args(TINY_MOE + ["--train-iters", "4", "--log-interval", "2",
                                    "--moe-router-bias-update-rate", "1e-2"])
    with single_process_group() as device:
        result = pretrain(config, device, log=lines.append)
    layers = MOE_LAYERS * MICRO_BATCHES
    assert [step.host_syncs for step in result.steps] == [layers + 1, layers + 2] * 2
    logged = [line for line in lines if line.startswith(" iteration")]
    assert len(logged) == 2
    for line, steps in zip(logged, (result.steps[:2], result.steps[2:])):
        routing = [step.routing for step in steps]
        inter = sum(r.inter_node_rows_per_token for r in routing) / 2
        intra = sum(r.intra_node_rows_per_token for r in routing) / 2
        expected = [f"lm loss: {sum(step.lm_loss for step in steps) / 2:.6E}",
                    f"load_balancing_loss: {sum(r.aux_loss for r in routing) / 2:.6E}",
                    f"moe max/mean expert load: {max(r.max_over_mean_load for r in routing):.3f}",
                    f"moe nodes per token: mean {sum(r.nodes_per_token_mean for r in routing) / 2:.2f} "
                    f"max {max(r.nodes_per_token_max for r in routing)}",
                    f"moe inter-node rows per token: {inter:.3f}",
                    f"moe intra-node rows per token: {intra:.3f}",
                    f"grad norm: {steps[1].grad_norm:.3f}"]
        assert all(f"| {field} |" in line for field in expected), (expected, line)
    assert result.steps[0].lm_loss != result.steps[1].lm_loss  # the average is not either step's


def test_a_host_tensor_and_a_host_transfer_in_a_step_are_named_by_line():
    """What the watch sees in megadual's own code (here a code object compiled under its folder)."""
    planted = compile("x = torch.zeros(())\ny = torch.ones(3, device=d)\nz = float(y.sum())\n",
                      os.path.join(device_check.PACKAGE, "training", "planted.py"), "exec")
    with pytest.raises(device_check.DeviceCheckError) as error:
        with device_check.watched("a step"):
            exec(planted, {"torch": torch, "d": torch.device("cpu")})
    lines = str(error.value).splitlines()[1:]
    assert [line.strip() for line in lines] == ["megadual/training/planted.py:1 (<module>): no device: torch.zeros",
                                                "megadual/training/planted.py:3 (<module>): sync: float"]
    with device_check.watched("a step") as watch:  # outside megadual (this file): not the step's own
        torch.zeros(()).item()
    assert watch.events == []


def test_collectives_refuse_what_nccl_would_and_name_the_line():
    collectives.use_device(torch.device("meta"))  # stands in for the run's GPU
    try:
        with pytest.raises(collectives.ContractError, match=r"tests/test_host_syncs.py:\d+ .*all_reduce of a "
                                                            r"tensor on cpu; this run's collectives take "
                                                            r"tensors on meta"):
            collectives.all_reduce(torch.zeros(2))
        with pytest.raises(collectives.ContractError, match="int16 tensor, which NCCL does not carry"):
            collectives.check(torch.zeros(2, dtype=torch.int16, device="meta"), "all_reduce")
        with pytest.raises(collectives.ContractError, match="non-contiguous"):
            collectives.check(torch.zeros(2, 3, device="meta").t(), "all_reduce")
        with pytest.raises(collectives.ContractError, match="the host group takes CPU tensors"):
            collectives.check(torch.zeros(2, device="meta"), "all_reduce", host=True)
        collectives.check(torch.zeros(2, dtype=torch.bfloat16, device="meta"), "all_reduce")
    finally:
        collectives.use_device(None)
