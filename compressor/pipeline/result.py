"""What a compression returns (the compressed model, its per-module reports, timings; `save()` writes the
checkpoint), and the calibration windows a run feeds it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.data import calibration_batch, load_texts
from compressor.pipeline.apply import ModuleReport
from compressor.pipeline.refine import RefineReport
from compressor.recipe import Recipe


@dataclass
class CompressionResult:
    model: nn.Module
    recipe: Recipe
    modules: list[ModuleReport]
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    storage_dtype: torch.dtype | None = None  # the checkpoint's dtype; save() writes the weights in it
    refinement: list[RefineReport] = field(default_factory=list)  # per decoder layer, when the recipe refines
    resumed_from: int = 0  # decoder layers an interrupted run had finished (compress(journal=...)); 0: none

    def specs(self) -> dict[str, dict]:
        return {m.name: m.spec for m in self.modules if m.compressed}

    def save(self, out_dir, *, tokenizer=None, report: dict | None = None, report_md="", overwrite=False,
             extra_files: dict | None = None):
        """`report_md`: the markdown text, or a function of the report rendering it after the save time is in."""
        from compressor.io.checkpoint import save_compressed

        if self.storage_dtype is not None:
            self.model.to(self.storage_dtype)  # exact: compress() rounded the weights through this dtype
        start = time.perf_counter()
        extra = {"recipe.yaml": self.recipe.to_yaml(), **(extra_files or {})}
        if report is not None:
            def report_json():  # called once the weights are written, so the report records the save time
                report.setdefault("timings_seconds", {})["save"] = round(time.perf_counter() - start, 3)
                return json.dumps(report, indent=2)

            extra["report.json"] = report_json
            extra["report.md"] = (lambda: report_md(report)) if callable(report_md) else report_md
        return save_compressed(
            self.model,
            out_dir,
            tokenizer=tokenizer,
            modules=self.specs(),
            method=self.recipe.method,
            recipe_name=self.recipe.name,
            extra_files=extra,
            overwrite=overwrite,
        )


def calibration_data(tokenizer, recipe: Recipe, calib: str | None = None, *, loaded_texts=None):
    """(token windows nsamples × seqlen, description). `loaded_texts`: a `load_texts` result already in hand."""
    texts, description = loaded_texts or load_texts(calib, split_default="train")
    c = recipe.calibration
    batches = calibration_batch(tokenizer, texts, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    return batches, {"source": description, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed}


