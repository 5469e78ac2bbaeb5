"""Data: where corpora come from, and the canaries planted in them."""
