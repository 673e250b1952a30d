"""The reading side of the ImageNet parquet at its first import path.

The module was split in two, :mod:`pipeline.data.imagenet_ingest` (writes the shards) and
:mod:`pipeline.data.imagenet_stream` (reads them for training); ``pipeline.train.imagenet`` still
imports ``dataset_info`` and ``streaming_datasets`` from here. New code imports
``imagenet_stream``; once nothing imports this path, the file goes.
"""
from pipeline.data.imagenet_stream import dataset_info, shard_files, streaming_datasets, transform_batch

__all__ = ["dataset_info", "shard_files", "streaming_datasets", "transform_batch"]
