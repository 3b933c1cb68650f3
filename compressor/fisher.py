"""Diagonal Fisher information of the targeted weights: squared gradients of the LM loss (for `fwsvd`).

    fisher = collect_fisher(model, batches, ["model.layers.0.mlp.up_proj", ...], device="cuda", batch_size=8)
    fisher["model.layers.0.mlp.up_proj"].out   # (m,) fp64: Σ_batches Σ_j (∂L/∂W_ij)²  (one per output row)
    fisher["model.layers.0.mlp.up_proj"].in_   # (n,) fp64: Σ_batches Σ_i (∂L/∂W_ij)²  (one per input column)

I_ij ≈ Σ_b (∂L_b/∂W_ij)², L_b the mean next-token cross-entropy of calibration chunk b
(`model(input_ids=chunk, labels=chunk).loss`, `batch_size` windows per chunk). This is the empirical Fisher of
Hsu et al. (2022) taken per chunk, not per sample, so its value depends on `batch_size` (its overall scale
does not matter to fwsvd, which is invariant to scaling the importance). Both axis sums are collected — they
cost m + n numbers per module, nothing next to the gradient itself — so `fwsvd`'s `axis` option can pick
either without a second backward pass, and the pipeline never needs to read a method's options.

Lifecycle: freeze every parameter but the targeted weights → model on `device`, eval mode (no dropout) →
per chunk: forward + backward; a post-accumulate-grad hook on each targeted weight folds its gradient into the
two fp64 sums and frees it at once (`p.grad = None`) → afterwards the hooks are removed, `requires_grad`, the
training mode and the model's device are restored, and no `.grad` is left anywhere.

Memory plan (the honest limitation): this runs the WHOLE model forward and backward on `device`, unlike the
layer-by-layer statistics pass. Peak ≈ the weights + the autograd activations of one chunk (about what
training with batch `batch_size` needs, without optimizer state) + the gradient of the largest single weight
(each is reduced and freed as soon as it is complete, so gradients never pile up for the whole model) + the
fp64 sums (m + n per module). Lower `batch_size` to fit; a layer-wise backward (keeping only one decoder layer
on the device and streaming the activations' gradients backwards) is future work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class FisherDiag(NamedTuple):
    """Diagonal Fisher of one (m, n) weight collapsed along each axis; fp64 on CPU."""

    out: torch.Tensor  # (m,): summed over input columns
    in_: torch.Tensor  # (n,): summed over output rows


def collect_fisher(
    model: nn.Module, batches: torch.Tensor, target_names, *, device="cpu", batch_size: int = 8
) -> dict[str, FisherDiag]:
    """Squared LM-loss gradients of the weights of `target_names` (nn.Linear names), summed over chunks of
    `batch_size` rows of `batches` (token ids, nsamples × seqlen). The model is returned unchanged."""
    names = list(dict.fromkeys(target_names))
    weights = {name: model.get_submodule(name).weight for name in names}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads_before = [p.grad for p in params]
    was_training = model.training
    home = next(iter(params)).device
    sums = {name: [torch.zeros(w.shape[0], dtype=torch.float64, device=device),
                   torch.zeros(w.shape[1], dtype=torch.float64, device=device)] for name, w in weights.items()}
    handles = []

    def fold(name):
        def hook(p):
            g = p.grad.to(torch.float32).square_()
            sums[name][0].add_(g.sum(1, dtype=torch.float64))
            sums[name][1].add_(g.sum(0, dtype=torch.float64))
            p.grad = None  # reduced: free it before the next weight's gradient arrives

        return hook

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(fold(name)))
        model.to(device)
        model.eval()
        with torch.enable_grad():
            for start in range(0, batches.shape[0], batch_size):
                chunk = batches[start : start + batch_size].to(device)
                loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
                loss.backward()
                del loss
    finally:
        for handle in handles:
            handle.remove()
        model.to(home)
        for p, flag, grad in zip(params, flags, grads_before):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return {name: FisherDiag(out.cpu(), in_.cpu()) for name, (out, in_) in sums.items()}
