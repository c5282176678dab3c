"""Decoder models, checkpoints and sampling."""

from entropo.models.config import ModelConfig
from entropo.models.transformer import Transformer
from entropo.models.sampler import SampleResult
from entropo.models.sampler import sample
from entropo.models.hf import from_pretrained
from entropo.models.hf import save_pretrained
from entropo.models.tokenizer import Tokenizer
from entropo.models.tokenizer import load_tokenizer
from entropo.models.truncation import truncate_logits
