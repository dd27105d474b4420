"""Reading the model formats users have on disk besides the original checkpoints."""
