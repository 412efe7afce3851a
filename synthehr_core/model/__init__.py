"""Stage 3, model: HALO / ConSequence, tensors, training (mixed precision, DP-SGD, DDP), checkpoints and
sampling. The only folder whose modules may import torch (tests/test_architecture.py enforces it)."""
