"""What a run tells its user: report.json / report.md (per-module errors, bytes, encodings), the plots, and the
perplexity evaluation.

May import: the leaves and `nn` (to count a module's stored bytes). Never the pipeline, methods, budget or io.
"""
