"""Frozen encoders whose features TiM learns to match or condition on:
``radio`` (NVIDIA RADIO v2.5, the official REPA teacher)."""
