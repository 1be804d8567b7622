"""--fp8-format e4m3 trains through the FP8 GEMMs and stays close to the FP32 run."""
from megadual.config import parse_args
from megadual.training.loop import pretrain
from tests.helpers import TINY_MOE, single_process_group

ARGS = TINY_MOE + ["--train-iters", "4", "--hidden-size", "128", "--moe-ffn-hidden-size", "128"]


def losses(extra):
    with single_process_group() as device:
        return pretrain(parse_args(ARGS + extra), device, log=lambda line: None).losses


def test_fp8_losses_track_fp32_but_are_not_identical():
    fp32, fp8 = losses([]), losses(["--fp8-format", "e4m3"])
    assert fp8 != fp32  # the FP8 path really ran
    assert all(abs(a - b) / a < 5e-3 for a, b in zip(fp32, fp8)), (fp32, fp8)
