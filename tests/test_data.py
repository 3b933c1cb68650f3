"""Text sources (local files, bundled splits, hub datasets without network) and token windows."""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compressor import data
from compressor.data import HubRequest, calibration_batch, eval_windows, load_texts
from compressor.errors import UserError
from compressor.resources import calibration_file

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. However little known the feelings or views of such a man may be",
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the families.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
] * 3


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>"]
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    # bos_token set and model_max_length tiny: adding special tokens or the long-sequence warning would show.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", model_max_length=16)


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


def _ids(tokenizer, docs):
    return tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- local files


def test_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first para\nsecond para\n\nchapter two\n\n\nchapter three\n", encoding="utf-8")
    docs, desc = load_texts(str(path), split_default="train")
    assert docs == ["first para\nsecond para", "chapter two", "chapter three"]
    assert str(path) in desc and "3 documents" in desc


def test_jsonl_rows_verbatim(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "alpha\n\nbeta", "id": 1}, {"text": ""}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs, _ = load_texts(str(path), split_default="test")
    assert docs == ["alpha\n\nbeta", "", "gamma"]


def test_jsonl_missing_text_field_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'line 2: no "text" field'):
        load_texts(str(path), split_default="train")


def test_parquet_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None], "n": [1, 2, 3]}), path)
    docs, _ = load_texts(str(path), split_default="train")
    assert docs == ["one", "two", ""]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(UserError, match='no "text" column'):
        load_texts(str(bad), split_default="train")


def test_folder_reads_supported_files_sorted_by_name(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n\nb again", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["from c"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs, desc = load_texts(str(tmp_path), split_default="train")
    assert docs == ["from a", "from b", "b again", "from c"]
    assert "3 files" in desc and "4 documents" in desc


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        load_texts(str(tmp_path), split_default="train")


@pytest.mark.parametrize("content", ["", "\n\n  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="contains no text"):
        load_texts(str(path), split_default="train")


def test_missing_path_errors_name_the_path_and_role(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=f"^calibration file not found: {missing}$"):
        load_texts(str(missing), split_default="train")
    with pytest.raises(UserError, match="^evaluation file not found: data/nope.jsonl$"):
        load_texts("data/nope.jsonl", split_default="test")


def test_unreadable_files(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_texts(str(latin), split_default="train")
    other = tmp_path / "c.csv"
    other.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported calibration file type '.csv'"):
        load_texts(str(other), split_default="train")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="could not read calibration file .* as parquet"):
        load_texts(str(corrupt), split_default="train")


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_default(split):
    text = calibration_file(split).read_text(encoding="utf-8")
    docs, desc = load_texts(None, split_default=split)
    assert len(docs) == len(text.split("\n\n"))
    assert "\n\n".join(docs) == text.rstrip("\n")  # nothing lost but the final newline
    assert f"{split}.txt" in desc and f"({len(docs)} documents)" in desc


def test_bundled_train_is_the_austen_chapters():
    docs, _ = load_texts(None, split_default="train")
    assert len(docs) == 242  # calibration/SOURCES.md: 242 train chapters
    assert docs[0].startswith("The family of Dashwood had long been settled in Sussex.")


# ---------------------------------------------------------------- hub datasets, without network


@pytest.fixture
def local_hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def test_hub_alias_through_load_dataset_with_local_files(local_hf_cache, monkeypatch):
    path = local_hf_cache / "rows.parquet"
    pq.write_table(pa.table({"text": ["", " = Title = \n", "body line\n"]}), path)
    request = HubRequest("parquet", None, "test", data_files={"test": str(path)})
    monkeypatch.setitem(data.HUB_ALIASES, "tinyhub", {"test": request})
    docs, desc = load_texts("tinyhub", split_default="test")
    assert docs == ["", " = Title = \n", "body line\n"]  # empty rows kept: the papers' join includes them
    assert "hub dataset parquet" in desc and "split test" in desc and "3 documents" in desc


def test_hub_name_config_split_syntax_with_a_local_dataset_folder(local_hf_cache, monkeypatch):
    # datasets.load_dataset("hubdir", split=...) reads a local folder laid out like a hub repository.
    (local_hf_cache / "hubdir" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["t1", "t2"]}), local_hf_cache / "hubdir" / "data" / "train.parquet")
    pq.write_table(pa.table({"text": ["v1"]}), local_hf_cache / "hubdir" / "data" / "validation.parquet")
    monkeypatch.chdir(local_hf_cache)
    assert load_texts("hubdir::validation", split_default="train")[0] == ["v1"]
    assert load_texts("hubdir::train", split_default="test")[0] == ["t1", "t2"]


@pytest.fixture
def fake_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, *, split=None, data_files=None, **kwargs):
        calls.append((path, name, split, data_files))
        n = 2500 if path == "allenai/c4" else 3
        return datasets.Dataset.from_dict({"text": [f"row {i}" if i % 3 else "" for i in range(n)]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_hub_name_parsing_and_aliases(fake_load_dataset):
    load_texts("wikitext2", split_default="test")
    load_texts("wikitext2", split_default="train")
    load_texts("org/name:cfg:validation", split_default="train")
    load_texts("org/name:cfg", split_default="test")
    load_texts("org/name", split_default="train")
    assert fake_load_dataset == [
        ("wikitext", "wikitext-2-raw-v1", "test", None),
        ("wikitext", "wikitext-2-raw-v1", "train", None),
        ("org/name", "cfg", "validation", None),
        ("org/name", "cfg", "test", None),
        ("org/name", None, "train", None),
    ]
    with pytest.raises(UserError, match="bad dataset name"):
        load_texts("a:b:c:d", split_default="test")


def test_hub_rows_verbatim_and_c4_capped(fake_load_dataset):
    docs, _ = load_texts("wikitext2", split_default="test")
    assert docs == ["", "row 1", "row 2"]
    docs, desc = load_texts("c4", split_default="test")
    assert fake_load_dataset[-1] == (
        "allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    )
    assert len(docs) == 2000 and "first 2000 documents" in desc


def test_hub_missing_column(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(UserError, match="has no 'text' column \\(columns: body\\)"):
        load_texts("org/name", split_default="test")


def test_unknown_hub_name_offline_is_one_line_and_fast(local_hf_cache, monkeypatch):
    import datasets
    import huggingface_hub

    # Both libraries read the variables at import time, so set the parsed constants as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        load_texts("lrc-tests/no-such-dataset", split_default="test")
    assert time.monotonic() - t0 < 20
    message = str(info.value)
    assert message.startswith("could not load dataset 'lrc-tests/no-such-dataset' from the hub: ")
    assert "\n" not in message and len(message) < 400


# ---------------------------------------------------------------- token windows


def test_calibration_batch_is_seeded_random_windows(tokenizer):
    docs = SENTENCES[:4]
    ids = _ids(tokenizer, docs)
    a = calibration_batch(tokenizer, docs, nsamples=6, seqlen=8, seed=0)
    b = calibration_batch(tokenizer, docs, nsamples=6, seqlen=8, seed=0)
    c = calibration_batch(tokenizer, docs, nsamples=6, seqlen=8, seed=1)
    assert a.shape == (6, 8) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    windows = {tuple(ids[s : s + 8]) for s in range(len(ids) - 8)}  # GPTQ: starts in [0, n - seqlen - 1]
    assert all(tuple(row) in windows for row in a.tolist())


def test_calibration_batch_with_one_possible_start(tokenizer):
    # seqlen + 1 tokens: the only start GPTQ's rule allows is 0, so every window is the raw text's prefix.
    docs = SENTENCES[:2]
    ids = _ids(tokenizer, docs)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer would add <s> ...
    batch = calibration_batch(tokenizer, docs, nsamples=3, seqlen=len(ids) - 1, seed=0)
    assert batch.tolist() == [ids[:-1]] * 3  # ... but windows are cut from the raw text


def test_calibration_batch_does_not_touch_global_rng(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_batch(tokenizer, SENTENCES[:2], nsamples=2, seqlen=4, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_batch_too_short_says_how_many_tokens(tokenizer):
    n = len(_ids(tokenizer, ["short text"]))
    with pytest.raises(UserError, match=f"has {n} tokens; at least 65 are needed"):
        calibration_batch(tokenizer, ["short text"], nsamples=1, seqlen=64, seed=0)


def test_long_text_does_not_warn(caplog):
    from transformers.utils import logging as hf_logging

    tokenizer = _make_tokenizer()  # fresh: a tokenizer warns only once in its life

    hf_logging.enable_propagation()  # transformers' logger does not reach caplog otherwise
    try:
        with caplog.at_level(logging.WARNING):
            calibration_batch(tokenizer, SENTENCES, nsamples=2, seqlen=8, seed=0)  # > model_max_length=16
            eval_windows(tokenizer, SENTENCES, 8)
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_eval_windows_non_overlapping_tail_dropped(tokenizer):
    ids = _ids(tokenizer, SENTENCES)
    seqlen = 7
    assert len(ids) % seqlen != 0  # so that there is a tail to drop
    windows = eval_windows(tokenizer, SENTENCES, seqlen)
    n = len(ids) // seqlen
    assert windows.shape == (n, seqlen)
    assert windows.flatten().tolist() == ids[: n * seqlen]


def test_eval_windows_too_short(tokenizer):
    with pytest.raises(UserError, match="fewer than one window of 4096"):
        eval_windows(tokenizer, ["short text"], 4096)
