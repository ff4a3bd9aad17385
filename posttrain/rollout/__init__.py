"""Rollouts: the prompts (prompts.py), the one seeded sampling loop (collect.py), the
samplers (hf.py: posttrain's; vllm.py: optional, CUDA) and the generated set on disk
(store.py)."""
