"""Steering vectors in other tools' formats, as plain functions over ``{layer: direction}`` (no SteeringVector
here, so that ``steerkit.vector`` can offer them as methods): llama.cpp control-vector GGUF files, and the vector
objects of repeng and steering-vectors."""
