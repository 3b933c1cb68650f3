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
