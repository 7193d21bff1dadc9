"""Stage two: train READ side networks from a cache (DESIGN §2 and §4). Imports `cache_store`, never
`pipeline` or `transformers` (tests/test_architecture.py holds it to that)."""
