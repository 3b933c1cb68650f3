"""One peer quantisation, run by scripts/bench_peers.py inside that peer's own virtual environment.

    .cache/peers/hqq/bin/python scripts/peer_worker.py hqq --bits 4 --model M --calib calib.pt --out DIR

Imports only torch, transformers and the peer library (never lrc: the peer's pins may conflict with it). Writes
    DIR/quantized/   the peer's own saved checkpoint, as a user of that tool gets it (its bytes are what we count)
    DIR/dense/       the same model with every quantised linear replaced by its dequantised float32 weight, plus
                     the tokenizer: lrc's evaluator scores this copy, so every tool is scored by the same code
    DIR/result.json  tool version, setting, seconds of the quantisation call (load and dense copy excluded) and,
                     for checkpoints that are not safetensors, the targeted linears' bytes counted from the file
Calibration is the token-id tensor at --calib (nsamples x seqlen, cut by lrc from its bundled train split).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def save_dense(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def run_hqq(args, model, tokenizer, out: Path) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size or 64)  # 64: HQQ's default
    start = time.perf_counter()
    # float16 is HQQ's default compute dtype: scales and zeros are stored in it, as its users get them
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float16, device="cpu")
    seconds = time.perf_counter() - start
    AutoHQQHFModel.save_quantized(model, str(out / "quantized"))
    weights = torch.load(out / "quantized" / "qmodel.pt", map_location="cpu", weights_only=False)
    target = sum(_nbytes(state) for name, state in weights.items() if ".layers." in name and "norm" not in name)
    for name, module in list(model.named_modules()):
        if isinstance(module, HQQLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantize().float().reshape(module.out_features, module.in_features)
            if module.bias is not None:
                dense.bias.data = module.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    model.float()
    save_dense(model, tokenizer, out / "dense")
    return {"setting": f"w{args.bits} g{config['weight_quant_params']['group_size']} (optimize=True, fp16 meta)",
            "seconds": seconds, "target_bytes": target}


def _nbytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    return 0  # meta entries that are plain numbers or strings live in the pickle's overhead, counted in the file size


def run_llmcompressor(args, model, tokenizer, out: Path, calib: torch.Tensor) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    group = args.group_size or 128
    if args.bits == 4 and group == 128:
        modifier = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], bypass_divisibility_checks=True)
        setting = "GPTQ W4A16 (preset: symmetric, g128)"
    else:  # no preset below 4 bits: the same scheme with num_bits changed
        weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
        modifier = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                ignore=["lm_head"], bypass_divisibility_checks=True)
        setting = f"GPTQ W{args.bits}A16 (symmetric, g{group})"
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])
    seconds = time.perf_counter() - start
    model.save_pretrained(out / "quantized", save_compressed=True)
    tokenizer.save_pretrained(out / "quantized")
    from transformers import CompressedTensorsConfig

    # run_compressed=False: transformers decompresses the packed weights on load (compressed-tensors' own code)
    dense = _dense_from_saved(args.model, out / "quantized",
                              quantization_config=CompressedTensorsConfig(run_compressed=False))
    save_dense(dense, tokenizer, out / "dense")
    return {"setting": setting, "seconds": seconds}


def _dense_from_saved(model_dir: str, folder: Path, **load_options):
    """The original model with each decoder linear's weight read back from the saved quantised checkpoint: loaded
    by the tool's own transformers integration, then probed with the identity (W^T = f(I) - f(0)), so the weights
    scored are exactly what the packed checkpoint computes, whatever its packing."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quantised = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **load_options).eval()
    read = 0
    with torch.no_grad():
        for name, module in dense.named_modules():
            if not isinstance(module, nn.Linear) or ".layers." not in name:
                continue
            loaded = quantised.get_submodule(name)
            weight = getattr(loaded, "weight", None)
            if type(loaded) is nn.Linear and weight is not None and weight.is_floating_point():
                module.weight.copy_(weight.float())
                read += 1
                continue
            eye = torch.eye(module.in_features)  # float32 in: the kernel's own output dtype is its rounding
            out = loaded(eye) - loaded(torch.zeros_like(eye[:1]))
            module.weight.copy_(out.float().T)
            read += 1
    if read == 0:
        raise RuntimeError(f"{folder}: no decoder linear could be read back")
    return dense


def _autoround_dense(model_dir: str, folder: Path, bits: int, group: int):
    """The original model with each decoder linear decoded from AutoRound's saved packing (auto_round:auto_gptq) by
    AutoRound's own torch kernel. Its transformers loader is not used: on CPU it maps linears whose width does not
    divide by the group (SmolLM2's 576 by 128) to a dense fake-quant module and leaves their weights random."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    with torch.no_grad():
        for name, module in dense.named_modules():
            if not isinstance(module, nn.Linear) or ".layers." not in name:
                continue
            # the kernel repeats each group's scale `group` times: a width that does not divide by the group is
            # decoded as the padded width (zero codes appended, 32 inputs per bits int32 rows) and cut back
            padded = -(-module.in_features // group) * group
            kernel = QuantLinear(bits, group, padded, module.out_features, bias=False)
            qweight = state[f"{name}.qweight"]
            qweight = torch.cat([qweight, qweight.new_zeros((padded - module.in_features) // 32 * bits,
                                                            qweight.shape[1])])
            for buffer, stored in (("qweight", qweight), ("qzeros", state[f"{name}.qzeros"]),
                                   ("scales", state[f"{name}.scales"])):
                if stored.shape != getattr(kernel, buffer).shape:
                    raise RuntimeError(f"{name}.{buffer}: stored {tuple(stored.shape)}, kernel expects "
                                       f"{tuple(getattr(kernel, buffer).shape)}")
                setattr(kernel, buffer, stored)
            module.weight.copy_(kernel(torch.eye(padded))[: module.in_features].float().T)
            if f"{name}.bias" in state:
                module.bias.copy_(state[f"{name}.bias"].float())
    return dense


def run_autoround(args, model, tokenizer, out: Path, calib: torch.Tensor) -> dict:
    from auto_round import AutoRound

    group = args.group_size or 128
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=group, sym=True,
                        dataset=[row.unsqueeze(0) for row in calib], iters=args.iters, nsamples=calib.shape[0],
                        seqlen=calib.shape[1], device_map="cpu", enable_torch_compile=False)
    start = time.perf_counter()
    rounder.quantize()
    seconds = time.perf_counter() - start
    rounder.save_quantized(str(out / "quantized"), format="auto_round")
    dense = _autoround_dense(args.model, out / "quantized", args.bits, group)
    save_dense(dense, tokenizer, out / "dense")
    light = "" if args.iters >= 200 else " (light)" if args.iters >= 50 else " (below the light setting's 50)"
    return {"setting": f"w{args.bits} g{group} sym, iters={args.iters}{light}, nsamples={calib.shape[0]}, "
                       f"seqlen={calib.shape[1]}", "seconds": seconds}


PACKAGES = {"hqq": "hqq", "llmcompressor": "llmcompressor", "autoround": "auto-round"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(PACKAGES))
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=None, help="default: the tool's own")
    parser.add_argument("--iters", type=int, default=200, help="AutoRound's tuning steps (200: its default)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    calib = torch.load(args.calib, weights_only=True)
    model, tokenizer = load(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tool == "hqq":
        result = run_hqq(args, model, tokenizer, args.out)
    elif args.tool == "llmcompressor":
        result = run_llmcompressor(args, model, tokenizer, args.out, calib)
    else:
        result = run_autoround(args, model, tokenizer, args.out, calib)
    result.update(tool=args.tool, version=version(PACKAGES[args.tool]), bits=args.bits)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
