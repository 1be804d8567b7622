"""examples/deepseek_v3_recipe.sh at tiny scale: every phase runs, in order, through one checkpoint
directory, and each logged step's batch, LR, bias update speed, MTP weight and sequence length
follow DeepSeek-V3's report (4.2, 4.3) with its token counts scaled down (the rules are written
out here, not read from megadual)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, GBS, START, INCREMENT, RAMP_TOKENS, WARMUP_STEPS = 8, 8, 2, 2, 96, 2
CONSTANT, DECAY, LOW, FINAL = 368, 128, 64, 64  # tokens; the report's 10T, 4.3T, 333B, 167B
LR, DECAYED_LR, FINAL_LR = 2.2e-4, 2.2e-5, 7.3e-6
EXT = [(64, 2), (256, 1)]  # (sequence length, batch): the report's 32K x 1920 and 128K x 480
EXT_STEPS = 2
TINY_MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 2 --multi-latent-attention --kv-lora-rank 16 "
              "--qk-head-dim 8 --qk-pos-emb-head-dim 8 --v-head-dim 8 --num-experts 4 --moe-router-topk 2 "
              "--moe-ffn-hidden-size 16 --moe-first-k-dense 1 --mtp-num-layers 1 --micro-batch-size 2 "
              "--log-interval 1")  # micro-batches of 2 (fewer to run); of 1 in the extensions (batch 1)


def run_recipe(save: Path) -> str:
    env = {**os.environ, "SAVE": str(save), "LAUNCH": f"{sys.executable} pretrain_moe.py",
           "DATA_ARGS": "--mock-data --vocab-size 64", "MODEL_ARGS": TINY_MODEL,
           "SEQ": str(SEQ), "GBS": str(GBS), "RAMP_START": str(START), "RAMP_INCREMENT": str(INCREMENT),
           "RAMP_TOKENS": str(RAMP_TOKENS), "WARMUP_STEPS": str(WARMUP_STEPS), "CONSTANT_TOKENS": str(CONSTANT),
           "DECAY_TOKENS": str(DECAY), "LOW_LR_TOKENS": str(LOW), "FINAL_LR_TOKENS": str(FINAL),
           "EXT_ARGS": "--micro-batch-size 1", "EXT_STEPS": str(EXT_STEPS), "EXT1_SEQ": str(EXT[0][0]), "EXT1_GBS": str(EXT[0][1]),
           "EXT2_SEQ": str(EXT[1][0]), "EXT2_GBS": str(EXT[1][1])}
    done = subprocess.run(["bash", "examples/deepseek_v3_recipe.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def phases(log: str) -> list[tuple[dict, list[dict]]]:
    """Each phase's start line (its settings) and its iterations (consumed before, batch, LR)."""
    found = []
    for line in log.splitlines():
        if line.startswith(" > phase from"):
            settings = dict(re.findall(r"(seq length|rope scaling factor|moe router bias update rate|"
                                       r"mtp loss scaling factor): (\S+)", line))
            found.append(({k: float(v) for k, v in settings.items()}, []))
        step = re.search(r"consumed samples: +(\d+) .*learning rate: (\S+) \| global batch size: +(\d+)", line)
        if step:
            after, lr, batch = int(step.group(1)), float(step.group(2)), int(step.group(3))
            found[-1][1].append({"before": after - batch, "lr": lr, "batch": batch})
    return found


def ramp_batch(consumed: int) -> int:
    """Megatron's rule: START + INCREMENT * floor(consumed / samples per increment), up to the batch."""
    ramp_samples = RAMP_TOKENS // SEQ
    if consumed > ramp_samples:
        return GBS
    per_increment = ramp_samples / ((GBS - START) // INCREMENT)
    return min(START + INCREMENT * math.floor(consumed / per_increment), GBS)


def report_lr(tokens: int, batch: int) -> float:
    """Warm-up over WARMUP_STEPS steps at the starting batch (an update's own samples count, as in
    megadual), constant to CONSTANT tokens, cosine to DECAYED_LR over DECAY, then two constants."""
    warmup = WARMUP_STEPS * START * SEQ
    if tokens < warmup:
        return LR * min(tokens + batch * SEQ, warmup) / warmup
    if tokens < CONSTANT:
        return LR
    if tokens < CONSTANT + DECAY:
        return DECAYED_LR + 0.5 * (math.cos(math.pi * (tokens - CONSTANT) / DECAY) + 1) * (LR - DECAYED_LR)
    return DECAYED_LR if tokens < CONSTANT + DECAY + LOW else FINAL_LR


def test_recipe_runs_every_phase_by_the_reports_rules(tmp_path):
    found = phases(run_recipe(tmp_path / "ckpt"))
    assert len(found) == 6
    pretraining, extensions = found[:4], found[4:]
    consumed = 0
    for settings, steps in pretraining:
        assert settings["seq length"] == SEQ and settings["rope scaling factor"] == 1.0
        for step in steps:
            tokens = step["before"] * SEQ
            assert step["before"] == consumed  # each phase continues where the last one stopped
            assert step["batch"] == ramp_batch(step["before"])
            assert math.isclose(step["lr"], report_lr(tokens, step["batch"]), rel_tol=1e-6), (tokens, step)
            assert settings["mtp loss scaling factor"] == (0.3 if tokens < CONSTANT else 0.1)
            assert settings["moe router bias update rate"] == (0.001 if tokens < CONSTANT + DECAY else 0.0)
            consumed += step["batch"]
    assert consumed * SEQ == CONSTANT + DECAY + LOW + FINAL
    assert [step["batch"] for step in pretraining[0][1][:4]] == [2, 2, 4, 6]  # the ramp, seen in the log
    for (settings, steps), (length, batch) in zip(extensions, EXT):
        assert settings["seq length"] == length and settings["rope scaling factor"] == 40.0
        assert settings["moe router bias update rate"] == 0.0 and settings["mtp loss scaling factor"] == 0.1
        assert len(steps) == EXT_STEPS
        assert all(step["batch"] == batch and step["lr"] == FINAL_LR for step in steps)
    save = tmp_path / "ckpt"
    last = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    meta = json.loads((save / f"iter_{int(last):07d}" / "megadual_meta.json").read_text())
    assert meta["config"]["model"]["seq_length"] == EXT[-1][0]
    assert meta["config"]["model"]["rope_scaling_factor"] == 40.0
