"""Data sets as normalised in-memory tensors, batch-wise augmentation and a fast loader.

Importing the package registers every data set (kdq.data.catalog), so `DATASETS` is complete.
"""

from kdq.data.augment import batch_crop, batch_flip, cutmix, mixup
from kdq.data.catalog import DATASETS
from kdq.data.core import DataBundle, Split, list_datasets, load_dataset
from kdq.data.download import fetch
from kdq.data.loader import BatchLoader

__all__ = [
    "DATASETS", "Split", "DataBundle", "load_dataset", "list_datasets", "BatchLoader",
    "batch_crop", "batch_flip", "mixup", "cutmix", "fetch",
]
