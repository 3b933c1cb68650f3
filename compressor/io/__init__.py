"""Talking to the outside: writing and loading lrc checkpoints (atomic output directories, sharded safetensors),
exports (dense, compressed-tensors + PEFT adapter), the hub upload with its model card, and pre-flight checks of
a model source and an output path.

May import: the leaves, `nn` (the modules it saves and rebuilds) and `report` (the model card's tables). Never the
pipeline or the methods.
"""
