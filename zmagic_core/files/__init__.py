"""Layer 1, files: images in and out, weight files found and loaded safely."""
