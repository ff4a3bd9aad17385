"""What SFT and RL share: processes and devices (dist.py), resumable checkpoints
(checkpoint.py) and the training loop with its optimizer and schedule (loop.py)."""
