"""The planted bugs, one file per area of the code (scripts/mutations_*.py): each a text to replace
once in one file, and the tests that must then fail (scripts/plant_bugs.py applies them;
docs/testing.md lists them). A new feature adds its bug to its area's file."""
from __future__ import annotations

import mutations_checkpoints
import mutations_layers
import mutations_pipeline
import mutations_planner
import mutations_tools
import mutations_training
from mutation import Mutation

__all__ = ["MUTATIONS", "Mutation"]

MUTATIONS = [*mutations_layers.MUTATIONS, *mutations_pipeline.MUTATIONS, *mutations_training.MUTATIONS, *mutations_checkpoints.MUTATIONS, *mutations_planner.MUTATIONS, *mutations_tools.MUTATIONS]
