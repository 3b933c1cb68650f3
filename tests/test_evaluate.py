"""Perplexity: exact against hand-computed values, and cross-checked against Hugging Face's own loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor.report.perplexity import perplexity


class BigramModel(nn.Module):
    """Logits at position t depend only on token t, through a table set by hand: p(next | prev) is known."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)
        self.calls: list[dict] = []

    def forward(self, input_ids, **kwargs):
        self.calls.append(
            {"ids": input_ids.clone(), "grad": torch.is_grad_enabled(), "training": self.training, **kwargs}
        )
        return SimpleNamespace(logits=self.table[input_ids])


# Rows are log-probabilities, so softmax gives them back exactly: after token 0 the next token is
# 0 / 1 / 2 with probability 1/2, 1/4, 1/4; after 1: 1/8, 3/8, 1/2; after 2: uniform.
TABLE = [
    [math.log(1 / 2), math.log(1 / 4), math.log(1 / 4)],
    [math.log(1 / 8), math.log(3 / 8), math.log(1 / 2)],
    [0.0, 0.0, 0.0],
]


def test_bigram_perplexity_matches_hand_computation():
    windows = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 0, 1]])
    # Scored transitions (prev -> next) and their probabilities, written out:
    #   window 0: 0->1 (1/4), 1->2 (1/2), 2->0 (1/3)
    #   window 1: 1->1 (3/8), 1->0 (1/8), 0->2 (1/4)
    #   window 2: 2->0 (1/3), 0->0 (1/2), 0->1 (1/4)
    probs = [1 / 4, 1 / 2, 1 / 3, 3 / 8, 1 / 8, 1 / 4, 1 / 3, 1 / 2, 1 / 4]
    expected_nll = -sum(math.log(p) for p in probs) / 9
    result = perplexity(BigramModel(TABLE), windows, batch_size=2)
    assert result.tokens == 9
    assert result.windows == 3 and result.seqlen == 4
    assert result.nll == pytest.approx(expected_nll, abs=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected_nll), abs=1e-6)
    # The product of the nine probabilities is 3 / 147456 = 1 / 49152, so PPL = 49152 ** (1/9) = 3.32110...
    assert result.ppl == pytest.approx(49152 ** (1 / 9), abs=1e-6)
    assert result.ppl == pytest.approx(3.321103, abs=1e-6)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    windows = torch.randint(0, 5, (7, 11), generator=torch.Generator().manual_seed(0))
    result = perplexity(BigramModel([[0.0] * 5] * 5), windows, batch_size=3)
    assert result.ppl == pytest.approx(5.0, abs=1e-6)
    assert result.tokens == 7 * 10


def test_every_window_scored_once_in_order_without_grad_in_eval_mode():
    windows = torch.arange(15).remainder(3).view(5, 3)
    model = BigramModel(TABLE)
    model.train()
    seen = []
    perplexity(model, windows, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert [c["ids"].shape[0] for c in model.calls] == [2, 2, 1]
    assert torch.equal(torch.cat([c["ids"] for c in model.calls]), windows)
    assert not any(c["grad"] for c in model.calls)
    assert not any(c["training"] for c in model.calls)
    assert all(c.get("use_cache") is False for c in model.calls)
    assert model.training  # previous mode restored


def test_rejects_bad_windows():
    model = BigramModel(TABLE)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 4))  # float ids


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        attention_dropout=0.5,  # so that forgetting eval mode would change (and randomise) the result
    )
    return LlamaForCausalLM(config)


def test_llama_perplexity_matches_hf_loss(tiny_llama):
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    tiny_llama.eval()
    with torch.no_grad():
        # HF shifts labels internally and averages over all 6 * 15 predictions: the same definition.
        hf_loss = tiny_llama(input_ids=windows, labels=windows).loss.item()
    tiny_llama.train()
    result = perplexity(tiny_llama, windows, batch_size=4)
    assert result.tokens == 6 * 15
    assert result.nll == pytest.approx(hf_loss, abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert tiny_llama.training


def test_llama_perplexity_independent_of_batch_size(tiny_llama):
    windows = torch.randint(0, 128, (9, 12), generator=torch.Generator().manual_seed(2))
    one = perplexity(tiny_llama, windows, batch_size=1)
    eight = perplexity(tiny_llama, windows, batch_size=8)
    assert one.ppl == pytest.approx(eight.ppl, rel=1e-6)
    assert one.tokens == eight.tokens == 9 * 11
