"""Spelling tasks: small models cannot see the letters inside their tokens, so mid-training shows
them explicitly.

- `SimpleSpelling`: "Spell the word: apple" -> "apple:a,p,p,l,e".
- `SpellingBee`: "How many r are in strawberry?" -> spell the word out, count the letter step by
  step, check the count with a Python call, and end with "#### <count>" (GSM8K's answer format).

Example i of a split is a pure function of (split, i): any size, no storage, the same conversation
after a resume. The reference draws words from a 370K-word English list; offline we use the
distinct lowercase words of the built-in corpus, or a word file of yours (one word per line).
"""

import functools
import random
import re

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_SEED_OFFSET = 10_000_000  # larger than any train size: test examples never repeat train ones
CORPUS_CHARS = 3_000_000  # enough of the built-in corpus for ~30K distinct words

# Phrasings of the counting question (English and a few other languages): data augmentation.
QUESTIONS = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}", "How many times is {letter} in {word}",
    "Number of {letter} in {word}", "How many {letter} does {word} contain",
    "{word} has how many {letter}", "In {word}, count the {letter}",
    "¿Cuántas {letter} hay en {word}?", "Combien de {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "{word}中有多少个{letter}", "{word}에 {letter}가 몇 개 있나요",
    "{word}に{letter}は何個ありますか",
]


@functools.lru_cache(maxsize=4)
def load_words(path: str | None = None) -> tuple[str, ...]:
    """Sorted distinct words: from `path` (one per line) or from the built-in corpus."""
    if path:
        with open(path, encoding="utf-8") as f:
            words = {line.strip().lower() for line in f}
    else:
        from nanochat_jax import data

        words = set()
        for text in data.iter_texts(max_chars=CORPUS_CHARS):
            words.update(re.findall(r"\b[a-z]{3,14}\b", text))
    words = sorted(w for w in words if w.isalpha())
    if not words:
        raise ValueError(f"no words in {path or 'the built-in corpus'}")
    return tuple(words)


class _Generated:
    """A sequence of `size` conversations generated on demand."""

    def __init__(self, size: int, split: str = "train", words: str | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"spelling tasks have splits train and test, not {split!r}")
        self.size, self.split, self.words = size, split, load_words(words)

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = random.Random(index + (TEST_SEED_OFFSET if self.split == "test" else 0))
        user, assistant = self.make(rng)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


class SimpleSpelling(_Generated):
    def make(self, rng):
        # Another word order than SpellingBee's, so the two tasks do not pair up word for word.
        word = self.words[(rng.randrange(len(self.words)) * 7919) % len(self.words)]
        return f"Spell the word: {word}", f"{word}:{','.join(word)}"


class SpellingBee(_Generated):
    def make(self, rng):
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(QUESTIONS)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            question += "?"
        # "3:r" with no space: " r" and "r" are different tokens, and the answer must use the
        # same letter tokens as the spelled-out word.
        steps, running = [], 0
        for i, char in enumerate(word, 1):
            running += char == letter
            steps.append(f"{i}:{char} hit! count={running}" if char == letter else f"{i}:{char}")
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
                  f"First spell the word out:\n{word}:{','.join(word)}\n\n"
                  f"Then count the occurrences of '{letter}':\n" + "\n".join(steps) + f"\n\nThis gives us {running}.")
        return question, [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
