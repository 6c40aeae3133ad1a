"""What comes out of a run: exports, model cards, embeddings, evaluation (also during training)."""
