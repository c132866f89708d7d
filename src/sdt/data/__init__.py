"""Data, beside the model stack: image datasets and transforms (Fashion-MNIST, image folders) in
``images``, and the Fashion-MNIST mosaics of the dense tasks in ``mosaic``. The engine's batches are
``Batch`` tuples made by ``collate``."""
from .images import (DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, SEED_STRIDE,
                     AugConfig, Batch, DataConfig, ImageSamples, build_transform, check_data_config, check_images, collate,
                     fashion_mnist, fashion_mnist_tensors, raw_dataset, resolve_in_chans, resolve_num_classes, split_datasets)
from .mosaic import (IGNORE_INDEX, MOSAIC_CLASSES, FashionMosaics, MosaicConfig, check_detection_target, check_mosaic_config,
                     check_semantic_target, describe)

__all__ = ["DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IGNORE_INDEX",
           "MOSAIC_CLASSES", "SEED_STRIDE", "AugConfig", "Batch", "DataConfig", "FashionMosaics", "ImageSamples", "MosaicConfig",
           "build_transform", "check_data_config", "check_detection_target", "check_images", "check_mosaic_config",
           "check_semantic_target", "collate", "describe", "fashion_mnist", "fashion_mnist_tensors", "raw_dataset", "resolve_in_chans",
           "resolve_num_classes", "split_datasets"]
