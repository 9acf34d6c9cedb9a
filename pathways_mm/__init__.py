"""pathways-mm: one sparse model for many tasks and modalities, trained with DeepSpeed."""

__version__ = "0.1.0"
