"""The RL stage. train.py holds it top to bottom: where the samples come from (the
generated set offline, rounds online), one optimizer step's batch and loss, and the loop.
Beside it: plan.py (which samples each step trains on), credit.py (rewards, the stop credit,
advantages), held_out.py (the held-out length checks during training)."""
