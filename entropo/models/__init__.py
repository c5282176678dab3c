"""Decoder models, checkpoints and sampling."""

from entropo.models.config import ModelConfig
from entropo.models.transformer import Transformer
