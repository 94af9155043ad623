"""Bidirectional text encoders with a sequence-classification head: BERT.

Stages: the embeddings (word + token type + absolute position, LayerNorm, dropout), one per
encoder layer, and the head (pooler on the first token, dropout, classifier, cross-entropy).
The attention mask is an additive [B, 1, 1, T] padding mask derived from the batch's
`attention_mask`; eager and SDPA attention both broadcast it over heads and queries.

RoBERTa is not accepted here: `RobertaForSequenceClassification` keeps its encoder under
`.roberta`, derives position ids from the padding in `input_ids`, has no pooler, and uses its own
two-layer classification head.

Only single-label classification is supported: integer labels of shape [B], mean cross-entropy,
exactly what Hugging Face computes for `problem_type == "single_label_classification"`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .base import Adapter, Batch, ClassifierHead, Context, Stage, model_dtype, padding_bidirectional_mask

_SUPPORTED_ATTENTION = ("eager", "sdpa")


def check_single_label(config, family: str) -> None:
    """Reject configs whose Hugging Face loss would not be single-label cross-entropy."""
    num_labels = getattr(config, "num_labels", 0)
    if num_labels < 2:
        raise InputError(
            f"{family}: num_labels is {num_labels}; aftune supports single-label classification with at "
            "least 2 labels (regression is not supported)"
        )
    problem_type = getattr(config, "problem_type", None)
    if problem_type not in (None, "single_label_classification"):
        raise InputError(
            f"{family}: problem_type {problem_type!r} is not supported; only single_label_classification is"
        )


def check_attention(config, family: str) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in _SUPPORTED_ATTENTION:
        raise InputError(
            f"{family}: attention implementation {impl!r} is not supported; use one of "
            f"{', '.join(_SUPPORTED_ATTENTION)}"
        )


def layer_output(out) -> torch.Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple (older transformers)."""
    return out[0] if isinstance(out, tuple) else out


class _BertEmbedding(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, hidden, context):
        batch = context["batch"]
        return self.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])


class _BertLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, context):
        return layer_output(self.layer(hidden, attention_mask=context["attention_mask"]))


class _BertHead(ClassifierHead):
    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.classifier = classifier

    def logits(self, hidden):
        return self.classifier(self.dropout(self.pooler(hidden)))


class BertAdapter(Adapter):
    families = ("bert",)
    task = "classification"
    batch_fields = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        config = model.config
        check_single_label(config, "bert")
        check_attention(config, "bert")
        if getattr(config, "is_decoder", False):
            raise InputError("bert: is_decoder=True (causal BERT) is not supported; use a bidirectional encoder")

    def build_stages(self):
        bert = self.model.bert
        if bert.pooler is None:
            raise InputError("bert: the model has no pooler, which its classification head needs")
        stages = [Stage("embedding", _BertEmbedding(bert.embeddings))]
        stages += [Stage(f"layer.{i}", _BertLayer(layer)) for i, layer in enumerate(bert.encoder.layer)]
        stages.append(Stage("head", _BertHead(bert.pooler, self.model.dropout, self.model.classifier)))
        return stages

    def context(self, batch: Batch) -> Context:
        with torch.no_grad():
            mask = padding_bidirectional_mask(batch["attention_mask"], model_dtype(self.model))
        return {"batch": batch, "attention_mask": mask}
