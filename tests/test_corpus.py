"""Needle prompts from the shipped text: lengths as asked, the needle where asked, answers read right."""

import pytest

from vllm_hsr.corpus import QUESTION, Needle, NeedlePrompt, needle_prompt, needle_set, paragraphs, reference_text


@pytest.fixture(scope="module")
def tokenizer(real_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_model)


def test_the_text_is_prose_of_some_length():
    text = reference_text()
    assert 100_000 < len(text.encode()) < 400_000 and len(paragraphs()) > 1000
    assert "::=" not in text and ">>>" not in text


@pytest.mark.parametrize("context", [300, 2048, 7600])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_and_needle_place(tokenizer, context, depth):
    needle = Needle("blue", 48213, depth)
    prompt = needle_prompt(tokenizer, context, needle, offset=11)
    ids = tokenizer(prompt.prompt).input_ids
    assert prompt.context_tokens == len(ids) and 0.9 * context <= len(ids) <= context
    assert prompt.prompt.endswith(QUESTION.format(name="blue")) and prompt.prompt.count(needle.sentence()) == 1
    place = prompt.haystack.index(needle.sentence()) / len(prompt.haystack)
    assert abs(place - depth) < (0.1 if context >= 2048 else 0.3)   # at a paragraph boundary: coarse when short


def test_set_is_deterministic_and_varied(tokenizer):
    first = needle_set(tokenizer, [512, 1024], [0.2, 0.8], seed=3)
    again = needle_set(tokenizer, [512, 1024], [0.2, 0.8], seed=3)
    assert first == again and len(first) == 4
    assert len({p.answer for p in first}) == 4 and len({p.haystack[:200] for p in first}) > 1


def test_answers_are_read_from_the_first_number():
    prompt = NeedlePrompt("text", Needle("red", 12345, 0.5), 10)
    assert prompt.is_correct(" 12345.\n") and prompt.is_correct("12345 and 99999")
    assert not prompt.is_correct(" 1234") and not prompt.is_correct(" 99999, not 12345")
    assert not prompt.is_correct(" no number")


def test_too_short_a_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="context_tokens=20"):
        needle_prompt(tokenizer, 20, Needle("red", 12345, 0.5))
