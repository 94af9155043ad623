"""Tensors absent from a base checkpoint (SPEC.md 4.7): a classifier fine-tuned from a base
encoder (a BERT checkpoint without `classifier.*`, as all-MiniLM-L6-v2 ships) gets its new head
from the agreement's seed, so agreement and training hold the same bytes and the run verifies
PASS; without a seed loading refuses; a provider drawing the head otherwise is refused by name.

    python -m pytest -p no:cacheprovider -q -n 0 tests/test_heads.py
"""

from __future__ import annotations

import shutil

import pytest
import torch

from aftune.core.signing import PublicKey
from aftune.errors import InputError
from aftune.models import HeadInit, load_pretrained
from aftune.models import heads
from aftune.training.agreement import make_agreement
from aftune.training.settings import TrainSettings
from aftune.training.train import train
from aftune.training.verify import Verifier
from conftest import BUILTIN, TOKENIZER_FILES, _configs

SETTINGS = dict(steps=2, batch_size=4, seq_len=16, layers_per_block=2, steps_per_block=1, lr=1e-2, boundaries="stored")


@pytest.fixture(scope="module")
def base_encoder(tmp_path_factory):
    """A BERT base checkpoint (encoder and pooler, no classifier) whose config asks for 3 labels."""
    import transformers as tf

    d = tmp_path_factory.mktemp("encoder") / "base"
    torch.manual_seed(0)
    tf.BertModel(_configs()["bert"]).save_pretrained(str(d))
    for f in TOKENIZER_FILES:
        shutil.copy(BUILTIN / "model" / f, d / f)
    return d


def test_absent_tensor_vector():
    w = heads.absent_tensor(HeadInit("blake3", 7), "classifier.weight", (2, 4), torch.float32)
    bits = [f"{int(x) & 0xffffffff:08x}" for x in w.view(torch.int32).view(-1).tolist()]
    assert bits == VECTOR, bits  # SPEC.md 4.7
    assert torch.equal(heads.absent_tensor(HeadInit("blake3", 7), "classifier.bias", (2,), torch.float32),
                       torch.zeros(2))


def test_absent_tensor_matches_the_spec_text():
    """An independent reading of SPEC.md 4.7 (hashlib-free BLAKE3 stream, struct packing)."""
    import math
    import struct

    import blake3

    tag, seed, name, shape = b"aftune.v1.head-init\x00", 7, b"classifier.weight", (2, 4)
    words, j = [], 0
    while len(words) < 8:
        digest = blake3.blake3(tag + struct.pack(">Q", seed) + struct.pack(">I", len(name)) + name
                               + struct.pack(">Q", j)).digest()
        words += struct.unpack(">4Q", digest)
        j += 1
    values = [(2 * ((w >> 11) * 2.0 ** -53) - 1) / math.sqrt(4) for w in words[:8]]
    bits = [f"{struct.unpack('>I', struct.pack('>f', v))[0]:08x}" for v in values]
    assert bits == VECTOR


def test_loading_refuses_absent_tensors_without_a_seed(base_encoder):
    with pytest.raises(InputError, match="classifier.bias, classifier.weight.*agreement's seed"):
        load_pretrained(base_encoder, "sdpa", torch.float32)
    _, a = load_pretrained(base_encoder, "sdpa", torch.float32, head_init=HeadInit("blake3", 1))
    _, b = load_pretrained(base_encoder, "sdpa", torch.float32, head_init=HeadInit("blake3", 1))
    _, c = load_pretrained(base_encoder, "sdpa", torch.float32, head_init=HeadInit("blake3", 2))
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert a.classifier.weight.abs().max() > 0 and a.classifier.weight.abs().max() <= 32 ** -0.5


def test_new_head_trains_under_the_agreement_and_verifies(base_encoder, datasets, tmp_path):
    agreement = make_agreement(base_encoder, datasets["labeled"], TrainSettings(seed=3, **SETTINGS))
    assert "classifier.weight" in agreement.base_tensors  # the agreement commits the drawn head
    result = train(base_encoder, datasets["labeled"], tmp_path / "run", agreement=agreement)
    report = Verifier(tmp_path / "run", PublicKey.load(result.public_key_path), agreement).verify_all()
    assert report.verdict == "PASS", report.summary()
    assert all(r.compared > 0 for r in report.results)


def test_a_head_drawn_otherwise_is_refused(base_encoder, datasets, tmp_path, monkeypatch):
    agreement = make_agreement(base_encoder, datasets["labeled"], TrainSettings(seed=3, **SETTINGS))
    drawn = heads.absent_tensor
    monkeypatch.setattr(heads, "absent_tensor",  # the provider's own draw: another seed
                        lambda init, *a: drawn(HeadInit(init.algorithm, init.seed + 1), *a))
    with pytest.raises(InputError, match="base_model.tensors.classifier.weight"):
        train(base_encoder, datasets["labeled"], tmp_path / "run", agreement=agreement)


VECTOR = ["3e2c589f", "be9f7a18", "3e4faa2d", "be1fa3dd", "3caf637e", "bd6ed4a8", "bea6bed0", "3eef6e35"]
