import json

import pytest
import torch

from posttrain.config import DataConfig
from posttrain.types import Example
from posttrain.data import (DataError, collate, cue_rows, fit_prompt,
                            length_grouped_batches, load_rows, requested_length, round_length,
                            tokenize_rows, with_length_cue)
from conftest import CUE, write_jsonl

CFG = DataConfig()


def test_bundled_sample_has_both_splits():
    train = load_rows("sample", "train", CFG)
    val = load_rows("sample", "validation", CFG)
    assert len(train) + len(val) >= 150 and len(val) >= 30
    assert all(r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("TL;DR:")
               for r in train + val)
    assert all(r["completion"].startswith(" ") for r in train + val)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_local_file_formats(tmp_path, rows, fmt):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(ds, f"to_{fmt}")(str(path))
    assert load_rows(str(path), "train", CFG) == rows


def test_save_to_disk_folders(tmp_path, rows):
    import datasets
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "one"), "whatever", CFG) == rows
    assert len(load_rows(str(tmp_path / "dict"), "validation", CFG)) == 3
    with pytest.raises(DataError, match=r"no split 'test'.*train"):
        load_rows(str(tmp_path / "dict"), "test", CFG)


def test_bad_files_name_the_file_and_problem(tmp_path, rows):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_rows(str(tmp_path / "missing.jsonl"), "train", CFG)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_rows(str(tmp_path / "empty.jsonl"), "train", CFG)
    write_jsonl(tmp_path / "cols.jsonl", [{"text": "a", "summary": "b"}])
    with pytest.raises(DataError, match=r"cols.jsonl.*missing column.*'prompt'.*'completion'"):
        load_rows(str(tmp_path / "cols.jsonl"), "train", CFG)
    bad = rows[:3] + [{"prompt": "p", "completion": "   "}]
    write_jsonl(tmp_path / "blank.jsonl", bad)
    with pytest.raises(DataError, match=r"blank.jsonl: line 4: empty"):
        load_rows(str(tmp_path / "blank.jsonl"), "train", CFG)
    assert load_rows(str(tmp_path / "blank.jsonl"), "train",
                     DataConfig(empty_completions="drop")) == rows[:3]
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": " x"}\n')
    with pytest.raises(DataError, match="latin1.jsonl: line 1 is not valid UTF-8"):
        load_rows(str(tmp_path / "latin1.jsonl"), "train", CFG)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt: expected"):
        load_rows(str(tmp_path / "notes.txt"), "train", CFG)


def test_overlong_prompts_dropped_or_truncated(tiny_model_dir, rows):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = rows + [{"prompt": "SUBREDDIT: r/long\n\nPOST: " + "words " * 300 + "\n\nTL;DR:",
                    "completion": " long."}]
    limit = max(len(tok(r["prompt"])["input_ids"]) for r in rows[:-1])
    drop = DataConfig(max_prompt_tokens=limit)
    ex, report = tokenize_rows(rows, tok, drop)
    assert report["prompt_dropped"] == 1 and len(ex) == len(rows) - 1
    trunc = DataConfig(max_prompt_tokens=limit, overlong="truncate", truncate_keep_tail=4)
    ex, report = tokenize_rows(rows, tok, trunc)
    assert report["prompt_truncated"] == 1 and len(ex) == len(rows)
    long_ids = tok(rows[-1]["prompt"])["input_ids"]
    assert list(ex[-1].prompt_ids) == long_ids[:limit - 4] + long_ids[-4:]
    assert all(e.completion_ids[-1] == tok.eos_token_id for e in ex)


def test_fit_prompt_keeps_head_and_tail():
    cfg = DataConfig(max_prompt_tokens=5, overlong="truncate", truncate_keep_tail=2)
    assert fit_prompt(list(range(10)), cfg) == [0, 1, 2, 8, 9]
    assert fit_prompt([1, 2], cfg) == [1, 2]
    assert fit_prompt(list(range(10)), DataConfig(max_prompt_tokens=5)) is None


def test_collate_masks_prompt_and_padding():
    a = Example((5, 6, 7), (8, 9, 1))
    b = Example((5,), (9, 1))
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 1], [5, 9, 1, 0, 0, 0]]
    # position t predicts token t+1: only completion tokens are targets
    assert batch.predict_mask.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert batch.targets.tolist() == [8, 9, 1, 9, 1]
    assert batch.example_index.tolist() == [0, 0, 0, 1, 1]
    packed = collate([a, b], pad_id=0, packed=True)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 5, 9, 1]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert packed.attention_mask is None
    assert packed.targets.tolist() == [8, 9, 1, 9, 1]
    assert packed.num_tokens == batch.num_tokens == 9


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 100, 6, 99, 7, 98, 8, 97]
    g = torch.Generator().manual_seed(0)
    batches = length_grouped_batches(lengths, 2, g, group_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # sorted within the window: each batch pairs similar lengths
    assert all(abs(lengths[b[0]] - lengths[b[1]]) < 10 for b in batches)


# ---------------------------------------------------------------- length cues

@pytest.mark.parametrize("length,written", [(137, 140), (80, 80), (4, 10), (205, 200)])
def test_cue_round_trip(length, written):
    cfg = DataConfig(length_cue=CUE)
    prompt = "SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: I did a thing.\n\nTL;DR:"
    cued = with_length_cue(prompt, length, cfg)
    assert (
        cued
        == "SUBREDDIT: r/tifu\n\nTITLE: t\n\nPOST: I did a thing.\n\n"
        f"TL;DR (about {written} characters):"
    )
    assert requested_length(cued, cfg) == written == round_length(length, cfg)
    assert requested_length(prompt, cfg) is None
    # a prompt without the marker gets the cue appended
    assert with_length_cue("POST: hi", length, cfg).endswith(
        f"\n\nTL;DR (about {written} characters):"
    )


def test_sft_rows_ask_for_their_own_reference_length():
    cfg = DataConfig(length_cue=CUE, length_round=1)
    rows = cue_rows([{"prompt": "POST: x\n\nTL;DR:", "completion": " short one. "}], cfg)
    assert requested_length(rows[0]["prompt"], cfg) == len("short one.")
