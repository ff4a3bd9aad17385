"""Write a randomly initialised causal LM of a known shape, for throughput measurements
without downloading weights (the sampled text is noise; the FLOPs are the real model's).

    python bench/random_model.py --shape llama-3.2-1b --tokenizer TOKENIZER_FOLDER --out DIR

The tokenizer folder sets the vocabulary (e.g. the embedded SmolLM2's, written by any
posttrain run to ~/.cache/posttrain/smollm2-135m-instruct-*). Weights are saved in bf16
safetensors; posttrain loads them like any local model (model.name=DIR).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SHAPES = {  # the published architectures' sizes (vocabulary from --tokenizer)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = Path(args.out)
    model.save_pretrained(out)
    for f in Path(args.tokenizer).iterdir():
        if f.is_file() and not f.name.startswith(("model", "config")):
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {args.shape}, {n / 1e6:.0f}M parameters, vocab {len(tok)}")


if __name__ == "__main__":
    main()
