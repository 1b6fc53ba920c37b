"""Foundations every layer uses: numerics, sharding, images, errors,
resumable work, timing."""
