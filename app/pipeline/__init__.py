"""A reading's life: ingest -> batcher -> inference (process pool) -> publish -> hub."""
