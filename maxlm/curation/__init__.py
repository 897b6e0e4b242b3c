"""Data curation: cleaning, quality rules, MinHash-LSH dedup, perplexity filtering, the pipeline."""
