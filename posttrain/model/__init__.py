"""The policy: loading (load.py), LoRA adapters (adapters.py) and the forward passes that
compute logits only where a loss or a sample needs them (forward.py)."""
