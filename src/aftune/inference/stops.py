"""Stop strings (SPEC.md 8.6.2): generation stops after the first token at which the decoded text
contains one of the policy's stop strings, and the answer is that text cut before the first
occurrence, as OpenAI's `stop` does. One rule for the provider (`InferenceEngine`), the verifier
(`checks.RecordChecks`) and the OpenAI wire (`openai_wire`).

    watch = StopStrings(policy.stop, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    for token in tokens: if watch.add(token): break      # provider: stop here
    stop_offset(text, policy.stop)                       # -> index of the first occurrence, or None
    first_stop_step(tokens, policy.stop, decode)         # verifier: the step the rule stops at, or None
"""

from __future__ import annotations

from typing import Callable, Sequence


def stop_offset(text: str, stops: Sequence[str]) -> int | None:
    """The index (in characters) of the earliest occurrence of any stop string in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def answer_text(text: str, offset: int | None) -> str:
    """The answer a client receives: the decoded text cut before the stop string (whole without one)."""
    return text if offset is None else text[:offset]


class StopStrings:
    """The provider's watch over a growing token sequence: `add(token)` is True at the first
    token after which the decoding of all tokens so far contains a stop string."""

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]):
        self.stops, self.decode, self.tokens = tuple(stops), decode, []

    def add(self, token: int) -> bool:
        self.tokens.append(token)
        return bool(self.stops) and stop_offset(self.decode(self.tokens), self.stops) is not None


def first_stop_step(tokens: Sequence[int], stops: Sequence[str], decode: Callable[[list[int]], str]) -> int | None:
    """The first step k at which the decoding of tokens[0..k] contains a stop string, or None."""
    if not stops:
        return None
    for k in range(len(tokens)):
        if stop_offset(decode(list(tokens[:k + 1])), stops) is not None:
            return k
    return None
