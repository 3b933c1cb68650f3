"""The runtime a compressed checkpoint needs: the modules that replace nn.Linear (low-rank, quantised, sparse, and
their mixtures), their packed kernels, the factor containers, and the transformers integration that rebuilds them
when `from_pretrained` loads an lrc checkpoint.

May import: the leaves (`compressor.errors`, `compressor.quant`, `compressor.linalg`) and itself. Never the pipeline,
the budget maths, the methods, io or report: loading a model must not pull in the compression machinery.
"""
