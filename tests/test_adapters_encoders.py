"""Stage-wise replay of the encoder and vision adapters matches the Hugging Face forward bitwise."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("aftune") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from aftune.errors import InputError  # noqa: E402
from aftune.models import adapter_class  # noqa: E402
from aftune.models.encoder import BertAdapter  # noqa: E402
from aftune.models.vision import Dinov2Adapter, ResNetAdapter, ViTAdapter  # noqa: E402

NUM_LABELS = 3
ATTENTION = ("eager", "sdpa")


# --- tiny models and batches -------------------------------------------------------------------


def _build(config, attn: str | None = None):
    torch.manual_seed(0)
    auto = (
        transformers.AutoModelForSequenceClassification
        if config.model_type == "bert"
        else transformers.AutoModelForImageClassification
    )
    kwargs = {"attn_implementation": attn} if attn else {}
    return auto.from_config(config, **kwargs)


def bert_model(attn: str = "sdpa", dropout: float = 0.0):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        type_vocab_size=2,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return _build(config, attn)


def bert_batch(padded: bool = True):
    g = torch.Generator().manual_seed(1)
    b, t = 3, 8
    input_ids = torch.randint(1, 64, (b, t), generator=g)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    if padded:
        attention_mask[0, 5:] = 0  # right padding
        attention_mask[2, 3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    token_type_ids = torch.zeros(b, t, dtype=torch.long)
    token_type_ids[:, 2:4] = 1
    token_type_ids = token_type_ids * attention_mask
    labels = torch.tensor([0, 2, 1], dtype=torch.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": labels,
    }


def vit_model(attn: str = "sdpa", dropout: float = 0.0):
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return _build(config, attn)


def dinov2_model(attn: str = "sdpa", dropout: float = 0.0, swiglu: bool = False):
    config = transformers.Dinov2Config(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        drop_path_rate=dropout,
        use_swiglu_ffn=swiglu,
    )
    return _build(config, attn)


def resnet_model(layer_type: str = "basic"):
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[16, 32],
        depths=[1, 2],
        layer_type=layer_type,
        num_labels=NUM_LABELS,
    )
    return _build(config)


def image_batch(size: int = 16):
    g = torch.Generator().manual_seed(2)
    return {
        "pixel_values": torch.randn(4, 3, size, size, generator=g),
        "labels": torch.tensor([0, 2, 1, 2], dtype=torch.int64),
    }


def run_stages(adapter, batch):
    context = adapter.context(batch)
    hidden = None
    for index in range(len(adapter.stages)):
        hidden = adapter.run_stage(index, hidden, context)
    return hidden


def hf_loss(model, batch):
    return model(**batch).loss


def assert_same_loss(adapter, model, batch, mode: str):
    model.train(mode == "train")
    staged = run_stages(adapter, batch)
    full = hf_loss(model, batch)
    assert staged.dim() == 0
    assert torch.equal(staged, full), (staged.item(), full.item())


def assert_shared_parameters(adapter, model):
    own = {id(p) for p in model.parameters()}
    covered = set()
    for stage in adapter.stages:
        params = list(stage.module.parameters())
        assert params, f"stage {stage.name} has no parameters"
        for p in params:
            assert id(p) in own, f"stage {stage.name} holds a parameter that is not the model's"
        covered |= {id(p) for p in params}
    assert covered == own, "some model parameters belong to no stage"
    names = [s.name for s in adapter.stages]
    assert names[0] == "embedding" and names[-1] == "head"
    assert names[1:-1] == [f"layer.{i}" for i in range(len(names) - 2)]


# --- BERT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("padded", [True, False])
def test_bert_stages_match_forward(attn, mode, padded):
    model = bert_model(attn)
    adapter = BertAdapter(model)
    assert_same_loss(adapter, model, bert_batch(padded), mode)


def test_bert_stages_share_parameters():
    model = bert_model()
    adapter = BertAdapter(model)
    assert len(adapter.stages) == 1 + model.config.num_hidden_layers + 1
    assert_shared_parameters(adapter, model)
    assert adapter.stages[1].module.layer is model.bert.encoder.layer[0]


@pytest.mark.parametrize("attn", ATTENTION)
def test_bert_dropout_replay_is_deterministic(attn):
    model = bert_model(attn, dropout=0.2).train()
    adapter = BertAdapter(model)
    batch = bert_batch()
    torch.manual_seed(7)
    first = run_stages(adapter, batch)
    torch.manual_seed(7)
    second = run_stages(adapter, batch)
    assert torch.equal(first, second)
    torch.manual_seed(7)
    assert torch.equal(first, hf_loss(model, batch))  # same random draws, in the same order
    torch.manual_seed(8)
    assert not torch.equal(first, run_stages(adapter, batch))  # dropout is really active


def test_bert_mask_is_additive_padding_mask():
    model = bert_model()
    batch = bert_batch()
    mask = BertAdapter(model).context(batch)["attention_mask"]
    assert mask.shape == (3, 1, 1, 8) and mask.dtype == torch.float32
    assert torch.equal(mask[:, 0, 0] == 0, batch["attention_mask"].bool())


# --- ViT and DINOv2 ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vit_stages_match_forward(attn, mode):
    model = vit_model(attn)
    assert_same_loss(ViTAdapter(model), model, image_batch(), mode)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_stages_match_forward(attn, mode, swiglu):
    model = dinov2_model(attn, swiglu=swiglu)
    assert_same_loss(Dinov2Adapter(model), model, image_batch(), mode)


@pytest.mark.parametrize("factory,adapter_cls", [(vit_model, ViTAdapter), (dinov2_model, Dinov2Adapter)])
def test_vision_transformer_stages_share_parameters(factory, adapter_cls):
    model = factory()
    adapter = adapter_cls(model)
    assert len(adapter.stages) == 1 + model.config.num_hidden_layers + 1
    assert_shared_parameters(adapter, model)


@pytest.mark.parametrize("factory,adapter_cls", [(vit_model, ViTAdapter), (dinov2_model, Dinov2Adapter)])
def test_vision_transformer_dropout_replay_is_deterministic(factory, adapter_cls):
    model = factory(dropout=0.2).train()  # DINOv2: drop-path too
    adapter = adapter_cls(model)
    batch = image_batch()
    torch.manual_seed(3)
    first = run_stages(adapter, batch)
    torch.manual_seed(3)
    assert torch.equal(first, run_stages(adapter, batch))
    torch.manual_seed(3)
    assert torch.equal(first, hf_loss(model, batch))
    torch.manual_seed(4)
    assert not torch.equal(first, run_stages(adapter, batch))


def test_vit_casts_pixel_values_like_the_model():
    model = vit_model().double()
    batch = image_batch()  # float32 pixels into a float64 model: ViTModel casts them
    assert_same_loss(ViTAdapter(model), model, batch, "eval")


# --- ResNet --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_stages_match_forward_and_share_parameters(layer_type):
    model = resnet_model(layer_type)
    adapter = ResNetAdapter(model)
    # stem, one stage per residual layer (depths [1, 2] flattened), head
    assert [s.name for s in adapter.stages] == ["embedding", "layer.0", "layer.1", "layer.2", "head"]
    flat = [layer for stage in model.resnet.encoder.stages for layer in stage.layers]
    assert [s.module.layer for s in adapter.stages[1:-1]] == flat
    assert_shared_parameters(adapter, model)
    assert_same_loss(adapter, model, image_batch(32), "eval")


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_train_updates_batchnorm_like_forward(layer_type):
    base = resnet_model(layer_type).train()
    staged_model, full_model = copy.deepcopy(base), copy.deepcopy(base)
    batch = image_batch(32)
    staged = run_stages(ResNetAdapter(staged_model), batch)
    full = hf_loss(full_model, batch)
    assert torch.equal(staged, full)
    staged_buffers = dict(staged_model.named_buffers())
    full_buffers = dict(full_model.named_buffers())
    assert staged_buffers.keys() == full_buffers.keys()
    running = [n for n in staged_buffers if n.endswith("running_mean")]
    assert running
    for name, value in staged_buffers.items():
        assert torch.equal(value, full_buffers[name]), name
    # the stats did move
    moved = dict(base.named_buffers())
    assert any(not torch.equal(staged_buffers[n], moved[n]) for n in running)


# --- registry and validation ---------------------------------------------------------------------


def test_families_are_registered():
    assert adapter_class("bert") is BertAdapter
    assert adapter_class("vit") is ViTAdapter
    assert adapter_class("dinov2") is Dinov2Adapter
    assert adapter_class("resnet") is ResNetAdapter
    for cls in (BertAdapter, ViTAdapter, Dinov2Adapter, ResNetAdapter):
        assert cls.task == "classification"


def test_regression_heads_are_rejected():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=1,
    )
    with pytest.raises(InputError):
        ViTAdapter(_build(config))


def test_float_labels_are_rejected():
    model = resnet_model()
    adapter = ResNetAdapter(model)
    batch = image_batch(32)
    batch["labels"] = batch["labels"].float()
    with pytest.raises(InputError):
        run_stages(adapter, batch)
