"""The layer-by-layer run: one decoder layer at a time, its inputs captured once, its statistics collected, its
targets decomposed and swapped, its outputs fed to the next layer (in memory or streamed from disk with
`--low-memory`), plus the Fisher pass, the planning pass, block refinement and the resume journal.

`run.py` is the run read top to bottom (load → targets → statistics / plan → layers → write → report); the other
modules are its steps.

May import: everything below it (leaves, `nn`, `methods`, `budget`, `registry`, `recipe`, `data`, `io`, `report`).
Nothing imports the pipeline but `compressor.api`, `compressor.cli` and `compressor.demo`.
"""
