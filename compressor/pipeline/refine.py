"""Block refinement (AA-SVD-style): after a decoder layer's targets are compressed, fit the new factors end to end.

Per-module truncation minimises each linear's own output error; the decoder layer's output depends on all of
them through attention and the gated MLP, so their errors interact. Refinement minimises the layer's output
error directly:

    min over the compressed modules' refinable parameters θ of  Σ_windows ‖layer_θ(x̂) − y*‖² / Σ ‖y*‖²

with x̂ the layer's calibration inputs (the compressed model's stream) and y* the target outputs: the dense
layer on the same x̂, or the dense model's own outputs (the runner chooses; see compressor/pipeline/sequential.py).
Only parameters a compressed module declares refinable (low-rank factors, sparse values, EoRA residuals) move by
Adam, and quantised encodings' codes, scales and zero points on their own grid by signed-gradient descent
(AutoRound-style, compressor/pipeline/refine_quant.py); the rest of the layer (norms, the targets left dense) is
frozen. A fixed number of epochs over the calibration windows in a seeded order: deterministic on a given device. The first
`skip_first` positions of every window (attention sinks, whose hidden states are orders of magnitude larger)
are left out of the loss. The layer trains in fp32 (a half-precision layer is cast up for the duration), but is
judged, and hands on its outputs, as the checkpoint will hold it: back in its own dtype, the refined parameters
rounded through the storage dtype, its outputs computed by that layer's own forward (the one the runner's
propagation makes), so the next layer is calibrated on exactly what the saved layer produces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from compressor.pipeline import distributed
from compressor.pipeline.refine_quant import QuantRefinement
from compressor.pipeline.sequential import exact_paths, hidden_of, layer_output, move, run_layer


@dataclass
class RefineReport:
    layer: int
    loss_before: float  # relative output error² of the layer, Σ‖y − y*‖² / Σ‖y*‖², before refinement
    loss_after: float
    seconds: float
    steps: int
    parameters: int  # refined parameters (a quantised weight's rounding offsets, scales and zero points included)
    reverted: bool = False  # the refined layer was worse on the calibration windows: the factors were restored
    codes_changed: int = 0  # quantised codes the refinement moved (0 once reverted)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "seconds": round(self.seconds, 3), "steps": self.steps, "parameters": self.parameters,
                "reverted": self.reverted, "codes_changed": self.codes_changed}


def _slice(obj, size: int, start: int, stop: int):
    """Tensors whose leading dimension is the call's window count, cut to [start, stop); others (broadcast
    position tables, None masks) unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() >= 1 and obj.shape[0] == size else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(o, size, start, stop) for o in obj)
    if isinstance(obj, dict):
        return {k: _slice(v, size, start, stop) for k, v in obj.items()}
    return obj


def _pieces(calls, targets, batch_size: int):
    """The steps: each a list of (call, target) parts, at most `batch_size` windows in all. One process: one part
    per step. Under torchrun the steps are the one-process run's, each rank holding its windows of them
    (compressor/pipeline/distributed.py)."""
    sizes = [hidden_of(call).shape[0] for call in calls]
    out = []
    for parts in distributed.pieces(sizes, batch_size):
        step = []
        for k, start, stop in parts:
            whole = (start, stop) == (0, sizes[k])
            step.append((calls[k], targets[k]) if whole else
                        (_slice(calls[k], sizes[k], start, stop), targets[k][start:stop]))
        out.append(step)
    return out


def _sq_error(y: torch.Tensor, target: torch.Tensor, skip_first: int) -> torch.Tensor:
    d = (y - target)[:, skip_first:] if y.dim() >= 3 else y - target
    return d.double().pow(2).sum() if not d.requires_grad else d.pow(2).sum()


def refinable_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters each compressed module declares refinable (`refinable_parameters()`); none otherwise."""
    params = []
    for module in modules:
        get = getattr(module, "refinable_parameters", None)
        params.extend(get() if get is not None else [])
    return params


def refine_block(layer: nn.Module, modules: list[nn.Module], calls: list, targets: list[torch.Tensor], *,
                 epochs: int, lr: float, batch_size: int, seed: int, skip_first: int, device, offload,
                 index: int = 0, relative_lr: bool = False, storage_dtype: torch.dtype | None = None,
                 quantised: bool = True, quant_lr: float | None = None) -> tuple[RefineReport, list[torch.Tensor]]:
    """Refine `modules` (inside `layer`) so `layer(call) ≈ target` for each recorded call; return the report and
    the refined layer's outputs for every call (on `offload`), which are the next layer's inputs.
    `storage_dtype`: the checkpoint's dtype (default: the layer's own), which the refined parameters are rounded
    through before the layer is judged and its outputs handed on. `quantised`: also refine the quantised modules'
    codes and scales (rounding offsets with a step of `quant_lr`, decaying linearly to 0; None: QUANT_TRAVEL / steps)."""
    start = time.perf_counter()
    params = refinable_parameters(modules)
    quant = QuantRefinement(layer, modules if quantised else [])
    dtype = next(layer.parameters()).dtype
    with exact_paths(layer):
        return _refine(layer, params, quant, dtype, storage_dtype or dtype, calls, targets, start, epochs=epochs,
                       lr=lr, batch_size=batch_size, seed=seed, skip_first=skip_first, device=device,
                       offload=offload, index=index, relative_lr=relative_lr, quant_lr=quant_lr)


# Quantised encodings (compressor/pipeline/refine_quant.py): the rounding offsets' step is QUANT_TRAVEL / steps (an
# offset with a gradient of the matrix's RMS and a steady sign travels QUANT_TRAVEL / 2 in all under the linear
# decay: only larger gradients cross the half step that moves a code); the scales' relative step is SCALE_LR.
# Both measured on the demo model (3-bit, group 128, layer 2): GPTQ codes gain little from moving, RTN's much.
QUANT_TRAVEL = 0.7
SCALE_LR = 0.003


def _refine(layer, params, quant, dtype, storage_dtype, calls, targets, start, *, epochs, lr, batch_size, seed,
            skip_first, device, offload, index, relative_lr, quant_lr):
    norm = sum(float(t[:, skip_first:].double().pow(2).sum()) if t.dim() >= 3 else float(t.double().pow(2).sum())
               for t in targets)
    norm = max(distributed.all_reduce_scalar(norm), 1e-300)  # (under torchrun: over every process's windows)

    def run(call):
        args, kwargs = move(call, device, torch.float32)
        return layer_output(layer(*args, **kwargs))

    @torch.no_grad()
    def saved() -> None:  # the layer as the checkpoint holds it
        layer.to(dtype)
        for p in params:
            p.copy_(p.to(storage_dtype))

    @torch.no_grad()
    def evaluate(keep_outputs: bool):  # the saved layer's error and outputs (on `offload`): what propagation hands on
        total, outs = 0.0, []
        for call, target in zip(calls, targets):
            y = hidden_of(run_layer(layer, [call], device, offload)[0])
            total += float(_sq_error(y.to(device, torch.float32), target.to(device, torch.float32), skip_first))
            if keep_outputs:
                outs.append(y)
        return distributed.all_reduce_scalar(total) / norm, outs

    saved()
    before, outs = evaluate(keep_outputs=epochs == 0 or not (params or quant))
    steps, reverted, changed = 0, False, 0
    if epochs > 0 and (params or quant):
        if dtype != torch.float32:
            layer.float()
        flags = {p: p.requires_grad for p in layer.parameters()}
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        originals = [p.detach().clone() for p in params]
        # Adam moves every entry by about lr per step whatever its size; factors differ in scale by orders of
        # magnitude (A carries the inverse whitening), so with `relative_lr` each tensor's step is lr × its RMS.
        groups = [{"params": [p], "lr": lr * (float(p.detach().float().pow(2).mean().sqrt()) if relative_lr else 1.0)}
                  for p in params]
        optimizer = torch.optim.Adam(groups, lr=lr) if params else None
        pieces = _pieces(calls, targets, batch_size)
        total = epochs * len(pieces)
        offset_lr = quant_lr if quant_lr is not None else QUANT_TRAVEL / total
        generator = torch.Generator().manual_seed(seed + index)
        with torch.enable_grad(), quant.swapped():
            for _ in range(epochs):
                for j in torch.randperm(len(pieces), generator=generator).tolist():
                    if optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
                    quant.zero_grad()
                    for call, target in pieces[j]:
                        loss = _sq_error(run(call), target.to(device, torch.float32), skip_first) / norm
                        loss.backward()
                    distributed.sum_gradients(params + quant.parameters())  # the whole step's gradient everywhere
                    if optimizer is not None:
                        optimizer.step()
                    quant.step(offset_lr * (1 - steps / total), SCALE_LR * (1 - steps / total))
                    steps += 1
        for p, flag in flags.items():
            p.requires_grad_(flag)
        del optimizer
        distributed.broadcast_parameters(params + quant.parameters())
        changed = quant.write()
        saved()
        after, outs = evaluate(keep_outputs=True)
        # Moved codes are a coarse, noisy step (every offset starts half a step from a flip): also judge the learnt
        # scales and zero points on the codes the layer had and, beside Adam-trained factors, the quantised weights
        # as they were; keep the best.
        writes = {"moved": quant.write, "kept": lambda: quant.write(move=False), "restored": quant.restore}
        choice = "moved"
        for alternative in (["kept"] if changed else []) + (["restored"] if params and quant else []):
            writes[alternative]()
            error, alternative_outs = evaluate(keep_outputs=True)
            if error < after:
                after, outs, choice = error, alternative_outs, alternative
        changed = writes[choice]()
        if not after <= before:  # a step size too large for this layer: never hand on a worse layer
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
            quant.restore()
            after, outs = evaluate(keep_outputs=True)
            reverted, changed = True, 0
    else:
        after = before
    report = RefineReport(index, before, after, time.perf_counter() - start, steps,
                          sum(p.numel() for p in params) + quant.count(), reverted, changed)
    return report, outs
