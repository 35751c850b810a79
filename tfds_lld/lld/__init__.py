"""`lld` TFDS dataset (`tfds build tfds_lld/lld --manual_dir=... --config=full|sparse`)."""

from .lld_dataset_builder import Builder
