"""Hugging Face checkpoints, both ways: megadual <-> `DeepseekV3ForCausalLM` (transformers).

names.py: tensor names and the RoPE row order; config_map.py: ModelConfig <-> HF config.json and
the behaviours the two compute differently; safetensors_io.py: sharded safetensors with an index;
convert.py: the two conversions (scripts/convert_checkpoint.py is their command line).
"""
