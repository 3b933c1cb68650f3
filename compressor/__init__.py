"""lrc — post-training low-rank compression of LLMs."""

__version__ = "0.1.0"
