"""Issue 25 item 1: every encoding `auto` offers by default runs on a packed kernel or a dense GEMM, so
`--target-size` never returns layers that dequantise on every forward unless asked (`speed: any`, or a
`candidates` list naming such encodings). The kernels' own exactness (3-/2-bit on int4, per-row 5-7-bit on int8) is
in tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch

from compressor.methods import auto
from compressor.methods.auto import AutoOptions
from compressor.pipeline.stats import Stats
from tests.helpers import one_error_line, run
from tests.test_target_size import FAST, tied  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PACKED = {"svd-llm", "gptq-8bit", "gptq-6bit", "gptq-5bit", "gptq-4bit", "gptq-3bit", "gptq-8bit+eora", "gptq-4bit+eora",
          "gptq-3bit+eora"}


def _case(m=64, n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, n, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g), Stats(count=400, gram=x.T @ x)


def _offered(options, m=64, n=128) -> set:
    w, stats = _case(m, n)
    return {c.encoding[0] for c in auto.choices(w, stats, options, None) if c.encoding}


def test_default_offers_only_encodings_with_a_packed_path():
    assert AutoOptions().speed == "packed"  # resolved, so the report and the output's recipe say it
    assert _offered(AutoOptions(group_size=32, rank_step=8)) == PACKED


def test_speed_any_and_a_candidates_list_offer_what_they_name():
    assert _offered(AutoOptions(group_size=32, rank_step=8, speed="any")) == set(auto.ALL)
    named = ("gptq-6bit", "svd-llm-int8")
    assert AutoOptions(candidates=named).speed == "any"
    assert _offered(AutoOptions(group_size=32, rank_step=8, candidates=named)) == set(named)
    # packed: 6-bit with one scale per row (the int8 kernel's layout); quantised factors have no kernel
    assert _offered(AutoOptions(group_size=32, rank_step=8, candidates=named, speed="packed")) == {"gptq-6bit"}
    # a group size asked for explicitly is honoured, and then 6-bit has no kernel
    assert _offered(AutoOptions(group_size=32, group_size_mid=32, rank_step=8, candidates=named,
                                speed="packed")) == set()


def test_packed_follows_each_targets_shape():
    # out_features 40: the CPU int4 kernel needs a multiple of 16, so 4-/3-bit GPTQ is not offered there
    assert _offered(AutoOptions(group_size=32, rank_step=8), m=40) == {"svd-llm", "gptq-8bit", "gptq-6bit",
                                                                        "gptq-5bit", "gptq-8bit+eora"}
    # 6-bit with one group per row runs on the int8 kernel
    assert "gptq-6bit" in _offered(AutoOptions(group_size=128, rank_step=8, speed="packed",
                                               candidates=("gptq-6bit", "gptq-4bit")))


def test_packed_six_and_five_bit_take_one_scale_per_row_and_run_on_the_int8_kernel():
    from compressor.budget.rank import packed_bytes
    from compressor.nn.modules import module_from_factors

    w, stats = _case()
    packed = auto._Target(w, stats, AutoOptions(group_size=32))
    grouped = auto._Target(w, stats, AutoOptions(group_size=32, speed="any"))
    for name, bits in (("gptq-6bit", 6), ("gptq-5bit", 5)):
        q = packed.build(name, 0)
        assert q.group_size == 128 and q.scales.shape == (64, 1)
        assert packed.bytes(name, 0) == packed_bytes(64, 128, bits, 128) < grouped.bytes(name, 0)
        assert grouped.build(name, 0).group_size == 32
        module = module_from_factors(q, None, torch.float32)
        assert module.prepare() == "int8"
        x = torch.randn(3, 128)
        exact = x @ q.dequantized().float().T  # the kernel takes bf16 activations (its exactness: test_kernels.py)
        assert (module(x) - exact).norm() < 1e-2 * exact.norm()


def test_uniform_error_names_speed_in_one_line():
    w, stats = _case()
    options = AutoOptions(size_ratio=0.1, group_size=32, candidates=("gptq-4bit", "gptq-6bit"), speed="packed")
    with pytest.raises(Exception, match="speed: any") as caught:
        auto.decompose(w[None], stats, options)
    assert "\n" not in str(caught.value)


def test_target_size_output_runs_every_layer_on_a_kernel(tied, tmp_path):  # noqa: F811
    from compressor.api import load_compressed
    from compressor.nn.modules import QuantLinear, QuantLowRankLinear

    out = tmp_path / "out"
    model, calib = tied
    result = run("compress", model, "-o", out, "--calib", calib, *FAST, "--target-size", "0.4")
    assert result.exit_code == 0, result.output
    loaded = load_compressed(out)
    modules = list(loaded.modules())
    assert not any(isinstance(m, QuantLowRankLinear) for m in modules)
    quant = [m for m in modules if isinstance(m, QuantLinear)]
    assert quant and all(m.prepare() != "dequantize" for m in quant)


def test_infeasible_size_stays_one_line(tied, tmp_path):  # noqa: F811
    model, calib = tied
    result = run("compress", model, "-o", tmp_path / "o", "--calib", calib, *FAST, "--target-size", "0.01")
    assert result.exit_code == 2
    one_error_line(result, "")
