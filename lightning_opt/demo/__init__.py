"""The demo: a tiny GPT trained on the Python standard library's sources (``lightning-opt demo``)."""

from lightning_opt.demo.data import CharDataModule, stdlib_corpus
from lightning_opt.demo.gpt import TinyGPT

__all__ = ["CharDataModule", "TinyGPT", "stdlib_corpus"]
