"""The small vision task every training-side attack is measured on.

    python -c "from aftune.attacks.task import prepare_task; print(prepare_task('work/task'))"

A tiny ViT (4 layers of width 32, 16 x 16 images, 4 x 4 patches) is pretrained briefly on a
synthetic *orientations* task (stripes at six angles) with a plain AdamW loop, and that
checkpoint, with a fresh 4-way head, plays the public pretrained model the client hands to the
provider. The agreed fine-tuning task is a synthetic *textures* task (horizontal, vertical and
diagonal stripes and a checkerboard, at random colours, phases and periods, with pixel noise),
written as an image folder that `aftune train` reads. Everything is generated from a seed, so
two processes preparing the same `VisionTask` get identical data; the agreed fine-tune (48 SGD
steps, `finetune_settings`) reaches about 85% test accuracy in about 10 s on one CPU thread.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

TEXTURE_CLASSES = ("horizontal", "vertical", "diagonal", "checker")
ORIENTATION_CLASSES = tuple(f"{30 * k}deg" for k in range(6))
TASK_FORMAT = "aftune.attack-task.v1"


@dataclass(frozen=True)
class VisionTask:
    """The model and data the attacks use (all fields are part of the cached assets' identity)."""

    image_size: int = 16  # pixels per side
    patch_size: int = 4  # ViT patch side
    hidden_size: int = 32  # ViT width
    num_layers: int = 4  # ViT layers (with layers_per_block=1: 4 layer blocks)
    train_per_class: int = 48  # fine-tuning examples per class (the image folder)
    test_per_class: int = 64  # held-out examples per class (accuracy, attack success)
    pretrain_steps: int = 300  # plain-torch pretraining of the "public" base model (orientations)
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(TEXTURE_CLASSES)


@dataclass(frozen=True)
class TaskAssets:
    """Files and tensors of a prepared task."""

    task: VisionTask
    root: Path
    base_model: Path  # Hugging Face directory: the agreed base model
    train_data: Path  # image folder: the agreed fine-tuning data
    test_images: torch.Tensor  # uint8 [N, 3, H, W]
    test_labels: torch.Tensor  # int64 [N]
    train_images: torch.Tensor  # uint8, the image folder's examples in aftune's dataset order
    train_labels: torch.Tensor


# --- images ------------------------------------------------------------------------------------

def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colours far enough apart that the pattern is visible."""
    while True:
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.abs(a - b).sum() > 0.9:
            return a, b


def texture_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [3, size, size] float image in [0, 1] of texture class `label`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(3.0, 5.0)
    phase = rng.uniform(0, 2 * math.pi)
    coord = {0: y, 1: x, 2: (x + y) / math.sqrt(2), 3: None}[label]
    if coord is None:
        mask = (np.sin(2 * math.pi * x / period + phase) * np.sin(2 * math.pi * y / period + phase)) > 0
    else:
        mask = np.sin(2 * math.pi * coord / period + phase) > 0
    fg, bg = _colours(rng)
    img = np.where(mask[None], fg[:, None, None], bg[:, None, None])
    img = img + rng.normal(0, 0.08, img.shape)
    return np.clip(img, 0, 1)


def orientation_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [3, size, size] float image in [0, 1]: stripes at angle 30 * label degrees (pretraining only)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = math.radians(30 * label + rng.uniform(-5, 5))
    coord = x * math.cos(angle) + y * math.sin(angle)
    mask = np.sin(2 * math.pi * coord / rng.uniform(3.0, 6.0) + rng.uniform(0, 2 * math.pi)) > 0
    fg, bg = _colours(rng)
    img = np.where(mask[None], fg[:, None, None], bg[:, None, None])
    img = img + rng.normal(0, 0.08, img.shape)
    return np.clip(img, 0, 1)


def make_images(kind: str, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, size, size], int64 labels [N]), classes interleaved."""
    draw, classes = (texture_image, TEXTURE_CLASSES) if kind == "textures" else (orientation_image, ORIENTATION_CLASSES)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(per_class):
        for c in range(len(classes)):
            images.append(np.round(draw(c, size, rng) * 255).astype(np.uint8))
            labels.append(c)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] (or float in [0, 1]) -> the model's input, as aftune's batches do
    ((x - 0.5) / 0.5, data.BatchSpec's mean and std)."""
    x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images
    return (x - 0.5) / 0.5


def class_folders(classes: tuple[str, ...]) -> list[str]:
    """Folder names that sort in class order (aftune numbers classes by sorted folder name)."""
    return [f"{c}-{name}" for c, name in enumerate(classes)]


def write_image_folder(images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], root: Path) -> Path:
    from PIL import Image

    folders = class_folders(classes)
    for name in folders:
        (root / name).mkdir(parents=True, exist_ok=True)
    counts = [0] * len(classes)
    for img, label in zip(images, labels):
        c = int(label)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / folders[c] / f"{counts[c]:04d}.png")
        counts[c] += 1
    return root


# --- models ------------------------------------------------------------------------------------

def vit_config(task: VisionTask, num_labels: int):
    import transformers as tf

    return tf.ViTConfig(hidden_size=task.hidden_size, num_hidden_layers=task.num_layers, num_attention_heads=4,
                        intermediate_size=2 * task.hidden_size, image_size=task.image_size,
                        patch_size=task.patch_size, num_labels=num_labels)


def train_plain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, *, lr: float = 3e-3,
                batch_size: int = 32, seed: int = 0) -> None:
    """Plain-torch AdamW training (the pretraining of the public model, the attacker's surrogates)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    x_all = normalize(images)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(pixel_values=x_all[idx]).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_base_model(task: VisionTask, out: Path) -> Path:
    """Pretrain on stripe orientations, then give the model a fresh 4-way head: the agreed base model."""
    import transformers as tf

    torch.manual_seed(task.seed)
    pre = tf.ViTForImageClassification(vit_config(task, len(ORIENTATION_CLASSES)))
    images, labels = make_images("orientations", 64, task.image_size, task.seed + 1000)
    train_plain(pre, images, labels, task.pretrain_steps, seed=task.seed)
    torch.manual_seed(task.seed + 1)
    model = tf.ViTForImageClassification(vit_config(task, task.num_classes))
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)
    model.config.id2label = dict(enumerate(class_folders(TEXTURE_CLASSES)))
    model.config.label2id = {n: i for i, n in enumerate(class_folders(TEXTURE_CLASSES))}
    model.save_pretrained(str(out))
    return out


def load_classifier(model_dir: str | Path) -> nn.Module:
    """A fine-tuned model from RUN/model (or any HF directory), in eval mode, float32."""
    from ..models import load_pretrained

    _, model = load_pretrained(Path(model_dir), "eager", torch.float32)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for normalised inputs x."""
    out = [model(pixel_values=x[i:i + batch_size]).logits.argmax(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, normalize(images)) == labels).float().mean())


# --- preparation (cached) ----------------------------------------------------------------------

def _image_folder_order(root: Path) -> list[tuple[int, int]]:
    """(class, index within class) in aftune's dataset order (data._load_image_folder)."""
    from ..data import load_dataset

    ds = load_dataset(root)
    out = []
    for e in ds.examples:
        c = ds.labels.index(e.label)
        out.append((c, int(Path(e.image_path).stem)))
    return out


def prepare_task(root: str | Path, task: VisionTask = VisionTask()) -> TaskAssets:
    """Write (or reuse) the base model, the fine-tuning image folder and the test set under root."""
    from safetensors.torch import load_file, save_file

    root = Path(root)
    stamp = {"format": TASK_FORMAT, **asdict(task)}
    marker = root / "task.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        if root.exists() and any(root.iterdir()):
            from ..errors import InputError

            raise InputError(f"{root} holds another task's assets (or other files): choose an empty --work-dir")
        root.mkdir(parents=True, exist_ok=True)
        build_base_model(task, root / "base-model")
        train_x, train_y = make_images("textures", task.train_per_class, task.image_size, task.seed + 1)
        write_image_folder(train_x, train_y, TEXTURE_CLASSES, root / "data" / "textures")
        test_x, test_y = make_images("textures", task.test_per_class, task.image_size, task.seed + 2)
        save_file({"images": test_x.contiguous(), "labels": test_y}, str(root / "test.safetensors"))
        marker.write_text(json.dumps(stamp, indent=1))
    test = load_file(str(root / "test.safetensors"))
    train_x, train_y = make_images("textures", task.train_per_class, task.image_size, task.seed + 1)
    per_class = {c: [i for i in range(len(train_y)) if int(train_y[i]) == c] for c in range(task.num_classes)}
    order = [per_class[c][k] for c, k in _image_folder_order(root / "data" / "textures")]
    return TaskAssets(task, root, root / "base-model", root / "data" / "textures", test["images"], test["labels"],
                      train_x[order], train_y[order])


# --- fine-tuning through aftune -----------------------------------------------------------------

class torch_threads:
    """Run a block of tiny-model work with a fixed intra-op thread count (restored after).
    One thread is fastest for these models on a shared 2-core machine, and a recorded run
    commits the count its strict replay must use."""

    def __init__(self, n: int | None):
        self.n, self.previous = n, None

    def __enter__(self):
        self.previous = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


def finetune_settings(steps: int = 48, **overrides):
    """The agreed fine-tuning configuration of the attack experiments: SGD with momentum (as
    WBP's victim), 1 layer per layer block (4 layer blocks), 4 steps per step block, boundaries
    stored (every run is verified in full right after training, SPEC.md 3.8)."""
    from ..training.settings import TrainSettings

    values = dict(steps=steps, batch_size=16, optimizer="sgd", lr=0.005, momentum=0.9, max_grad_norm=1.0,
                  layers_per_block=1, steps_per_block=4, attn_implementation="eager", boundaries="stored")
    return TrainSettings(**{**values, **overrides})


def agreed(assets: TaskAssets, settings=None):
    """The client's agreement of the attack experiments: the agreed base model, data and settings
    (every attack run is verified against it, whatever its own run config says)."""
    from ..training.agreement import make_agreement

    return make_agreement(assets.base_model, assets.train_data, settings or finetune_settings())


def fine_tune(assets: TaskAssets, run_dir: str | Path, settings=None, deviation=None, threads: int | None = 1):
    """Record a fine-tune of the agreed base model on the agreed data (honest without a deviation).
    Returns aftune.train.TrainResult."""
    from ..training.train import train

    with torch_threads(threads):
        return train(assets.base_model, assets.train_data, run_dir, settings or finetune_settings(),
                     deviation=deviation)
