"""Convert checkpoints between megadual and Hugging Face's DeepseekV3ForCausalLM (megadual/hf/).

    python scripts/convert_checkpoint.py --to-hf CKPT_DIR OUT_DIR [--force] [--overwrite] [--max-shard-size-gb 5]
    python scripts/convert_checkpoint.py --from-hf HF_DIR CKPT_DIR [--force] [--overwrite] [pretrain_moe.py flags ...]

--to-hf writes config.json, model-*.safetensors and model.safetensors.index.json from the tracked
iteration of CKPT_DIR. --from-hf writes CKPT_DIR/iter_0000000/ with its tracker and
CKPT_DIR/hf_model.args (the architecture flags), for
`pretrain_moe.py @CKPT_DIR/hf_model.args --load CKPT_DIR --finetune ...` under any layout; the
pretrain_moe.py flags given here (e.g. --seq-length, --make-vocab-size-divisible-by) must be the
training run's. The output folder must be new or empty (--overwrite: write there anyway). With
--checkpoint-key-file (or $MEGADUAL_CHECKPOINT_KEY_FILE) --to-hf reads only a checkpoint signed with
that key and --from-hf signs the one it writes. Needs `pip install -r requirements-hf.txt`. Exit
status 2 on a refused conversion.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadual.config import ConfigError
from megadual.hf.config_map import UnsupportedModel
from megadual.hf.convert import export_checkpoint, import_checkpoint
from megadual.training.checkpoint import CheckpointError
from megadual.training.checkpoint.integrity import checkpoint_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"))
    direction.add_argument("--from-hf", nargs=2, metavar=("HF_DIR", "CKPT_DIR"))
    parser.add_argument("--force", action="store_true",
                        help="convert a model Hugging Face would compute differently (warns)")
    parser.add_argument("--overwrite", action="store_true", help="write into an output folder that holds files")
    parser.add_argument("--checkpoint-key-file", help="the key checkpoints are signed with (as pretrain_moe.py)")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    args, run_flags = parser.parse_known_args(argv)
    try:
        key = checkpoint_key(args.checkpoint_key_file)
        if args.to_hf:
            if run_flags:
                parser.error(f"--to-hf takes no run flags: {' '.join(run_flags)}")
            files = export_checkpoint(*args.to_hf, force=args.force, overwrite=args.overwrite, key=key,
                                      max_shard_bytes=int(args.max_shard_size_gb * 2**30))
            print(f"wrote {args.to_hf[1]}: config.json, {len(files)} safetensors shard(s) and their index")
        else:
            path = import_checkpoint(*args.from_hf, flags=run_flags, force=args.force, overwrite=args.overwrite,
                                     key=key)
            print(f"wrote {path}; train with: pretrain_moe.py @{args.from_hf[1]}/hf_model.args "
                  f"--load {args.from_hf[1]} --finetune ...")
    except (ConfigError, UnsupportedModel, CheckpointError, OSError) as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
