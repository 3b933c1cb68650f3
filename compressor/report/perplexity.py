"""Perplexity by the papers' protocol (GPTQ, SVD-LLM): windows from `data.eval_windows`, every next-token
prediction inside each window scored, PPL = exp(mean NLL over all scored tokens).

Cross-entropy is computed here rather than through the model's `labels=` loss so the token count is exact
and the sum is taken in float64 over all windows: averaging per-batch means would weight a short last batch
wrongly, and float32 sums drift over millions of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from compressor.data import eval_windows, load_texts


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored predictions: windows * (seqlen - 1)
    windows: int
    seqlen: int
    data: str = ""  # what text was scored (filled in by evaluate)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on `windows` (LongTensor, nwindows x seqlen), each window scored alone.

    `device`: where to send each batch of token ids (the model must already be there); None leaves them
    where they are. `progress(done, total)` is called after each batch with window counts.
    The model is run in eval mode (dropout off) and put back in its previous mode afterwards.
    """
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be a 2-D LongTensor, got {tuple(windows.shape)} {windows.dtype}")
    nwindows, seqlen = windows.shape
    if nwindows == 0 or seqlen < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, nwindows, batch_size):
                batch = windows[start : start + batch_size]
                if device is not None:
                    batch = batch.to(device)
                # use_cache=False: a KV cache is useless for one forward pass and costs GBs on 7B models.
                logits = model(input_ids=batch, use_cache=False).logits
                for row in range(batch.shape[0]):
                    # One window at a time: the float32 copy of (seqlen x vocab) logits stays bounded
                    # even when the model runs in bf16 with a 128k vocabulary.
                    nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="none")
                    total_nll += nll.double().sum().cpu()
                del logits
                if progress is not None:
                    progress(min(start + batch_size, nwindows), nwindows)
    finally:
        model.train(was_training)

    tokens = nwindows * (seqlen - 1)
    mean_nll = total_nll.item() / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, tokens=tokens, windows=nwindows, seqlen=seqlen)


def evaluate(model, tokenizer, data: str | None = None, *, seqlen: int = 2048, batch_size: int = 4,
             device=None, max_windows: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity on `data` (file/folder/hub dataset; default the bundled test split), papers' protocol."""
    texts, description = load_texts(data, split_default="test")
    windows = eval_windows(tokenizer, texts, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    result = perplexity(model, windows, batch_size=batch_size, device=device, progress=progress)
    return replace(result, data=description)
