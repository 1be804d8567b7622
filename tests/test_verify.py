"""The layout checker's command line, layout grammar and tolerance classes."""
import pytest

from megadual import verify
from tests.helpers import TINY_MOE


def test_layout_items_become_pretrain_flags():
    spec = verify.parse_layout("pp2:dualpipe, tp2, sp, ep4, --no-pipeline-split-backward", TINY_MOE)
    assert (spec.tp, spec.ep, spec.dp, spec.pp, spec.world) == (2, 4, 2, 2, 8)  # DP: the least that holds EP4
    flags = " ".join(spec.flags)
    for expected in ["--tensor-model-parallel-size 2", "--expert-model-parallel-size 4",
                     "--pipeline-model-parallel-size 2 --pipeline-schedule dualpipe", "--sequence-parallel",
                     "--moe-ranks-per-node 8", "--no-pipeline-split-backward"]:
        assert expected in flags
    assert verify.parse_layout("dp3", TINY_MOE).world == 3


def test_nodes_make_the_one_process_run_route_over_as_many_virtual_nodes():
    assert verify.parse_layout("ep4,nodes2", TINY_MOE).reference_flags == ("--moe-router-num-groups", "2")
    assert verify.parse_layout("ep2,dp4,nodes2", TINY_MOE).reference_flags == ()  # EP within a node
    assert verify.parse_layout("ep4,nodes2", TINY_MOE + ["--num-experts", "0"]).reference_flags == ()


@pytest.mark.parametrize("text, message", [("tp2,tq2", "'tq2' is not"), ("dp3,nodes2", "into 2 nodes")])
def test_a_bad_layout_is_named(text, message):
    with pytest.raises(ValueError, match=message):
        verify.parse_layout(text, TINY_MOE)


def test_tolerance_classes():
    tolerance = lambda text: verify.parse_layout(text, TINY_MOE).tolerance
    assert tolerance("pp4:dualpipev") == verify.TOLERANCES["exact"]
    assert tolerance("pp4").grads == 0.0
    assert tolerance("pp4:dualpipe").name == "DualPipe"
    combined = tolerance("pp2:dualpipe,tp2,dp2")
    assert combined.name == "DP+TP+DualPipe"
    assert combined.grads == sum(verify.TOLERANCES[k].grads for k in ("DP", "TP", "DualPipe"))
    with_mtp = lambda text: verify.parse_layout(text, TINY_MOE + ["--mtp-num-layers", "1"]).tolerance
    assert with_mtp("pp4:dualpipev").name == "DualPipe" and with_mtp("tp2").name == "TP"


def test_command_passes_an_equal_layout_and_fails_a_different_one_naming_the_tensor(capsys):
    """The second layout changes the bias update rate: its routers' biases end up elsewhere."""
    status = verify.main(TINY_MOE + ["--layouts", "dp2", "dp2,--moe-router-bias-update-rate=0", "--iters", "2"])
    out = capsys.readouterr().out
    print(out)
    passed, failed = out.split("dp2,--moe-router-bias-update-rate=0:")
    assert status == 1
    assert passed.startswith("dp2: 2 processes vs one, 2 iterations") and passed.rstrip().endswith("PASS")
    final_values = next(line for line in failed.splitlines() if "final values" in line)
    assert "FAIL" in final_values and "layers.1.mlp.router.expert_bias" in final_values
    assert failed.rstrip().endswith("FAIL")


def test_command_refuses_a_bad_layout_or_flag_before_launching(capsys):
    assert verify.main(TINY_MOE + ["--layouts", "xp2"]) == 2
    assert "'xp2' is not" in capsys.readouterr().err
    assert verify.main(TINY_MOE + ["--layouts", "dp2", "--iters", "1"]) == 2
    assert "--lr-warmup-iters" in capsys.readouterr().err


def test_command_names_the_flag_a_layout_cannot_take(capsys):
    assert verify.main(TINY_MOE + ["--layouts", "tp3", "--iters", "2"]) == 2  # refused before any launch
    assert "--tensor-model-parallel-size (3)" in capsys.readouterr().err
