"""`txl_pbc` TFDS dataset (`tfds build tfds_lld/txl_pbc --manual_dir=... --config=full|sparse`)."""

from .txl_pbc_dataset_builder import Builder
