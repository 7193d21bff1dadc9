"""Stage two: train READ side networks from a cache (the network: read_model.py; its definition:
reference.py). Imports `cache_store`, never `pipeline` or `transformers` (tests/test_architecture.py
holds it to that)."""
