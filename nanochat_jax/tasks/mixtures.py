"""The mid-training and SFT data mixtures (the reference's recipes) and the `Mixture` sequence.

mid (the reference's last mid-training recipe, before it folded mid-training into SFT):
    SmolTalk train, MMLU auxiliary_train, GSM8K train, identity conversations x2,
    SimpleSpelling (200K), SpellingBee (80K); the loss is on every token.
sft (the reference's newest recipe): SmolTalk train, MMLU auxiliary_train x3, GSM8K train x4;
    the loss is on the assistant's tokens only (never prompts, tool outputs or padding).
validation (both): SmolTalk test, MMLU test[:5200], GSM8K test[:420].

Offline (without `--hf`) SmolTalk is replaced by FastChat's dummy conversations and MMLU
auxiliary_train by ARC-Easy + ARC-Challenge train (its authors drew it from ARC and similar sets);
see `tasks/data/PROVENANCE.md`. `--conversations FILE` adds your own jsonl to either mixture.
"""

import dataclasses

import numpy as np

from nanochat_jax.tasks import chat, gsm8k, mmlu, sources, spelling
from nanochat_jax.tasks.common import mc_conversation

MIXTURE_SEED = 42
MC_LETTERS = "ABCD"


class Mixture:
    """The concatenation of several sequences of conversations in one fixed shuffled order, so
    every part is spread over the whole run (list a part twice to train on it twice)."""

    def __init__(self, parts: dict[str, object], seed: int = MIXTURE_SEED):
        self.parts = {name: part for name, part in parts.items() if len(part)}
        lengths = np.array([len(p) for p in self.parts.values()], np.int64)
        if not lengths.sum():
            raise ValueError("the data mixture is empty")
        self.sizes = dict(zip(self.parts, lengths.tolist()))
        which = np.repeat(np.arange(len(lengths)), lengths)
        local = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        order = np.random.default_rng(seed).permutation(lengths.sum())
        self._which, self._local = which[order], local[order]
        self._parts = list(self.parts.values())

    def __len__(self):
        return len(self._which)

    def __getitem__(self, index: int) -> dict:
        return self._parts[self._which[index]][int(self._local[index])]


# ---- multiple choice (the prompt format lives in tasks/common.py, shared with the chat evals) ----

def mmlu_test(data_dir: str | None = None, hf: bool = False) -> list[dict]:
    """MMLU test (all subjects) as conversations, shuffled."""
    if not hf:
        return mmlu.load(data_dir, "test")
    rows = [(r["question"], r["choices"], r["answer"]) for r in sources.hub_rows("cais/mmlu", "all", "test")]
    return [mc_conversation(q, MC_LETTERS, c, MC_LETTERS[a]) for q, c, a in sources.shuffled(rows)]


def mmlu_auxiliary_train(data_dir: str | None = None, hf: bool = False) -> list[dict]:
    """MMLU auxiliary_train (~100K questions) with `hf`; offline, ARC-Easy + ARC-Challenge train."""
    if hf:
        rows = [(r["question"], MC_LETTERS, r["choices"], MC_LETTERS[r["answer"]])
                for r in sources.hub_rows("cais/mmlu", "all", "auxiliary_train")]
    else:
        rows = []
        for subset in ("ARC-Easy", "ARC-Challenge"):
            for r in sources.read_jsonl(sources.find(data_dir, f"arc/{subset}/{subset}-Train.jsonl")):
                choices = r["question"]["choices"]
                rows.append((r["question"]["stem"], [c["label"] for c in choices], [c["text"] for c in choices],
                             r["answerKey"]))
    return [mc_conversation(*row) for row in sources.shuffled(rows)]


# ---- the recipes ---------------------------------------------------------------------------

@dataclasses.dataclass
class Recipe:
    """Where the data comes from and how much of each part."""

    data_dir: str | None = None  # a folder laid out like tasks/data (default: the shipped samples)
    hf: bool = False  # read SmolTalk, MMLU and GSM8K from the Hugging Face hub
    conversations: str | None = None  # your own jsonl, added once
    words: str | None = None  # word list for the spelling tasks (default: the built-in corpus)
    mmlu_epochs: int = 1
    gsm8k_epochs: int = 1
    identity_epochs: int = 0
    simple_spelling: float = 0.0  # rows per row of the other parts (see MID)
    spelling_bee: float = 0.0


# The reference's 200K SimpleSpelling and 80K SpellingBee rows sat next to ~570K other rows; as
# ratios they keep the same share when the other parts are the small offline substitutes.
REFERENCE_MID_OTHER_ROWS = 460_000 + 100_000 + 8_000 + 2_000
MID = dict(mmlu_epochs=1, gsm8k_epochs=1, identity_epochs=2, simple_spelling=200_000 / REFERENCE_MID_OTHER_ROWS,
           spelling_bee=80_000 / REFERENCE_MID_OTHER_ROWS)
SFT = dict(mmlu_epochs=3, gsm8k_epochs=4)
VAL_MMLU, VAL_GSM8K = 5200, 420  # test rows in validation, in proportion to the training mix


def train_mixture(recipe: Recipe) -> Mixture:
    smoltalk = chat.smoltalk("train", recipe.data_dir, recipe.hf)
    mmlu = mmlu_auxiliary_train(recipe.data_dir, recipe.hf)
    math = gsm8k.load("train", recipe.data_dir, recipe.hf)
    parts = {"smoltalk": smoltalk}
    parts |= {f"mmlu_aux_{k}": mmlu for k in range(recipe.mmlu_epochs)}
    parts |= {f"gsm8k_{k}": math for k in range(recipe.gsm8k_epochs)}
    if recipe.identity_epochs:
        identity = chat.identity(recipe.data_dir)
        parts |= {f"identity_{k}": identity for k in range(recipe.identity_epochs)}
    if recipe.conversations:
        parts["yours"] = chat.load_jsonl(recipe.conversations)
    others = sum(map(len, parts.values()))
    if recipe.simple_spelling:
        parts["simple_spelling"] = spelling.SimpleSpelling(round(recipe.simple_spelling * others), "train", recipe.words)
    if recipe.spelling_bee:
        parts["spelling_bee"] = spelling.SpellingBee(round(recipe.spelling_bee * others), "train", recipe.words)
    return Mixture(parts)


def val_mixture(recipe: Recipe) -> Mixture:
    return Mixture({
        "smoltalk": chat.smoltalk("test", recipe.data_dir, recipe.hf),
        "mmlu": mmlu_test(recipe.data_dir, recipe.hf)[:VAL_MMLU],
        "gsm8k": gsm8k.load("test", recipe.data_dir, recipe.hf)[:VAL_GSM8K],
    })
