"""A checkpoint written under one parallel layout resumes under another, as if never stopped."""
import pytest

from megadual import verify
from tests.helpers import TINY_MOE

# 500 tokens pad to 500 rows at TP1, 504 at TP2 and 512 at TP4: checkpoints hold the 500 real rows.
ARGS = TINY_MOE + ["--train-iters", "6", "--moe-router-bias-update-rate", "1e-2", "--vocab-size", "500",
                   "--make-vocab-size-divisible-by", "4"]


def losses(layout: str, *extra: str) -> list[float]:
    spec = verify.parse_layout(layout, ARGS)
    return verify.launch_all({layout: (spec.world, ARGS + spec.flags + list(extra))})[layout].logged["lm loss"]


@pytest.fixture(scope="module")
def straight():
    return losses("")


# (One process -> TP2 is within EP2 -> TP4; the distributed optimizer's and MTP's tests resume across
# DP, PP and optimizers.)
@pytest.mark.parametrize("saved, saved_flags, resumed", [("tp2,sp,ep2,dp2", ["--async-save"], ""),
                                                         ("ep2", ["--use-distributed-optimizer"], "tp4")],
                         ids=["TP2xEP2xDP2-async->1", "EP2-distributed-optimizer->TP4"])
def test_resume_under_another_layout(tmp_path, straight, saved, saved_flags, resumed):
    first = losses(saved, *saved_flags, "--save", str(tmp_path), "--save-interval", "3", "--exit-interval", "3")
    rest = losses(resumed, "--load", str(tmp_path))
    limit = max(verify.parse_layout(layout, ARGS).tolerance.logged for layout in (saved, resumed))
    assert first == pytest.approx(straight[:3], rel=limit, abs=0)
    assert rest == pytest.approx(straight[3:], rel=limit, abs=0)
