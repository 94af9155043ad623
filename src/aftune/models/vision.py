"""Image classifiers: ViT, DINOv2 and ResNet.

Stages: the embedding (ViT/DINOv2: patch projection, CLS token, position embedding, dropout;
ResNet: the stem convolution and max pool), one per layer (ViT/DINOv2: each transformer layer;
ResNet: each residual layer, flattened across its stages in order), and the head:

- ViT: final LayerNorm, classifier on the CLS token, cross-entropy;
- DINOv2: final LayerNorm, classifier on concat(CLS token, mean of the patch tokens), cross-entropy;
- ResNet: adaptive average pool, flatten, classifier, cross-entropy.

No attention mask is used (every patch attends to every patch), and images must have the
config's size (no position-embedding interpolation), as in the models' default forward.
In train mode ResNet's BatchNorm layers update their running statistics as the stages run,
exactly as the full forward does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .base import Adapter, Batch, ClassifierHead, Context, Stage
from .encoder import check_single_label, layer_output


class _PatchEmbedding(nn.Module):
    """ViT / DINOv2 embeddings: pixel values in the projection's dtype, as `ViTModel` casts them."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, hidden, context):
        pixel_values = context["batch"]["pixel_values"]
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != dtype:
            pixel_values = pixel_values.to(dtype)
        return self.embeddings(pixel_values)


class _TransformerLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, context):
        return layer_output(self.layer(hidden, context["attention_mask"]))


class _ViTHead(ClassifierHead):
    def __init__(self, layernorm: nn.Module, classifier: nn.Module):
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def logits(self, hidden):
        return self.classifier(self.layernorm(hidden)[:, 0, :])


class _Dinov2Head(ClassifierHead):
    def __init__(self, layernorm: nn.Module, classifier: nn.Module):
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def logits(self, hidden):
        sequence = self.layernorm(hidden)
        return self.classifier(torch.cat([sequence[:, 0], sequence[:, 1:].mean(dim=1)], dim=1))


def _image_context(batch: Batch) -> Context:
    pixel_values = batch["pixel_values"]
    if pixel_values.dim() != 4:
        raise InputError(f"pixel_values must have shape [B, C, H, W], got {list(pixel_values.shape)}")
    return {"batch": batch, "attention_mask": None}


class ViTAdapter(Adapter):
    families = ("vit",)
    task = "classification"
    batch_fields = ("pixel_values", "labels")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_single_label(model.config, "vit")

    def build_stages(self):
        vit = self.model.vit
        layers = getattr(vit, "layers", None)
        if layers is None:  # transformers < 5 keeps them under the encoder
            layers = vit.encoder.layer
        stages = [Stage("embedding", _PatchEmbedding(vit.embeddings))]
        stages += [Stage(f"layer.{i}", _TransformerLayer(layer)) for i, layer in enumerate(layers)]
        stages.append(Stage("head", _ViTHead(vit.layernorm, self.model.classifier)))
        return stages

    def context(self, batch: Batch) -> Context:
        return _image_context(batch)


class Dinov2Adapter(Adapter):
    families = ("dinov2",)
    task = "classification"
    batch_fields = ("pixel_values", "labels")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_single_label(model.config, "dinov2")

    def build_stages(self):
        dino = self.model.dinov2
        stages = [Stage("embedding", _PatchEmbedding(dino.embeddings))]
        stages += [Stage(f"layer.{i}", _TransformerLayer(layer)) for i, layer in enumerate(dino.encoder.layer)]
        stages.append(Stage("head", _Dinov2Head(dino.layernorm, self.model.classifier)))
        return stages

    def context(self, batch: Batch) -> Context:
        return _image_context(batch)


class _ResNetEmbedding(nn.Module):
    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, hidden, context):
        return self.embedder(context["batch"]["pixel_values"])


class _ResNetLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, context):
        return self.layer(hidden)


class _ResNetHead(ClassifierHead):
    def __init__(self, pooler: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier  # nn.Sequential(Flatten, Linear)

    def logits(self, hidden):
        return self.classifier(self.pooler(hidden))


class ResNetAdapter(Adapter):
    families = ("resnet",)
    task = "classification"
    batch_fields = ("pixel_values", "labels")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_single_label(model.config, "resnet")

    def build_stages(self):
        resnet = self.model.resnet
        layers = [layer for stage in resnet.encoder.stages for layer in stage.layers]
        stages = [Stage("embedding", _ResNetEmbedding(resnet.embedder))]
        stages += [Stage(f"layer.{i}", _ResNetLayer(layer)) for i, layer in enumerate(layers)]
        stages.append(Stage("head", _ResNetHead(resnet.pooler, self.model.classifier)))
        return stages

    def context(self, batch: Batch) -> Context:
        return _image_context(batch)
