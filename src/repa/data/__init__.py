"""repa.data: Fashion-MNIST, image folders (ADM centre crop), the SD-VAE wrapper, encoder-target caches; sources, ADM .npz, latent shards."""

from repa.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from repa.data.fashion_mnist import IDXFormatError, load_fashion_mnist, read_idx
from repa.data.features import TargetCache, TargetCacheMismatch, build_target_cache
from repa.data.folder import CorruptImageError, ImageFolder, center_crop_arr, load_image_folder, skip_none_collate
from repa.data.vae import LATENT_SCALE, VAE, sample_latents

__all__ = [
    "FASHION_MNIST_CLASSES",
    "LATENT_SCALE",
    "VAE",
    "CorruptImageError",
    "IDXFormatError",
    "ImageFolder",
    "TargetCache",
    "TargetCacheMismatch",
    "build_target_cache",
    "center_crop_arr",
    "load_fashion_mnist",
    "load_image_folder",
    "read_idx",
    "sample_latents",
    "skip_none_collate",
]
