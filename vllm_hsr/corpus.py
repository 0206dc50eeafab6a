"""Real text shipped with the project, and needle-in-a-haystack prompts made from it.

The text is prose of the Python Language Reference (PSF License 2.0; `vllm_hsr/data/README.md`).
A needle is a sentence "The secret number of the NAME door is NUMBER." placed at a paragraph
boundary at a given depth of a haystack of a given token length; the question asks for one
needle in completion form, so the answer is the number the model writes next. Prompts for the
needles of one haystack differ only in their last sentence, so prefix caching prefills the
haystack once.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

TEXT_PATH = Path(__file__).with_name("data") / "python_reference.txt"
NEEDLE = "The secret number of the {name} door is {number}."
QUESTION = "\n\nRemember the secret number above.\nThe secret number of the {name} door is"
NAMES = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple", "silver", "golden")


@functools.cache
def reference_text() -> str:
    return TEXT_PATH.read_text()


def paragraphs() -> list[str]:
    return [p for p in reference_text().split("\n\n") if p.strip()]


@dataclass(frozen=True)
class Needle:
    name: str
    number: int
    depth: float   # where in the haystack, 0 = start, 1 = end

    def sentence(self) -> str:
        return NEEDLE.format(name=self.name, number=self.number)


@dataclass(frozen=True)
class NeedlePrompt:
    haystack: str          # the text with every needle, ending before the question
    needle: Needle         # the one asked for
    context_tokens: int    # tokens of the whole prompt

    @property
    def prompt(self) -> str:
        return self.haystack + QUESTION.format(name=self.needle.name)

    @property
    def answer(self) -> str:
        return str(self.needle.number)

    def is_correct(self, completion: str) -> bool:
        """The completion's first number is the needle's."""
        digits = "".join(c if c.isdigit() else " " for c in completion).split()
        return bool(digits) and digits[0] == self.answer


def needle_prompt(tokenizer, context_tokens: int, needle: Needle, offset: int = 0) -> NeedlePrompt:
    """A haystack of about context_tokens tokens (question included, never more) of paragraphs from
    `offset` on, with the needle at the paragraph boundary nearest its depth."""
    question = QUESTION.format(name=needle.name)
    budget = context_tokens - len(tokenizer(needle.sentence() + question).input_ids) - 2
    pool = paragraphs()
    chosen: list[str] = []
    used = 0
    for i in range(offset, offset + len(pool)):
        cost = len(tokenizer("\n\n" + pool[i % len(pool)], add_special_tokens=False).input_ids)
        if used + cost > budget:
            break
        chosen.append(pool[i % len(pool)])
        used += cost
    if not chosen:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for text")
    position = round(needle.depth * len(chosen))
    while True:   # paragraph costs are counted apart: trim should the joined text run over
        text = "\n\n".join(chosen[:position] + [needle.sentence()] + chosen[position:])
        tokens = len(tokenizer(text + question).input_ids)
        if tokens <= context_tokens or len(chosen) == 1:
            return NeedlePrompt(text, needle, tokens)
        chosen.pop(-1 if position < len(chosen) else 0)
        position = min(position, len(chosen))


def needle_set(tokenizer, contexts: list[int], depths: list[float], seed: int = 0) -> list[NeedlePrompt]:
    """A prompt per (context, depth): each its own door name, five-digit number and place in the text."""
    rng = random.Random(seed)
    prompts = []
    for context in contexts:
        for depth in depths:
            needle = Needle(rng.choice(NAMES), rng.randrange(10000, 100000), depth)
            prompts.append(needle_prompt(tokenizer, context, needle, offset=rng.randrange(len(paragraphs()))))
    return prompts
