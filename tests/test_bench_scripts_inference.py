"""scripts/bench_inference.py's measurement on a tiny in-process Llama: the record's fields, not its speed."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compressor import api
from compressor.nn.modules import LowRankLinear, prepare_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_inference import Workload, kernel_bytes, measure  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_dense_vs_compressed_records():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    dense = LlamaForCausalLM(config).eval()
    compressed = copy.deepcopy(dense)
    batches = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    api.compress(compressed, "svd-20", batches=batches)
    assert any(isinstance(m, LowRankLinear) for m in compressed.modules())

    workload = Workload(vocab_size=64, seqlen=16, prefill_batches=(1, 2), decode_batches=(1, 2), prompt_len=4,
                        new_tokens=4)
    records = measure({"dense": dense, "svd 20%": compressed}, workload, repeats=1)

    assert set(records) == {"dense", "svd 20%"}
    for rec in records.values():
        assert set(rec) == {"weight_bytes", "kernel_bytes", "prefill_tok_s", "decode_tok_s", "seconds"}  # peak: CUDA
        assert set(rec["prefill_tok_s"]) == {"1×16", "2×16"}
        assert all(v > 0 and math.isfinite(v) for v in rec["prefill_tok_s"].values())
        assert set(rec["seconds"]) == {"prefill 1×16", "prefill 2×16", "generate b1 1", "generate b1 4",
                                       "generate b2 1", "generate b2 4"}
        assert set(rec["decode_tok_s"]) == {"b1", "b2"}
        for b in (1, 2):
            decode_s = rec["seconds"][f"generate b{b} 4"] - rec["seconds"][f"generate b{b} 1"]  # prefill cancels
            if decode_s > 0:  # a busy machine could reorder two ~ms timings of one repeat
                assert rec["decode_tok_s"][f"b{b}"] == pytest.approx(b * 3 / decode_s)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert records["dense"]["weight_bytes"] >= dense_bytes and records["dense"]["kernel_bytes"] == 0
    assert records["svd 20%"]["weight_bytes"] < records["dense"]["weight_bytes"]


def test_kernel_bytes_counts_the_packed_copies():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    api.compress(model, "rtn-4bit", batches=torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1)))
    prepare_inference(model)
    targets = 4 * 64 * 64 // 4 * 3 + 3 * 64 * 128  # q,o 64×64; k,v 32×64; gate, up, down 64×128
    assert targets // 2 <= kernel_bytes(model) <= targets  # 4-bit codes (½ byte) + bf16 scales/zeros per 64
