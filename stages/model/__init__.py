"""Model code: upcycling and the merged classes, the merge's families, baselines, decoding, domain embeddings."""
