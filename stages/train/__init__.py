"""Training: the one training loop, DP-SGD, and training across processes."""
