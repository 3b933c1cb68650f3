"""lrc — post-training low-rank compression of LLMs.

    import compressor
    loaded = compressor.load_model("Qwen/Qwen2.5-0.5B")
    result = compressor.compress(loaded.model, "svd-llm-20", tokenizer=loaded.tokenizer)

Importing the package registers lrc with transformers' quantizer registry, so a compressed checkpoint loads
with plain `AutoModelForCausalLM.from_pretrained(out_dir)` (no trust_remote_code).
"""

__version__ = "0.1.0"

from compressor.nn import hf_integration as _hf_integration  # noqa: E402,F401  (side effect: registration)
from compressor.api import compress, evaluate, load_compressed, load_model  # noqa: E402

__all__ = ["compress", "evaluate", "load_compressed", "load_model", "__version__"]
