"""Weight space: lazy checkpoint I/O, task vectors, merging, baking steering vectors into weights."""

from steerkit.checkpoint import CheckpointReader, CheckpointWriter
from steerkit.weights.bake import FAMILIES, bake
from steerkit.weights.merge import merge
from steerkit.weights.taskvec import TaskVector

__all__ = ["FAMILIES", "CheckpointReader", "CheckpointWriter", "TaskVector", "bake", "merge"]
