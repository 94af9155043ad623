"""Data (SPEC.md 4): datasets and their root, the seeded example order, batches, and the inputs
of inference requests (prompts, texts, images)."""

from .datasets import (BatchSpec, Dataset, Example, OrderCache, build_batch, copy_into, epoch_order,
                       example_from_raw, load_dataset)

__all__ = ["BatchSpec", "Dataset", "Example", "OrderCache", "build_batch", "copy_into", "epoch_order",
           "example_from_raw", "load_dataset"]
