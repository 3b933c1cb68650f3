"""Helpers shared by test modules (import as `from tests.helpers import ...`)."""

from __future__ import annotations

from click.testing import CliRunner

from compressor.cli import app


def word_tokenizer():
    """A 256-word word-level tokenizer (w0 … w255) matching the tiny models' vocabulary; no files needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def run(*args):
    """`lrc ARGS` in-process."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result, text: str):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr


def chunk_fisher_reference(model, ids, name: str, chunk: int):
    """Whole-model autograd of HF's own loss per chunk of `chunk` windows of `ids`: the squared gradients of
    `name`'s weight, summed over chunks (fp64) — what collect_fisher must equal."""
    import torch

    W = model.get_submodule(name).weight
    sq = torch.zeros_like(W, dtype=torch.float64)
    for s in range(0, ids.shape[0], chunk):
        loss = model(input_ids=ids[s : s + chunk], labels=ids[s : s + chunk], use_cache=False).loss
        (grad,) = torch.autograd.grad(loss, W)
        sq += grad.double().square()
    return sq


class Crash(Exception):
    """What `crash_after` raises: an interruption the resume tests can tell from a real error."""


def crash_after(layer: int):
    """A `progress` callback that interrupts a run once decoder layer `layer` is done."""
    def progress(index):
        if index == layer:
            raise Crash
    return progress
