"""Needle-in-a-haystack prompts: a key sentence hidden at a chosen depth in filler text, with a
question about it at the end. For measuring prompt compression (PFlash): does the key survive?

The filler is varied prose made from a seeded grammar (not one sentence repeated, which any
scorer would find trivially), the needle a sentence with a key of digits that cannot be guessed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS = ("The old miller", "A quiet student", "The harbour master", "Our neighbour", "The baker's daughter",
            "A travelling merchant", "The village council", "An elderly gardener", "The night watchman",
            "A young carpenter", "The river pilot", "Her cousin", "The school teacher", "A street musician")
VERBS = ("repaired", "painted", "counted", "carried", "described", "sold", "measured", "forgot", "collected",
         "polished", "borrowed", "cleaned", "planted", "visited")
OBJECTS = ("the wooden bridge", "a basket of apples", "the blue fishing boats", "the library shelves",
           "an iron lantern", "the stone wall", "a pair of boots", "the narrow staircase", "the market stalls",
           "a box of letters", "the church bells", "the copper kettle", "a field of barley", "the garden gate")
WHEN = ("before dawn", "after the storm", "on Tuesday", "during the festival", "late in the evening",
        "in early spring", "while it rained", "at noon", "last winter", "once the tide turned")
ASIDES = ("Nobody thought much of it.", "It took longer than expected.", "The weather stayed mild.",
          "Everyone agreed it was ordinary work.", "A dog watched from the doorway.", "The road was dusty.",
          "Later they talked about other things.", "The smell of bread drifted over the square.")

QUESTION = "What is the secret key mentioned in the text above? Answer with the key only."


@dataclass(frozen=True)
class Haystack:
    """One prompt: `text` holds `needle` (which holds `key`) at character `needle_at`."""

    text: str
    key: str
    needle: str
    needle_at: int
    depth: float


def filler_sentences(rng: random.Random):
    while True:
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)}."
        if rng.random() < 0.3:
            sentence += " " + rng.choice(ASIDES)
        yield sentence


def haystack(tokenizer, tokens: int, depth: float, seed: int = 0) -> Haystack:
    """A prompt of about `tokens` tokens (in `tokenizer`'s count) with the needle at `depth` (0:
    the start of the filler, 1: its end), then the question on a line of its own."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: {depth!r} is not in [0, 1]")
    rng = random.Random(f"{seed}-{tokens}-{depth}")
    key = f"{rng.randrange(10**6, 10**7)}"
    needle = f"The secret key is {key}. Remember the secret key {key}."
    fixed = len(tokenizer.encode(needle + "\n\n" + QUESTION)) + 8
    sentences, used = [], 0
    source = filler_sentences(rng)
    while used < tokens - fixed:
        sentence = next(source)
        sentences.append(sentence)
        used += len(tokenizer.encode(" " + sentence))
    at = round(depth * len(sentences))
    before, after = " ".join(sentences[:at]), " ".join(sentences[at:])
    head = (before + " ") if before else ""
    text = head + needle + ((" " + after) if after else "") + "\n\n" + QUESTION
    return Haystack(text, key, needle, len(head), depth)
