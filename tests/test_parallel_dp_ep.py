"""Data and expert parallelism across real processes give the one-process losses."""
import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_pretrain

ARGS = TINY_MOE + ["--train-iters", "4", "--moe-router-bias-update-rate", "1e-2"]


@pytest.fixture(scope="module")
def single():
    return spawn_pretrain(1, ARGS)


@pytest.mark.parametrize("extra", [[], ["--expert-model-parallel-size", "2"]], ids=["DP2", "DP2xEP2"])
def test_two_process_losses_match_one_process(single, extra):
    losses = spawn_pretrain(2, ARGS + extra)
    assert losses == pytest.approx(single, rel=1e-5)


def test_fp8_dispatch_sends_quantized_tokens_and_tracks_bf16(single):
    base = ARGS + ["--expert-model-parallel-size", "2", "--fp8-format", "e4m3"]
    plain = spawn_pretrain(2, base)
    fp8_dispatch = spawn_pretrain(2, base + ["--moe-fp8-dispatch"])
    assert fp8_dispatch != plain  # the dispatched tokens really were quantized
    assert fp8_dispatch == pytest.approx(plain, rel=5e-3)
