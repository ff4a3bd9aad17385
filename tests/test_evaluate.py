"""eval metrics on hand-made samples, the report's schema, and KL 0 for an unchanged policy."""
import json
import math

import pytest
import torch

from posttrain import evaluate, modeling


def test_length_summary_known_values():
    s = evaluate.length_summary([1, 2, 3, 4, 5])
    assert s["mean"] == 3 and s["var"] == 2 and s["std"] == pytest.approx(math.sqrt(2))
    assert (s["p5"], s["p50"], s["p95"]) == pytest.approx((1.2, 3.0, 4.8))


def test_rouge_hand_computed():
    same, none, part = evaluate.rouge(["the cat sat", "dogs run", "the cat sat"],
                                      ["the cat sat", "a bird flew", "the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert none == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
    # unigrams: precision 3/3, recall 3/6 -> F 2/3; bigrams: 2/2 and 2/5 -> F 4/7; LCS 3
    assert part["rouge1"] == pytest.approx(200 / 3)
    assert part["rouge2"] == pytest.approx(400 / 7)
    assert part["rougeL"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("text,truncated,abrupt", [
    ("i broke the vase.", False, False), ("she said no!", False, False),
    ("i broke the vase and then", False, True), ("so yeah...", False, True),
    ("all done.", True, True), ("", False, True), ('he said "fine."', False, False)])
def test_abrupt_endings(text, truncated, abrupt):
    assert evaluate.is_abrupt(text, truncated) is abrupt


def _sample(model, length, rouge_l, eos=True):
    return {"model": model, "length_chars": length, "length_tokens": length // 4,
            "ended_with_eos": eos, "truncated": not eos, "abrupt": not eos, "reward": 0.5,
            "rouge1": rouge_l, "rouge2": rouge_l / 2, "rougeL": rouge_l}


def test_summarize_and_compare_hand_made():
    samples = [_sample("sft", 100, 20.0), _sample("sft", 200, 30.0, eos=False),
               _sample("rl", 140, 24.0), _sample("rl", 160, 28.0)]
    models = {m: evaluate.summarize([s for s in samples if s["model"] == m]) for m in ("sft", "rl")}
    assert models["sft"]["length_chars"]["var"] == 2500 and models["rl"]["length_chars"]["var"] == 100
    assert models["sft"]["eos_rate"] == 0.5 and models["sft"]["truncation_rate"] == 0.5
    assert models["rl"]["rougeL"] == 26.0
    cross = evaluate.compare(models, samples, n_boot=200, seed=0)
    assert cross["variance_ratio"] == 25.0
    assert cross["mean_change"] == 0.0
    assert cross["rougeL_diff"] == pytest.approx(1.0)
    assert evaluate.compare({"sft": models["sft"]}, samples, 10, 0) == {}


def test_bootstrap_interval_brackets_the_ratio():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(400, generator=g) * 3).tolist()
    b = torch.randn(400, generator=g).tolist()
    lo, hi = evaluate.bootstrap_ratio(a, b, n=500, seed=1)
    point = torch.tensor(a).var(unbiased=False) / torch.tensor(b).var(unbiased=False)
    assert lo < point < hi and 5 < lo and hi < 14


def test_subreddit_parsed():
    assert evaluate.subreddit("SUBREDDIT: r/tifu\n\nPOST: x") == "tifu"
    assert evaluate.subreddit("no header") == ""


def test_kl_of_an_unchanged_policy_is_zero(tiny_cfg, tmp_path):
    from posttrain import sft
    from posttrain.rollout.collect import sample_rollouts as sample_records
    from posttrain.rollout.prompts import prompt_pool

    cfg = tiny_cfg("sft.max_steps=1", "data.max_train_rows=4")
    sft.run(cfg)
    tok = modeling.load_tokenizer(cfg.model)
    model = modeling.load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter",
                                 rl="new").eval()
    texts, ids = prompt_pool("sample", "validation", tok, cfg)
    with torch.no_grad():
        recs = sample_records(model, tok, texts[:2], ids[:2], 3, 8, torch.Generator().manual_seed(0))
    kl = evaluate.kl_to_sft(model, recs, tok.pad_token_id, torch.device("cpu"), torch.float32, 2)
    assert kl["kl_k3"] == pytest.approx(0.0, abs=1e-6) and kl["kl_k1"] == pytest.approx(0.0, abs=1e-6)


def test_judge_rows_that_training_never_read(tiny_cfg):
    """generate.max_prompts bounds the prompts generate and online RL draw from;
    eval.skip_prompts starts the judged rows after them, on the same file."""
    from posttrain.rollout.prompts import heldout_rows, prompt_pool, train_prompt_pool

    cfg = tiny_cfg("generate.max_prompts=5", "eval.models=[base]", "eval.prompts=sample",
                   "eval.prompts_split=train", "eval.skip_prompts=5", "eval.num_prompts=3",
                   "eval.samples_per_prompt=1", "generate.max_new_tokens=4")
    tok = modeling.load_tokenizer(cfg.model)
    texts, ids = train_prompt_pool(tok, cfg)
    all_texts, all_ids = prompt_pool("sample", "train", tok, cfg)
    assert texts == all_texts[:5] and ids == all_ids[:5] and len(all_texts) > 8
    evaluate.run(cfg)
    lines = (cfg.run_dir / "eval" / "prompts.jsonl").read_text().splitlines()
    judged = [json.loads(line)["prompt"] for line in lines]
    assert judged == [r["prompt"] for r in heldout_rows("sample", "train", tok, cfg)[0][5:8]]
    assert not set(judged) & set(texts)
