"""eval metrics on hand-made samples: length summaries, ROUGE, abrupt endings, the models'
summaries and comparison, the bootstrap interval, the subreddit."""
import math

import pytest
import torch

from posttrain.evaluate import stats as evaluate
from posttrain.rewards import is_abrupt


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
    assert is_abrupt(text, truncated) is abrupt


def _sample(model, length, rouge_l, eos=True):
    return {"model": model, "length_chars": length, "length_tokens": length // 4,
            "ended_with_eos": eos, "truncated": not eos, "abrupt": not eos, "reward": 0.5,
            "rouge1": rouge_l, "rouge2": rouge_l / 2, "rougeL": rouge_l}


def test_summarize_and_compare_hand_made():
    samples = [_sample("sft", 100, 20.0), _sample("sft", 200, 30.0, eos=False),
               _sample("rl", 140, 24.0), _sample("rl", 160, 28.0)]
    models = {m: evaluate.summarize([s for s in samples if s["model"] == m]) for m in ("sft", "rl")}
    assert (
        models["sft"]["length_chars"]["var"] == 2500 and models["rl"]["length_chars"]["var"] == 100
    )
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


def test_relative_bootstrap_ignores_a_change_of_scale():
    """The relative ratio (of var / mean^2) is the plain ratio with each side's scale taken
    out: halving every length of b multiplies the plain interval by 4 and leaves the relative
    one as it was (the same draws); the relative point lies inside its interval, which for a
    shorter b (std 60 at mean ~150 against 20 at 100: plain ~9, relative ~4) lies below the
    plain one."""
    from posttrain.evaluate.stats import relative_variance
    g = torch.Generator().manual_seed(0)
    a = (150 + 60 * torch.randn(300, generator=g)).abs().tolist()
    b = (100 + 20 * torch.randn(300, generator=g)).abs().tolist()
    half = [x / 2 for x in b]
    plain = evaluate.bootstrap_ratio(a, b, n=300, seed=2)
    rel = evaluate.bootstrap_ratio(a, b, n=300, seed=2, relative=True)
    assert evaluate.bootstrap_ratio(a, half, n=300, seed=2) == pytest.approx(
        [4 * x for x in plain], rel=1e-9)
    assert evaluate.bootstrap_ratio(a, half, n=300, seed=2, relative=True) == \
        pytest.approx(rel, rel=1e-9)
    point = relative_variance(a) / relative_variance(b)
    assert rel[0] < point < rel[1] and rel[1] < plain[0]
    assert relative_variance([1.0, 3.0]) == 0.25


def test_subreddit_parsed():
    assert evaluate.subreddit("SUBREDDIT: r/tifu\n\nPOST: x") == "tifu"
    assert evaluate.subreddit("no header") == ""


def test_the_eval_scores_with_the_reward_rl_trained_on(tmp_path):
    """rl/reward_lengths.json, when RL wrote it, is what the eval's reward column uses (and
    the report names it); a damaged one is an error naming the file; without it, the SFT
    samples here."""
    from posttrain.config import load_config
    from posttrain.evaluate.report import reward_lengths
    from posttrain.io import InputFileError
    cfg = load_config(None, (f"out_dir={tmp_path}", "rl.mode=online"))
    samples = [{"model": "sft", "length_chars": 10}, {"model": "rl", "length_chars": 30}]
    assert reward_lengths(cfg, samples) == ([10], "the SFT samples here")
    (tmp_path / "rl").mkdir()
    stored = tmp_path / "rl" / "reward_lengths.json"
    stored.write_text('{"unit": "chars", "lengths": [5, 7], "from": "the first online round"}')
    assert reward_lengths(cfg, samples) == ([5, 7], "RL's reward (the first online round)")
    stored.write_text('{"unit": "tokens", "lengths": [5, 7]}')
    with pytest.raises(InputFileError, match="reward_lengths.json: expected 'unit': 'chars'"):
        reward_lengths(cfg, samples)
