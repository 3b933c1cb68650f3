"""Shared fixtures: tiny decoder models built in-process from configs (fp32, seeded random init)."""

from __future__ import annotations

import pytest
import torch

TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256,
)
TINY_ARCHS = ("llama", "qwen2", "mistral")


# Qwen2 with layer 0 on full attention and layer 1 on a 4-token sliding window: calibration windows longer than
# the window make the two layers' masks differ (what a runner replaying layer 0's arguments gets wrong).
SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)


def build_tiny(arch: str, *, seed: int = 0, correlated: bool = False, tie: bool = False, sliding: bool = False):
    """A 2-layer GQA model of `arch`. Qwen2's q/k/v biases get random non-zero values (init leaves them at zero).
    `sliding`: qwen2 only, layers of mixed attention types (see SLIDING). `correlated`: embeddings with a decaying spectrum, so layer inputs are strongly correlated like a real
    model's (random init alone gives near-isotropic inputs, where whitening has little to gain)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    if sliding and arch != "qwen2":
        raise ValueError("the mixed sliding/full attention tiny model is a qwen2")
    model = model_cls(config_cls(**TINY_SIZES, tie_word_embeddings=tie, **(SLIDING if sliding else {})))
    with torch.no_grad():
        if arch == "qwen2":
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
        if correlated:
            h = TINY_SIZES["hidden_size"]
            basis, _ = torch.linalg.qr(torch.randn(h, h))
            spectrum = 0.92 ** torch.arange(h, dtype=torch.float32)  # Gram eigenvalues span ~4e4
            emb = model.get_input_embeddings().weight
            emb.copy_((torch.randn(emb.shape[0], h) * spectrum) @ basis.T)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: `tiny_model("qwen2", correlated=True)` -> a fresh model (same seed -> same weights)."""
    return build_tiny


@pytest.fixture(scope="session")
def calib_ids():
    """Factory for calibration token ids (nsamples x seqlen LongTensor), seeded."""

    def make(nsamples: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, TINY_SIZES["vocab_size"], (nsamples, seqlen), generator=generator)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices in loops: with 2 threads on a busy 2-core machine, OpenMP contention makes a 64x64 SVD
    ~100x slower. Modules of tiny-model tests opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
