"""A checkpoint written under one parallel layout resumes under another, as if never stopped."""
import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_pretrain

ARGS = TINY_MOE + ["--train-iters", "6", "--moe-router-bias-update-rate", "1e-2"]
TP2_EP2_DP2 = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"]
TP2 = ["--tensor-model-parallel-size", "2"]
EP2 = ["--expert-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def straight():
    return spawn_pretrain(1, ARGS)


@pytest.mark.parametrize("saved, resumed", [((4, TP2_EP2_DP2 + ["--async-save"]), (1, [])), ((1, []), (2, TP2)),
                                            ((2, EP2), (2, TP2))],
                         ids=["TP2xEP2xDP2-async->1", "1->TP2", "EP2->TP2"])
def test_resume_under_another_layout(tmp_path, straight, saved, resumed):
    save = ["--save", str(tmp_path), "--save-interval", "3", "--exit-interval", "3"]
    first = spawn_pretrain(saved[0], ARGS + saved[1] + save)
    rest = spawn_pretrain(resumed[0], ARGS + resumed[1] + ["--load", str(tmp_path)])
    assert first == pytest.approx(straight[:3], rel=1e-5)
    assert rest == pytest.approx(straight[3:], rel=1e-5)
