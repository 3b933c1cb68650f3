"""Quality on the shipped *trained* demo model: the method orderings the field's papers report must hold.

Margins were measured first (see the figures in each assertion's comment) and set well below them, so the
tests check the orderings, not the exact values. The recipes run as users run them (default recipe settings,
compressed-input propagation), except a smaller calibration set to keep the suite fast.
"""

import copy

import pytest
import torch

from compressor import api
from compressor.resources import demo_model_dir

MODEL = demo_model_dir() if (demo_model_dir() / "model.safetensors").is_file() else None
pytestmark = pytest.mark.skipif(MODEL is None, reason="shipped demo model missing (run scripts/train_demo_model.py)")

CALIB = ["calibration.nsamples=64", "calibration.seqlen=256"]


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    loaded = api.load_model(str(MODEL))
    seqlen = loaded.model.config.max_position_embeddings
    dense = api.evaluate(loaded.model, loaded.tokenizer, seqlen=seqlen).ppl
    return loaded, seqlen, dense


@pytest.fixture(scope="module")
def ppl(demo):
    loaded, seqlen, _ = demo
    cache = {}

    def measure(recipe):
        if recipe not in cache:
            from compressor.recipe import load_recipe

            # "name+key=value+...": a built-in recipe with --set style overrides
            name, *sets = recipe.split("+")
            extra = [f"allocation={s}" if "=" not in s else s for s in sets]
            model = copy.deepcopy(loaded.model)
            api.compress(model, load_recipe(name, CALIB + extra), tokenizer=loaded.tokenizer,
                         storage_dtype=loaded.storage_dtype)
            cache[recipe] = api.evaluate(model, loaded.tokenizer, seqlen=seqlen).ppl
        return cache[recipe]

    return measure


def test_whitening_beats_plain_svd_at_20_percent(demo, ppl):
    dense = demo[2]
    svd, svd_llm = ppl("svd-20"), ppl("svd-llm-20")
    assert dense < svd_llm < svd
    # measured (2026-11-23): dense 35.896, svd-20 36.376 (+0.480), svd-llm-20 36.053 (+0.157): 3.1x less damage
    assert (svd - dense) > 2.0 * (svd_llm - dense)


def test_eora_repairs_most_of_the_4bit_gap(demo, ppl):
    dense = demo[2]
    rtn, eora = ppl("rtn-4bit"), ppl("eora-4bit")
    assert eora < rtn
    # measured: rtn-4bit 35.956 (+0.060), eora-4bit 35.901 (+0.005): EoRA repairs ~92% of the 4-bit gap — at
    # 2.5× the bytes (size_ratio 0.26 vs 0.66 of the bf16 targets: the rank-64 residual is 0.40 on this model)
    assert (eora - dense) < 0.5 * (rtn - dense)


def test_more_compression_costs_more_perplexity(demo, ppl):
    dense = demo[2]
    # measured: svd-llm-40 36.262 (+0.367) vs svd-llm-20 (+0.157); whitened 40% still beats plain SVD at 20%
    assert (ppl("svd-llm-40") - dense) > 1.5 * (ppl("svd-llm-20") - dense)
    assert ppl("svd-llm-40") < ppl("svd-20")


@pytest.mark.parametrize("recipe", ["svd-llm-20", "svd-llm-40"])
def test_global_rank_allocation_beats_uniform_at_the_same_budget(demo, ppl, recipe):
    dense = demo[2]
    uniform, global_ = ppl(recipe), ppl(f"{recipe}+global")
    # measured: svd-llm-20 36.053 (+0.157) -> global 35.981 (+0.085); svd-llm-40 36.262 (+0.367) -> 36.084 (+0.188)
    assert (global_ - dense) < 0.75 * (uniform - dense)


def test_asvd_sits_between_plain_and_whitened_svd(ppl):
    # measured: svd-20 36.376 > asvd-20 36.350 > svd-llm-20 36.053 (the paper's ordering; a thin first gap here)
    assert ppl("svd-20") > ppl("asvd-20") > ppl("svd-llm-20") + 0.1


def test_lowrank_plus_sparse_against_svd_llm_at_equal_values_and_at_equal_bytes(ppl):
    # measured: keeping 50% of the targets' values (param_ratio 0.5), lowrank-sparse 36.334 beats svd-llm 36.484 —
    # but it stores 0.56× the dense bytes (values + a bitmask of its positions) against svd-llm's 0.50×. At equal
    # bytes (lowrank-sparse-50: size_ratio 0.5, positions included) it scores 36.616: worse than svd-llm.
    svd_llm = ppl("svd-llm-20+param_ratio=0.5")
    assert ppl("lowrank-sparse-50+param_ratio=0.5") < svd_llm - 0.05
    assert ppl("lowrank-sparse-50") > svd_llm


def test_eora_over_gptq_beats_eora_over_rtn_at_the_same_rank(demo, ppl):
    dense = demo[2]
    # measured at rank 8: rtn base 35.929 (+0.033), gptq base 35.911 (+0.015) — equal bytes (size_ratio 0.31 both).
    # Both bases on min/max ranges: GPTQ's range search (its default) doubles its damage on this tiny model (+0.030;
    # plain GPTQ 4-bit +0.020 -> +0.035) while it cuts SmolLM2's (docs/methods.md), so the bases compare without it.
    assert (ppl("eora-gptq-4bit+rank=8+clip=false") - dense) < 0.75 * (ppl("eora-4bit+rank=8") - dense)
