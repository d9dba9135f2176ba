"""The demo: a tiny GPT trained on the Python standard library's sources (``lightning-opt demo``),
plus the small vision and GAN models the recipes in ``configs/recipes/`` train."""

from lightning_opt.demo.data import CharDataModule, stdlib_corpus
from lightning_opt.demo.gan import RingGaussians, ToyGAN
from lightning_opt.demo.gpt import TinyGPT
from lightning_opt.demo.vision import SyntheticImages, TinyResNet, TinyViT

__all__ = ["CharDataModule", "RingGaussians", "SyntheticImages", "TinyGPT", "TinyResNet", "TinyViT", "ToyGAN", "stdlib_corpus"]
