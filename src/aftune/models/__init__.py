"""Model families: each adapter splits a Hugging Face model into stages (embedding, one per layer,
head) that the trainer, the verifier and the inference engine run block by block.

The verifier rebuilds every architecture with its own code from a config dict; nothing a
provider wrote is unpickled and no remote code is trusted (`loading`). The adapters own both the
training stages (ending in the loss) and the inference stages (ending in the logits).
"""

from .base import Adapter, Stage
from .heads import HeadInit
from .loading import (TOKENIZER_FILES, build_model, load_pretrained, load_tokenizer, model_commitment, model_files,
                      model_weights, read_config, tokenizer_files, tokenizer_from_files)
from .registry import ADAPTERS, IMAGE_FAMILIES, adapter_class, auto_class_name

__all__ = ["ADAPTERS", "Adapter", "HeadInit", "IMAGE_FAMILIES", "Stage", "TOKENIZER_FILES", "adapter_class", "auto_class_name",
           "build_model", "load_pretrained", "load_tokenizer", "model_commitment", "model_files", "model_weights", "read_config", "tokenizer_files", "tokenizer_from_files"]
