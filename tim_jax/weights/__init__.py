"""Weight files: official checkpoints, PyTorch files, orbax checkpoints."""
