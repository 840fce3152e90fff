"""The metrics wing: metric families from the index and the last plan, the per-model line cache, the `/metrics` body."""
