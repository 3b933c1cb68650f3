"""A straightforward reference implementation of SVD-LLM (whitening + truncation), as the paper's repository does it.

This is the *baseline* that scripts/bench_compress.py times lrc against; it is not used by lrc itself. It follows
the published code's structure, written from the maths (not copied):
  1. the whole model in memory; one forward pass per calibration sequence (batch 1) with a hook on every linear
     of the decoder layers accumulating its own Gram XᵀX in fp32 (no sharing between q/k/v or gate/up);
  2. per linear: Cholesky of the Gram in fp64 (on failure: shift by the smallest eigenvalue + 1e-6 and retry),
     its inverse, full fp32 SVD of W·S, keep r = ⌊m·n·ratio/(m+n)⌋ terms, B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ S⁻¹;
  3. each linear becomes two linears (A then B).
Inputs of every layer are the dense model's (no sequential propagation), as in the repository's default mode.

    python scripts/reference_svd_llm.py models/lrc-demo-llama --ratio 0.8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def _decoder_linears(model) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


@torch.no_grad()
def profile_grams(model, batches: torch.Tensor) -> dict[str, torch.Tensor]:
    linears = _decoder_linears(model)
    grams = {name: 0 for name in linears}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().float()
            grams[name] = grams[name] + (x.transpose(1, 2) @ x).sum(0)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        for row in batches:
            model(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def _cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    g = gram.double()
    try:
        return torch.linalg.cholesky(g), False
    except RuntimeError:
        smallest = torch.linalg.eigvalsh(g)[0]
        g = g + (-smallest + 1e-6) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        return torch.linalg.cholesky(g), True


@torch.no_grad()
def whiten_and_truncate(model, grams: dict[str, torch.Tensor], ratio: float) -> int:
    """Replace every decoder linear in place; returns how many Grams needed the eigenvalue shift."""
    shifted = 0
    for name, linear in _decoder_linears(model).items():
        W = linear.weight.float()
        m, n = W.shape
        L, was_shifted = _cholesky(grams[name])
        shifted += was_shifted
        L_inv = torch.linalg.inv(L).float()
        U, s, Vh = torch.linalg.svd(W @ L.float(), full_matrices=False)
        r = int(m * n * ratio / (m + n))
        root = s[:r].sqrt()
        B = U[:, :r] * root
        A = (root[:, None] * Vh[:r]) @ L_inv
        first = nn.Linear(n, r, bias=False, dtype=W.dtype)
        second = nn.Linear(r, m, bias=linear.bias is not None, dtype=W.dtype)
        first.weight.copy_(A)
        second.weight.copy_(B)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Sequential(first, second))
    return shifted


def compress_reference(model, batches: torch.Tensor, ratio: float) -> dict:
    """Compress `model` in place; returns the phase times and the number of shifted Grams."""
    t0 = time.perf_counter()
    grams = profile_grams(model, batches)
    t1 = time.perf_counter()
    shifted = whiten_and_truncate(model, grams, ratio)
    t2 = time.perf_counter()
    return {"statistics": t1 - t0, "decomposition": t2 - t1, "compress_total": t2 - t0, "shifted_grams": shifted}


def main():
    from compressor import api
    from compressor.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--ratio", type=float, default=0.8, help="kept fraction of each matrix's parameters")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    loaded = api.load_model(args.model)
    recipe = load_recipe("svd-llm-20", (f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}"))
    batches, _ = api.calibration_data(loaded.tokenizer, recipe)
    print(compress_reference(loaded.model, batches, args.ratio))
    print("PPL", api.evaluate(loaded.model, loaded.tokenizer, seqlen=256).ppl)


if __name__ == "__main__":
    main()
