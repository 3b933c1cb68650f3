"""Budget maths: rank <-> parameter ratio and byte counts, rank allocation across targets (uniform, energy, global),
and the byte-budget knapsack that picks one encoding per target under `--target-size`.

Pure functions on numbers and spectra. May import: the leaves (`compressor.errors`, `compressor.quant`,
`compressor.linalg`) and `compressor.registry`'s constants. Never `nn` modules, the pipeline, io or report.
"""
