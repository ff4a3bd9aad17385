"""Offline fixtures: a tiny Llama-shaped model and a byte-level BPE tokenizer trained on the
bundled sample, saved once per session to a local folder (no network); and the helpers and
constants that tests in both unit/ and integration/ use (`from conftest import ...`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain import view
from posttrain.model.load import load_base_model, load_tokenizer
from posttrain.config import load_config


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.data import sample_path

    text = [json.loads(line)["prompt"] + json.loads(line)["completion"]
            for line in sample_path("train").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = _train_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def rows():
    return [{"prompt": f"SUBREDDIT: r/test\n\nTITLE: post {i}\n\nPOST: my cat knocked over "
                       f"{i} glasses today and i am tired.\n\nTL;DR:",
             "completion": f" cat broke {i} glasses."} for i in range(12)]


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    """A config for the tiny model on the bundled sample, sized to run in seconds."""
    def make(*overrides):
        return load_config(None, (
            f"out_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}", "model.precision=fp32",
            "lora.rank=4", "lora.alpha=8", "data.max_train_rows=24", "data.max_eval_rows=8",
            "data.max_prompt_tokens=1024", "sft.batch_size=4", "sft.max_lr=3e-3",
            "sft.min_lr=3e-4", "sft.warmup_ratio=0.0", "sft.checkpoint_every=2") + overrides)
    return make


TINY = ("model.precision=fp32", "lora.rank=4", "lora.alpha=8", "data.max_train_rows=8",
        "data.max_eval_rows=6", "data.max_prompt_tokens=1024", "sft.max_steps=2",
        "generate.num_samples=12", "generate.samples_per_prompt=4", "generate.batch_size=3",
        "generate.max_new_tokens=10", "rl.batch_size=4", "rl.max_steps=2", "rl.eval_prompts=2",
        "rl.max_lr=1e-2", "rl.min_lr=1e-3", "eval.num_prompts=3", "eval.samples_per_prompt=2",
        "eval.models=[base,sft,rl]", "eval.bootstrap=50")


@pytest.fixture(scope="session")
def tiny_args():
    """Overrides for a whole pipeline on the tiny model in seconds."""
    def make(model_dir, out_dir, *extra):
        return (f"out_dir={out_dir}", f"model.name={model_dir}", *TINY, *extra)
    return make


# the tiny model and its tokenizer (test_sft.py, unit and integration)
def _tiny(cfg):
    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, torch.device("cpu"))
    return tok, model


# the RL tests' overrides (test_rl.py: integration/test_generate_rl.py, unit/test_rl_credit.py)
RL_ARGS = ("generate.num_samples=24", "generate.samples_per_prompt=4", "generate.batch_size=3",
           "generate.max_new_tokens=12", "rl.batch_size=4", "rl.grad_accum=2", "rl.max_lr=1e-2",
           "rl.min_lr=1e-3", "rl.warmup_ratio=0", "rl.eval_prompts=3", "rl.eval_every=2",
           "rl.checkpoint_every=1", "data.max_prompt_tokens=1024")


# the length cue (test_length_control.py: integration, and unit/test_data.py,
# unit/test_rollout_prompts.py)
CUE = "TL;DR (about {length} characters):"


# a viewer page of hostile text (test_pipeline.py: integration, and unit/test_view.py)
EVIL_POST = ('SUBREDDIT: r/evil\n\nTITLE: <script>document.title="pwned"</script>\n\n'
             'POST: " onerror="alert(1)" <img src=x onerror=alert(2)> </script><b>bold</b>'
             '\n\nTL;DR:')


def hostile_page(tmp_path) -> Path:
    prompts = [
        {
            "prompt_index": 0,
            "prompt": EVIL_POST,
            "reference": "<i>ref</i> & more",
            "subreddit": "evil",
            "reference_length_chars": 17,
        },
        {
            "prompt_index": 1,
            "prompt": "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: zebra words",
            "reference": "cat stuff",
            "subreddit": "cats",
            "reference_length_chars": 9,
        },
    ]
    samples = []
    for i, (sft, rl) in enumerate([("<script>alert(3)</script> sft", "x\" onerror=\"alert(4) rl"),
                                   ("a longer sft summary here", "short rl")]):
        for m, text in (("sft", sft), ("rl", rl)):
            samples.append({"model": m, "prompt_index": i, "completion": text,
                            "length_chars": len(text), "length_tokens": 5, "reward": 0.25,
                            "truncated": False, "rougeL": 10.0})
    out = tmp_path / "index.html"
    out.write_text(view.render(view.page_data(prompts, samples, {}, "hostile <run>")))
    return out
