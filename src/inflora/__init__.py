"""InfLoRA: interference-free low-rank adaptation for continual learning."""
