"""lrc — post-training low-rank compression of LLMs.

    import compressor
    loaded = compressor.load_model("Qwen/Qwen2.5-0.5B")
    result = compressor.compress(loaded.model, "svd-llm-20", tokenizer=loaded.tokenizer)

Importing the package registers lrc with transformers' quantizer registry, so a compressed checkpoint loads
with plain `AutoModelForCausalLM.from_pretrained(out_dir)` (no trust_remote_code).

Sub-packages, lower to higher (a package imports only those before it):
- leaves: `errors`, `linalg`, `quant`, `resources`, `data`; `registry` and `recipe` (names → methods, the schema);
- `nn`: the modules a loaded checkpoint uses, their kernels, the transformers integration;
- `budget` (rank and byte maths, allocation) and `methods` (one pure function per file);
- `report` (report, plots, perplexity), then `io` (checkpoints, exports, hub, pre-flight);
- `pipeline`: the layer-by-layer run (`pipeline/run.py` reads top to bottom);
- `api` (the edge: inputs checked and parsed once) and `cli` over it.
The API below is imported on first use, so `import compressor` (what loading a checkpoint needs) stays light.
"""

__version__ = "0.1.0"

from compressor.nn import hf_integration as _hf_integration  # noqa: E402,F401  (side effect: registration)

__all__ = ["compress", "evaluate", "load_compressed", "load_model", "__version__"]


def __getattr__(name: str):
    if name in ("compress", "evaluate", "load_compressed", "load_model"):
        from compressor import api

        return getattr(api, name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
