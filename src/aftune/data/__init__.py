"""Data (SPEC.md 4): the agreed datasets and their root (`datasets`), the seeded example order
(`order`), micro-batches (`batches`), and the inputs of inference requests (`inputs`, `images`)."""

from .batches import BatchSpec, build_batch
from .datasets import Dataset, Example, copy_into, example_from_raw, load_dataset
from .order import OrderCache, epoch_order

__all__ = ["BatchSpec", "Dataset", "Example", "OrderCache", "build_batch", "copy_into", "epoch_order",
           "example_from_raw", "load_dataset"]
