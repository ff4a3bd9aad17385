"""The eval stage on the tiny model: KL 0 for an unchanged policy, and the judged rows are
ones training never read."""
import json

import pytest
import torch

from posttrain.evaluate import run as evaluate
from posttrain.model.adapters import load_policy
from posttrain.model.load import load_tokenizer


def test_kl_of_an_unchanged_policy_is_zero(tiny_cfg, tmp_path):
    from posttrain import sft
    from posttrain.rollout.collect import sample_rollouts as sample_records
    from posttrain.rollout.prompts import prompt_pool

    cfg = tiny_cfg("sft.max_steps=1", "data.max_train_rows=4")
    sft.run(cfg)
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter",
                                 rl="new").eval()
    texts, ids = prompt_pool("sample", "validation", tok, cfg)
    with torch.no_grad():
        recs = sample_records(
            model, tok, texts[:2], ids[:2], 3, 8, torch.Generator().manual_seed(0)
        )
    kl = evaluate.kl_to_sft(model, recs, tok.pad_token_id, torch.device("cpu"), torch.float32, 2)
    assert kl["kl_k3"] == pytest.approx(0.0, abs=1e-6) and kl["kl_k1"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_judge_rows_that_training_never_read(tiny_cfg):
    """generate.max_prompts bounds the prompts generate and online RL draw from;
    eval.skip_prompts starts the judged rows after them, on the same file."""
    from posttrain.rollout.prompts import heldout_rows, prompt_pool, train_prompt_pool

    cfg = tiny_cfg("generate.max_prompts=5", "eval.models=[base]", "eval.prompts=sample",
                   "eval.prompts_split=train", "eval.skip_prompts=5", "eval.num_prompts=3",
                   "eval.samples_per_prompt=1", "generate.max_new_tokens=4")
    tok = load_tokenizer(cfg.model)
    texts, ids = train_prompt_pool(tok, cfg)
    all_texts, all_ids = prompt_pool("sample", "train", tok, cfg)
    assert texts == all_texts[:5] and ids == all_ids[:5] and len(all_texts) > 8
    evaluate.run(cfg)
    lines = (cfg.run_dir / "eval" / "prompts.jsonl").read_text().splitlines()
    judged = [json.loads(line)["prompt"] for line in lines]
    assert judged == [r["prompt"] for r in heldout_rows("sample", "train", tok, cfg)[0][5:8]]
    assert not set(judged) & set(texts)
