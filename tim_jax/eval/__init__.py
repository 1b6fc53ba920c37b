"""Evaluation: the shapes oracle, Fréchet distances, InceptionV3 for FID,
and the NFE study."""
