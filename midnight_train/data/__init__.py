"""Training input: shard and slide sources -> multi-crop uint8 batches with an exact position."""
