"""Supervised fine-tuning data as TRL's `SFTTrainer` defines it (SPEC.md 4.4.1): how one agreed
example becomes token ids and labels, with the model's chat template and the loss mask.

The provider builds these rows to train and the verifier rebuilds them to check the committed
batch; both go through `sft_rows` with the agreement's `SftSettings` (`settings.sft`).

    sft = SftSettings(chat_template=tokenizer.chat_template)   # TRL's defaults otherwise
    ids, labels = sft_example(example, tokenizer, sft, max_length=1024)

Rules, as TRL 1.x's `SFTTrainer._prepare_dataset` and its collator apply them (no packing):
- `text`: the text, with the tokenizer's eos token appended unless it already ends with it,
  tokenized with the tokenizer's special tokens; the loss is on every token;
- `messages`: rendered and tokenized with the agreed chat template; with `assistant_only_loss`
  the loss is on the tokens the template marks `{% generation %}` only;
- `prompt`/`completion` (strings, eos appended to the completion; or message lists, the prompt
  rendered with the generation prompt): the completion starts where the tokenized prompt and the
  tokenized prompt+completion diverge; `completion_only_loss` (default: on, TRL's default for
  this data) keeps the loss on the completion only;
- rows are cut to the first `max_length` ids (TRL's `keep_start`); a row left with no label is
  refused (TRL drops it from the dataset, which would change the agreed examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..models.base import IGNORE_INDEX

MAX_TEMPLATE_CHARS = 1 << 20


@dataclass(frozen=True)
class SftSettings:
    """How examples become supervised fine-tuning rows; `settings.sft` in the agreement."""

    chat_template: str | None = None  # the Jinja chat template text (committed); None: no conversational data
    completion_only_loss: bool | None = None  # prompt/completion data: None (TRL's default) means on
    assistant_only_loss: bool = False  # conversational data: loss on the template's generation spans only

    def problems(self) -> list[str]:
        out = []
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template
                                               or len(self.chat_template) > MAX_TEMPLATE_CHARS):
            out.append(f"sft.chat_template must be null or a non-empty string of at most {MAX_TEMPLATE_CHARS} "
                       "characters")
        if self.completion_only_loss is not None and not isinstance(self.completion_only_loss, bool):
            out.append(f"sft.completion_only_loss must be true, false or null, got {self.completion_only_loss!r}")
        if not isinstance(self.assistant_only_loss, bool):
            out.append(f"sft.assistant_only_loss must be true or false, got {self.assistant_only_loss!r}")
        elif self.assistant_only_loss and self.chat_template is None:
            out.append("sft.assistant_only_loss needs a chat_template (with {% generation %} markers)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"chat_template": self.chat_template, "completion_only_loss": self.completion_only_loss,
                "assistant_only_loss": self.assistant_only_loss}

    @classmethod
    def from_json(cls, obj: Any) -> "SftSettings":
        known = {"chat_template", "completion_only_loss", "assistant_only_loss"}
        if not isinstance(obj, dict) or set(obj) - known:
            raise InputError(f"'settings.sft' must be an object with only the members {sorted(known)}")
        return cls(**obj)


def sft_example(example, tokenizer, sft: SftSettings, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example (SPEC.md 4.4.1); labels are -100 where no loss is taken."""
    masks: list[list[int]] = []
    eos = tokenizer.eos_token
    if example.text is not None:
        text = example.text if eos is None or example.text.endswith(eos) else example.text + eos
        ids = list(tokenizer(text)["input_ids"])
    elif example.messages is not None:
        ids, assistant = _render(tokenizer, sft, example.messages, assistant_mask=sft.assistant_only_loss)
        masks += assistant
    elif example.prompt is not None:
        if isinstance(example.prompt, str):
            completion = example.completion if eos is None or example.completion.endswith(eos) else \
                example.completion + eos
            prompt_ids = list(tokenizer(example.prompt)["input_ids"])
            ids = list(tokenizer(example.prompt + completion)["input_ids"])
        else:
            prompt_ids, _ = _render(tokenizer, sft, example.prompt, generation_prompt=True)
            ids, assistant = _render(tokenizer, sft, example.prompt + example.completion,
                                     assistant_mask=sft.assistant_only_loss)
            masks += assistant
        start = _common_prefix(prompt_ids, ids)
        if sft.completion_only_loss is not False:
            masks.append([0] * start + [1] * (len(ids) - start))
    else:
        raise InputError("an SFT example needs text, messages or prompt/completion")
    labels = [t if all(bits) else IGNORE_INDEX for t, *bits in zip(ids, *masks)]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise InputError("an example has no token to train on once the loss mask is applied and it is cut to "
                         f"{max_length} tokens (TRL drops such examples; aftune refuses them: remove it or raise "
                         "max_length / seq_len)")
    return ids, labels


def _render(tokenizer, sft: SftSettings, messages, generation_prompt: bool = False,
            assistant_mask: bool = False) -> tuple[list[int], list[list[int]]]:
    """Token ids of `messages` rendered with the agreed chat template, and [the assistant mask]
    when asked for."""
    if sft.chat_template is None:
        raise InputError("conversational data (messages, or prompt/completion message lists) needs "
                         "settings.sft.chat_template")
    out = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                        chat_template=sft.chat_template, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt,
                                        return_assistant_tokens_mask=assistant_mask)
    ids = list(out["input_ids"])
    if not assistant_mask:
        return ids, []
    mask = list(out["assistant_masks"])
    if 1 not in mask:
        raise InputError("assistant_only_loss: an example has no assistant token; the chat template needs "
                         "{% generation %} ... {% endgeneration %} around the assistant's turns")
    return ids, [mask]


def accumulation_weights(labels: list) -> list[float]:
    """Each micro-batch's share of the step's loss, as the Hugging Face Trainer weighs them: its
    predicted tokens (labels after the first position that are not -100) over the step's
    (SPEC.md 4.4.1, 5.2.1); equal shares when the step has none."""
    counts = [int((x[:, 1:] != IGNORE_INDEX).sum()) for x in labels]
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / len(counts)] * len(counts)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


__all__ = ["SftSettings", "accumulation_weights", "sft_example"]
