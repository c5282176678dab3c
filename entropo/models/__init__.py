"""Decoder models, checkpoints and sampling."""

from entropo.models.config import ModelConfig
from entropo.models.transformer import Transformer
from entropo.models.transformer import with_precision
from entropo.models.sampler import SampleResult
from entropo.models.sampler import sample
from entropo.models.inflight import InFlightStats
from entropo.models.inflight import sample_in_flight
from entropo.models.hf import from_pretrained
from entropo.models.hf import save_pretrained
from entropo.models.tokenizer import Tokenizer
from entropo.models.tokenizer import load_tokenizer
from entropo.models.truncation import truncate_logits
from entropo.models.lora import LoRAConfig
from entropo.models.lora import add_lora
from entropo.models.lora import cast_base
from entropo.models.lora_peft import load_lora
from entropo.models.lora import lora_disabled
from entropo.models.lora import merge_lora
from entropo.models.lora_peft import save_lora
