"""Evaluation: held-out perplexity (evaluate), downstream accuracy (accuracy) and its statistics
(statistics), their caches on disk (perplexity_cache, accuracy_cache), and the self-check of a written
initialization (selfcheck)."""
