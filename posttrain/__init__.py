"""posttrain: supervised fine-tuning, then RL that shapes one property of the output."""
__version__ = "0.1.0"
