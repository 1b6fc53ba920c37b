"""FID for real datasets: Fréchet distances and Inception Score (``fid``),
the FID InceptionV3 in Flax (``inception``)."""
