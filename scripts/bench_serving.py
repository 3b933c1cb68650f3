"""Bytes, logits and perplexity of `lrc export --serving` next to the lrc output it came from.

    .venv/bin/python scripts/bench_serving.py OUT EXPORTED [--max-windows N] [--threads 1]

Exports OUT to EXPORTED first when EXPORTED does not exist. Prints one JSON object:
- `lrc_bytes` / `export_bytes`: the tensor bytes of the safetensors files (OUT; EXPORTED/base + EXPORTED/adapter);
- `max_abs_logit_diff_fp32`: both loaded in fp32 — lrc through its exact reference path (no packed kernels), the
  export through transformers + compressed-tensors (+ PEFT for the adapter, cast to fp32 too) — over the first two
  evaluation windows;
- `perplexity_lrc` / `perplexity_export`: in the checkpoint's dtype on the bundled test split (PEFT with
  `autocast_adapter_dtype=False`, so the adapter runs in that dtype as lrc's residual does); `perplexity_lrc_kernels`:
  lrc as `from_pretrained` loads it (packed kernels).
Timings are not measured: on a shared machine they would mean little.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch


def tensor_bytes(folder: Path) -> int:
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(end - start for key, v in header.items() if key != "__metadata__"
                     for start, end in [v["data_offsets"]])
    return total


def load_export(exported: Path, dtype, *, autocast: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported / "base", dtype=dtype or "auto")
    if (exported / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, exported / "adapter", autocast_adapter_dtype=autocast)
    return model.eval()


def load_lrc(out: Path, dtype, *, kernels: bool):
    from compressor.io.checkpoint import load_compressed
    from compressor.nn.modules import prepare_inference

    model = load_compressed(out, dtype=dtype)
    prepare_inference(model, use_kernels=kernels)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("exported", type=Path)
    parser.add_argument("--max-windows", type=int, default=None, help="the first N windows (default: all)")
    parser.add_argument("--seqlen", type=int, default=None, help="evaluation window (default: lrc eval's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from compressor.data import eval_windows, load_texts
    from compressor.io.export_serving import export_serving
    from compressor.report.perplexity import perplexity

    if not args.exported.exists():
        export_serving(args.out, args.exported)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    config = json.loads((args.out / "config.json").read_text())
    seqlen = args.seqlen or min(2048, config.get("max_position_embeddings") or 2048)
    windows = eval_windows(tokenizer, load_texts(None, split_default="test")[0], seqlen)[:args.max_windows]

    with torch.no_grad():
        a = load_lrc(args.out, torch.float32, kernels=False)(windows[:2]).logits
        b = load_export(args.exported, torch.float32, autocast=True)(windows[:2]).logits  # the adapter in fp32 too
    result = {
        "lrc_bytes": tensor_bytes(args.out),
        "export_bytes": tensor_bytes(args.exported / "base") + tensor_bytes(args.exported / "adapter"),
        "max_abs_logit_diff_fp32": (a - b).abs().max().item(),
        "perplexity_lrc": perplexity(load_lrc(args.out, None, kernels=False), windows).ppl,
        "perplexity_export": perplexity(load_export(args.exported, None, autocast=False), windows).ppl,
        "perplexity_lrc_kernels": perplexity(load_lrc(args.out, None, kernels=True), windows).ppl,
        "windows": len(windows), "seqlen": seqlen, "threads": args.threads,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
