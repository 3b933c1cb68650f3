"""Diagonal Fisher information of the targeted weights: squared gradients of the LM loss (for `fwsvd`; and of
their outputs, for rank allocation `weight: loss`).

    fisher = collect_fisher(model, batches, ["model.layers.0.mlp.up_proj", ...], device="cuda", batch_size=8)
    fisher["model.layers.0.mlp.up_proj"].out   # (m,) fp64: Σ_chunks Σ_j (∂L_c/∂W_ij)²  (one per output row)
    fisher["model.layers.0.mlp.up_proj"].in_   # (n,) fp64: Σ_chunks Σ_i (∂L_c/∂W_ij)²  (one per input column)
    fisher["model.layers.0.mlp.up_proj"].output_grad_sq  # (m,) fp64: Σ_chunks Σ_t (∂L_c/∂y_ti)²  (per output channel)

I_ij ≈ Σ_c (∂L_c/∂W_ij)², L_c the mean next-token cross-entropy of calibration chunk c (`batch_size` windows;
HF's `model(input_ids=chunk, labels=chunk).loss`): the mini-batch empirical Fisher, as Hsu et al. (2022)
accumulate it, so its value depends on `batch_size` (its overall scale does not matter to fwsvd). A per-window
Fisher (chunks of one window) is the textbook empirical Fisher; measured on SmolLM2-135M at 20% removed it made
fwsvd worse than plain SVD (perplexity 2.2e7 vs 1.9e7; chunks of 8: 8.9e6), on the shipped model slightly
better (36.420 vs 36.430) — `batch_size` chooses. For a linear y = W x, ∂L_c/∂W = Σ_t δ_t x_tᵀ over the chunk's
tokens (δ = ∂L_c/∂y): hooks see x and δ, so no parameter ever needs `.grad`. Both axis sums are kept (m + n
numbers per module), so `fwsvd`'s `axis` option picks either without a second pass. The same hooks also fold δ
itself, squared per output channel (m more numbers): the loss's sensitivity to the module's OUTPUT, which rank
allocation `weight: loss` uses to put every module's output error in units of loss (compressor/budget/allocation.py).

Memory plan: layer by layer, like the statistics pass, so models larger than the device work. Per chunk of
`batch_size` windows:
  1. forward without autograd through the decoder layers, one layer on `device` at a time (one window at a time),
     keeping each layer's input hidden states for the chunk on the layers' home device (CPU when offloaded):
     L × batch × seqlen × hidden;
  2. the head (final norm, lm_head, loss) on the last hidden states, one window at a time (one window's logits in
     fp32 on the device), backward to the last hidden states;
  3. for each layer from the last to the first: move it to `device`, recompute its forward from the kept input with
     autograd on, one window at a time, backward with the output gradient from the layer above; hooks add up the
     chunk's weight gradient of its targets over the windows, squared when all are in; the input gradient goes
     down to the next layer.
Peak on the device ≈ the non-layer weights (embeddings, head) + one decoder layer + its targets' chunk gradients
(the layer's size at fp32) + one layer's autograd activations for one window + one window's logits. With `--low-memory` the layers come from disk for every visit (2 reads per layer
per chunk) and go back to the meta device after it, so RAM holds one layer plus the chunk's kept inputs; and the
non-layer weights are cut too: every chunk's first-layer inputs are captured up front, so an untied embedding
goes back to disk for the pass, and the head is read in the checkpoint's dtype for each chunk's head gradient
(`LazyLayers.embedding_released`, `head_resident`).
The head's product runs in vocabulary slices of `HEAD_SLICE_ELEMENTS`, each slice upcast to the compute dtype
only while it is used (forward and backward): a bf16 head is never held at fp32 (Qwen2.5-1.5B: 0.47 GB, not
0.93 + 0.47). In memory the head takes the same slices, so both paths compute the same Fisher, bit for bit. No parameter ever gets a `.grad`; every parameter's `requires_grad`, the training
mode and the devices are restored afterwards.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compressor.pipeline import distributed
from compressor.pipeline.sequential import (LayerSource, capture_layer_calls, hidden_of, layer_output, move, move_all_but_layers,
                                   with_hidden)
from compressor.pipeline.stats import Stats
from compressor.pipeline.targets import find_decoder_layers


class FisherDiag(NamedTuple):
    """Diagonal Fisher of one (m, n) weight collapsed along each axis; fp64 on CPU."""

    out: torch.Tensor  # (m,): summed over input columns
    in_: torch.Tensor  # (n,): summed over output rows
    # (m,): Σ_chunks Σ_t (∂L_c/∂y_t)², the squared gradient w.r.t. the module's output y_t = W x_t per channel
    output_grad_sq: torch.Tensor | None = None


class _Inject(nn.Module):
    """Stands in for a decoder layer and returns fixed hidden states, so the model's own forward computes its head
    (final norm, lm_head, any logit transform) on them: no per-architecture code for what follows the layers."""

    def __init__(self, layer: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.layer, self.hidden, self.as_tuple = layer, hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden

    def __getattr__(self, name):  # decoder loops may read attributes of a layer (e.g. its attention type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


# A head slice upcast at once: 32M elements (128 MB at fp32); logits computed at once: 8M (32 MB at fp32).
HEAD_SLICE_ELEMENTS = 1 << 25
LOGIT_SLICE_ELEMENTS = 1 << 23


class _SlicedHead(torch.autograd.Function):
    """y = x Wᵀ + b with W read `rows` vocabulary rows at a time, each slice cast to x's dtype only while used;
    backward recomputes the casts instead of keeping them (W and b never get gradients here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for s in range(0, weight.shape[0], rows):
            b = None if bias is None else bias[s : s + rows].to(x.dtype)
            out[..., s : s + rows] = F.linear(x, weight[s : s + rows].to(x.dtype), b)
        ctx.save_for_backward(weight)
        ctx.rows, ctx.dtype = rows, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = None
        for s in range(0, weight.shape[0], ctx.rows):
            part = grad[..., s : s + ctx.rows] @ weight[s : s + ctx.rows].to(ctx.dtype)
            dx = part if dx is None else dx.add_(part)
        return dx, None, None, None


@contextmanager
def _sliced_head(model):
    """The model's own head module computes its logits through _SlicedHead (a plain nn.Linear head only; any other
    head runs as it is). The model's forward still applies whatever follows the head (soft-capping, scaling)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        yield
        return
    rows = max(1, HEAD_SLICE_ELEMENTS // head.in_features)
    head.forward = lambda x: _SlicedHead.apply(x, head.weight, head.bias, rows)
    try:
        yield
    finally:
        del head.forward


def _head_gradient(model, layers: nn.ModuleList, ids: torch.Tensor, hidden: torch.Tensor, as_tuple: bool):
    """∂L_c/∂hidden for the last decoder layer's output `hidden`, L_c the chunk's mean loss (the mean over its
    windows of each window's mean next-token cross-entropy; windows have equal length). The head runs on one
    window's slice of positions at a time, at most LOGIT_SLICE_ELEMENTS logits (a 150k vocabulary: 55 positions,
    32 MB, instead of a window's 0.16 GB of logits and as much again for their softmax and gradient); the head is
    per position, so the slices' logits are the window's. The model gets placeholder `inputs_embeds` (the injected
    layers ignore what comes in): the embedding itself is not needed, so --low-memory leaves it on disk."""
    leaf = hidden.detach().requires_grad_(True)
    originals = list(layers)
    windows, length = ids.shape
    vocabulary = model.get_output_embeddings().weight.shape[0]
    step = max(1, min(length, LOGIT_SLICE_ELEMENTS // vocabulary))
    scale = 1.0 / (windows * (length - 1))
    try:
        for s in range(windows):
            for a in range(0, length - 1, step):
                b = min(a + step, length - 1)  # positions a..b-1 predict tokens a+1..b
                for i, layer in enumerate(originals):
                    layers[i] = _Inject(layer, leaf[s : s + 1, a:b], as_tuple)
                placeholder = hidden.new_zeros(1, b - a, hidden.shape[-1])
                with _sliced_head(model):
                    logits = model(inputs_embeds=placeholder, use_cache=False).logits
                loss = F.cross_entropy(logits[0].float(), ids[s, a + 1 : b + 1], reduction="sum")
                (loss * scale).backward()
                del logits, loss
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return leaf.grad


def _fold_hooks(layer_targets: dict[str, nn.Linear], sums: dict[str, list[torch.Tensor]],
                chunk_grads: dict[str, torch.Tensor]) -> list:
    """Hooks adding each call's weight gradient Σ_t δ_t x_tᵀ into `chunk_grads` (squared once the chunk's windows
    are all in: `_fold_chunk`) and Σ_t δ_t² straight into the sums (a sum over tokens already)."""
    def hook(name):
        def forward_hook(module, args, output):
            if not output.requires_grad:
                return  # the loss does not depend on this call's output
            x = args[0].detach()

            def fold(grad):
                delta = grad.reshape(-1, grad.shape[-1]).float()
                part = delta.T @ x.reshape(-1, x.shape[-1]).float()
                if name in chunk_grads:
                    chunk_grads[name].add_(part)
                else:
                    chunk_grads[name] = part
                sums[name][2].add_(delta.square().sum(0, dtype=torch.float64))

            output.register_hook(fold)

        return forward_hook

    return [module.register_forward_hook(hook(name)) for name, module in layer_targets.items()]


def _fold_chunk(chunk_grads: dict[str, torch.Tensor], sums: dict[str, list[torch.Tensor]]) -> None:
    """The chunk's weight gradients, squared, summed along each axis into the sums."""
    for name, grad in chunk_grads.items():
        sq = grad.square_()
        sums[name][0].add_(sq.sum(1, dtype=torch.float64))
        sums[name][1].add_(sq.sum(0, dtype=torch.float64))
    chunk_grads.clear()


def collect_fisher(
    model: nn.Module, batches: torch.Tensor, target_names, *, device="cpu", batch_size: int = 8, layer_io=None
) -> dict[str, FisherDiag]:
    """Squared LM-loss gradients of the weights (and outputs) of `target_names` (nn.Linear names in the decoder
    layers), summed over chunks of `batch_size` rows of `batches` (token ids, nsamples × seqlen). The model is
    returned unchanged.

    `layer_io` (compressor/pipeline/streaming.py): decoder layers that live on disk (meta device) until needed, with
    `read(index, layer)` to materialise one and `release(index, layer)` to send it back to the meta device, and
    `embedding_released()` and `head_resident()`, contexts that drop the embedding for the pass and hold the head
    for one chunk's head gradient."""
    names = list(dict.fromkeys(target_names))
    _, layers = find_decoder_layers(model)
    per_layer: list[dict[str, nn.Linear]] = [{} for _ in layers]
    owners = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for name in names:
        module = model.get_submodule(name)
        if id(module) not in owners:
            raise ValueError(f"{name} is not inside a decoder layer; the Fisher pass covers decoder linears only")
        per_layer[owners[id(module)]][name] = module
    sums = {name: [torch.zeros(m.weight.shape[0], dtype=torch.float64, device=device),
                   torch.zeros(m.weight.shape[1], dtype=torch.float64, device=device),
                   torch.zeros(m.weight.shape[0], dtype=torch.float64, device=device)]
            for targets in per_layer for name, m in targets.items()}

    # by name: a list of the parameters would keep alive the tensors --low-memory sends back to disk mid-pass
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    homes = [next(layer.parameters()).device for layer in layers]
    keep = torch.device("cpu") if homes[0].type == "meta" else homes[0]  # where the chunk's layer inputs wait
    source = LayerSource(layers, device, homes, layer_io, writes=False)
    home = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        move_all_but_layers(model, device)
        # Under torchrun each process takes whole chunks (the mini-batch Fisher depends on them) and the sums are
        # added up (compressor/pipeline/distributed.py). Every chunk's first-layer inputs are captured before the
        # head is needed, so that --low-memory can trade the embedding for the head (never both in memory).
        starts = distributed.my_chunks(batches.shape[0], batch_size)
        calls = {start: capture_layer_calls(model, layers, batches[start : start + batch_size].to(device),
                                            device=device, offload=keep, batch_size=1)  # one call per window
                 for start in starts}
        with (layer_io.embedding_released() if layer_io is not None else nullcontext()):
            head = layer_io.head_resident if layer_io is not None else nullcontext
            for start in starts:
                ids = batches[start : start + batch_size].to(device)
                _fisher_of_chunk(model, layers, source, keep, per_layer, sums, ids, calls.pop(start), head)
        distributed.all_reduce_sums([t for s in sums.values() for t in s])
    finally:
        move_all_but_layers(model, home)
        source.send_home()
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        model.train(was_training)
    return {name: FisherDiag(*(t.cpu() for t in sums[name])) for name in sums}


def _fisher_of_chunk(model, layers, visits: LayerSource, keep, per_layer, sums, ids, arguments, head) -> None:
    """One chunk. Windows go through each layer one at a time (`arguments` holds one call per window), forward and
    backward: a layer's autograd activations for one window at once, not for the chunk (Qwen2.5-1.5B, 8 windows
    of 256: ~0.5 GB less). The chunk's weight gradient is summed over its windows before it is squared. `head()`:
    a context holding the model's head for the head gradient (with --low-memory it is read for it, then dropped)."""
    device = visits.device
    calls = arguments.first()
    inputs, as_tuple = [], False
    with torch.no_grad():
        for index in range(len(layers)):
            inputs.append(calls)
            layer, outputs = visits.enter(index), []
            for call in calls:
                out = layer(*move(call[0], device), **move(call[1], device))
                as_tuple = isinstance(out, (tuple, list))
                outputs.append(with_hidden(call, move(layer_output(out), keep)))
            calls = arguments.onto(index + 1, outputs)
            visits.leave(index)
    hidden = torch.cat([hidden_of(call) for call in calls]).to(device)
    with head():
        move_all_but_layers(model, device)
        grads = list(_head_gradient(model, layers, ids, hidden, as_tuple).split(1))
    chunk_grads: dict[str, torch.Tensor] = {}
    for index in reversed(range(len(layers))):
        layer = visits.enter(index)
        handles = _fold_hooks(per_layer[index], sums, chunk_grads)
        try:
            for window, call in enumerate(inputs[index]):
                args, kwargs = move(call, device)
                x = hidden_of((args, kwargs)).detach().requires_grad_(True)
                args, kwargs = with_hidden((args, kwargs), x)
                with torch.enable_grad():
                    out = layer(*args, **kwargs)
                    torch.autograd.backward(layer_output(out), grads[window])
                grads[window] = x.grad
                del out, x
        finally:
            for handle in handles:
                handle.remove()
        _fold_chunk(chunk_grads, sums)
        visits.leave(index)


# --- Fisher as a method's statistic ("fisher" in method.needs) -------------------------------------------------
# The Fisher is a property of each WEIGHT (its own gradient), not of the input it shares with its siblings, so
# unlike the Gram it cannot live in the shared per-owner Stats. It is collected once on the dense model before
# any layer is compressed (the paper's Fisher is the original model's), then every target becomes its own group
# with a Stats copy holding its vectors (the Gram is shared by reference, not copied). compress_layer and rank
# allocation then need no special case; the price is that same-shape siblings (gate/up) are decomposed one by
# one instead of in one batched SVD.

def fisher_of_targets(model, batches, layer_targets, *, device, batch_size, layer_io=None) -> dict[str, FisherDiag]:
    """collect_fisher for every target of `layer_targets` (select_targets' per-layer dicts)."""
    names = [name for targets in layer_targets for name in targets]
    return collect_fisher(model, batches, names, device=device, batch_size=batch_size, layer_io=layer_io)


def per_module_fisher(groups: dict[str, list[str]], stats: dict[str, Stats], fisher: dict[str, FisherDiag]):
    """(owner -> names, owner -> Stats) -> (name -> [name], name -> Stats with that module's Fisher)."""
    one_each, own = {}, {}
    for owner, names in groups.items():
        for name in names:
            one_each[name] = [name]
            own[name] = dataclasses.replace(stats[owner], fisher=fisher[name].out, fisher_in=fisher[name].in_)
    return one_each, own
# ----------------------------------------------------------------------------------------------------------------
