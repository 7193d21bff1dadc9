"""Stage two: train READ side networks from a cache (see issue 3). Imports `cache_store`, never `transformers`."""
