"""Chat evals: the ARC, MMLU, GSM8K and HumanEval loaders, the reference's prompt, letter scoring,
GSM8K answers, HumanEval programs in the sandbox, reproducible sampling, ChatCORE."""

import json
import os

import numpy as np
import pytest

from nanochat_jax.evals import chat
from nanochat_jax.tasks import arc, common, gsm8k, humaneval, mmlu, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = None  # the samples shipped in nanochat_jax/tasks/data


@pytest.fixture(scope="module")
def tok():
    from launch.parity import _golden_tokenizer

    with open(os.path.join(ROOT, "tests", "golden", "tokenizer_a.json")) as f:
        return _golden_tokenizer(json.load(f))


def test_render_mc_is_the_references_prompt():
    assert common.render_mc("2+2?", ["A", "B"], ["4", "5"]) == (
        "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer.")


def test_arc_loader_keeps_labels_and_answers():
    easy = arc.load(DATA, "ARC-Easy")
    assert len(easy) == 10
    first = easy[0]
    assert first["messages"][0]["content"].startswith("Multiple Choice question: ")
    assert first["messages"][1]["content"] in first["letters"]
    challenge = arc.load(DATA, "ARC-Challenge")
    letter_sets = {tuple(c["letters"]) for c in challenge}
    assert ("1", "2", "3", "4") in letter_sets and any(len(s) == 5 for s in letter_sets) and any(len(s) == 3 for s in letter_sets)
    # The reference's order: row i of the file lands where the seed-42 permutation puts it.
    rows = sources.read_jsonl(sources.find(DATA, "arc/ARC-Easy/ARC-Easy-Test.jsonl"))
    order = np.random.default_rng(42).permutation(len(rows))  # Hugging Face's Dataset.shuffle(seed=42)
    assert [c["messages"][0]["content"].split("\n")[0] for c in easy] == \
        [f"Multiple Choice question: {rows[i]['question']['stem']}" for i in order]


def test_mmlu_loader_concatenates_subjects_alphabetically_then_shuffles():
    convs = mmlu.load(DATA)
    folder = sources.find(DATA, "mmlu/test")
    subjects = [name.split("_test.csv")[0] for name in sorted(os.listdir(folder))]
    in_file_order = [s for s in subjects for _ in sources.read_csv(os.path.join(folder, f"{s}_test.csv.gz"))]
    assert len(convs) == len(in_file_order) > 100 and subjects == sorted(subjects)
    assert [c["subject"] for c in convs] == [in_file_order[i] for i in np.random.default_rng(42).permutation(len(convs))]
    assert all(c["letters"] == ["A", "B", "C", "D"] and c["messages"][1]["content"] in "ABCD" for c in convs)


def test_missing_task_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        arc.load(str(tmp_path), "ARC-Easy")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        mmlu.load(str(tmp_path))
    for name in chat.GENERATIVE:
        with pytest.raises(FileNotFoundError, match="--data-dir"):
            chat.load_task(name, str(tmp_path))
    with pytest.raises(ValueError, match="the tasks are"):
        chat.load_task("SQuAD", None)


class _FixedLogits:
    """A stand-in scorer: the logit of token id t at the asked position is table[t]."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def candidate_logits(self, rows, positions, candidates, desc=None):
        self.calls.append((rows, positions))
        return [np.array([self.table.get(t, 0.0) for t in c]) for c in candidates]


def test_letter_scoring_takes_the_highest_logit_among_the_questions_letters(tok):
    a, b, c, d = (tok.encode(x)[0] for x in "ABCD")
    convs = [common.mc_conversation("q1", "ABC", ["x", "y", "z"], "B"),
             common.mc_conversation("q2", "AC", ["x", "y"], "A"),  # B and D score higher but are no choice here
             common.mc_conversation("q3", "12", ["x", "y"], "1"),  # a tie (both 0): the first letter wins
             common.mc_conversation("q4", "BD", ["x", "y"], "B")]
    scorer = _FixedLogits({a: 1.0, b: 2.0, c: 0.5, d: 3.0})
    result = chat.evaluate_categorical(scorer, tok, convs)
    assert result["predictions"] == ["B", "A", "1", "D"]
    assert result["passed"] == 3 and result["total"] == 4 and result["accuracy"] == 0.75
    rows, positions = scorer.calls[0]
    assert rows[0] == tok.render_for_completion(convs[0]) and positions[0] == len(rows[0]) - 1
    assert rows[0][-1] == tok.encode_special("<|assistant_start|>")


def test_categorical_eval_on_the_golden_model_is_reproducible(tok):
    """Real batched scoring (8 devices, buckets) of ARC and MMLU samples: the same numbers twice, and
    each letter logit equals a single unpadded forward's."""
    import jax
    import jax.numpy as jnp

    from nanochat_jax import convert, model, sharding
    from nanochat_jax.evals.scoring import Scorer

    with np.load(os.path.join(ROOT, "tests", "golden", "core_a_model.npz")) as f:
        config = convert.config_from_json(str(f["config"]))
        params = convert.from_reference({k[6:]: f[k] for k in f.files if k.startswith("param/")}, config)
    scorer = Scorer(params, config, sharding.make_mesh(), pad_id=tok.bos_token_id, batch_tokens=1024,
                    dtype="float32", progress=False)
    short = [c for c in chat.load_task("MMLU", DATA) if len(tok.render_for_completion(c)) <= 256]  # cheap buckets
    convs = short[:6] + chat.load_task("ARC-Challenge", DATA)
    first = chat.evaluate_categorical(scorer, tok, convs)
    assert first == chat.evaluate_categorical(scorer, tok, convs)
    prompt = tok.render_for_completion(convs[0])
    logits = jax.jit(model.forward, static_argnums=2, static_argnames="dtype")(params, jnp.array([prompt]), config, dtype="float32")
    ids = chat.letter_token_ids(tok, convs[0]["letters"])
    got = scorer.candidate_logits([prompt], [len(prompt) - 1], [ids])[0]
    np.testing.assert_allclose(got, np.asarray(logits[0, -1, ids]), atol=1e-5)
    assert first["predictions"][0] == convs[0]["letters"][int(np.argmax(got))]


def test_chatcore_full_and_partial():
    full = chat.chatcore({"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.4375, "GSM8K": 0.1, "HumanEval": 0.0})
    assert full["chatcore"] == pytest.approx((0.5 + 0.0 + 0.25 + 0.1 + 0.0) / 5) and full["missing"] == []
    part = chat.chatcore({"ARC-Easy": 0.625, "MMLU": 0.4375})
    assert part["chatcore"] is None and part["chatcore_partial"] == pytest.approx(0.375)
    assert part["missing"] == ["ARC-Challenge", "GSM8K", "HumanEval"]


@pytest.mark.parametrize("text, answer", [
    ("so she earns 12 * 5 = 60.\n#### 60", "60"),
    ("#### 1,234,567", "1234567"),
    ("It drops by 7.\n#### -7", "-7"),
    ("#### 0.25 dollars", "0.25"),
    ("#### 3.\n", "3."),  # compared as text, like GSM8K's grader: "3." is not "3"
    ("first #### 5 then #### 6", "5"),  # the first marker counts
    ("The answer is 60.", None),
    ("####60", None),  # the grader's pattern wants the space
    ("#### sixty", None),
])
def test_gsm8k_answer_extraction(text, answer):
    assert gsm8k.extract_answer(text) == answer


def test_gsm8k_scoring_of_fixed_completions():
    conv = gsm8k.load("test")[0]
    answer = gsm8k.extract_answer(conv["messages"][-1]["content"][-1]["text"])
    assert answer is not None and len(gsm8k.load("test")) == 100
    big = gsm8k.conversation({"question": "q", "answer": "a <<1000*1234=1234000>>1234000\n#### 1234000"})
    assert gsm8k.evaluate(big, "... = 1,234,000\n#### 1,234,000")
    assert gsm8k.evaluate(conv, f"Some reasoning.\n#### {answer}") and not gsm8k.evaluate(conv, f"#### {answer}1")
    assert not gsm8k.evaluate(conv, f"The answer is {answer}.")  # no "####": no answer
    result = chat.evaluate_generative(_Canned([f"#### {answer}", "#### 0"]), _Tok(), [conv, conv], gsm8k.evaluate)
    assert (result["passed"], result["total"], result["accuracy"]) == (1, 2, 0.5)


class _Tok:
    """Text is its own tokens: prompts are rendered to a stand-in, completions decoded as given."""

    def render_for_completion(self, conv):
        return [1]

    def decode(self, tokens):
        return tokens[0]


class _Canned:
    """An engine whose i-th prompt's samples are the given texts (one list per prompt)."""

    def __init__(self, texts):
        self.texts = texts

    def generate_batch(self, prompts, **kwargs):
        from nanochat_jax.engine import Sample

        per_prompt = [t if isinstance(t, list) else [t] for t in self.texts]
        return [[Sample([text], [1]) for text in texts] for texts in per_prompt]


def test_humaneval_programs_run_in_the_sandbox():
    problems = humaneval.load(None)
    assert sorted(c["task_id"] for c in problems) == [f"HumanEval/{i}" for i in range(5)]
    conv = next(c for c in problems if c["entry_point"] == "has_close_elements")
    # Rewritten without its `from typing import List` (the prompt's imports are added back), in a
    # fenced block with chatter around it.
    right = ("Here you go:\n```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             "    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n```\nDone.")
    wrong = right.replace("b - a < threshold", "b - a > threshold")
    assert humaneval.evaluate(conv, right) and not humaneval.evaluate(conv, wrong)
    assert not humaneval.evaluate(conv, "def has_close_elements(numbers, threshold):\n    while True: pass", timeout=1)
    assert humaneval.evaluate(conv, conv["messages"][1]["content"])  # the canonical solution, unfenced
    result = chat.evaluate_generative(_Canned([[wrong, right], [wrong]]), _Tok(), [conv, conv], humaneval.evaluate)
    assert (result["passed"], result["total"]) == (1, 2)  # any sample passing is enough


def test_generative_eval_of_a_tiny_model_is_reproducible(tiny_tokenizer, live_params):
    from nanochat_jax.config import GPTConfig
    from nanochat_jax.engine import Engine

    config = GPTConfig(sequence_len=512, vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    engine = Engine(live_params(config), config, tiny_tokenizer, dtype="float32", chunk=8)
    convs = gsm8k.load("test")[:2]
    runs = [chat.evaluate_generative(engine, tiny_tokenizer, convs, gsm8k.evaluate, max_tokens=12, num_samples=2,
                                     temperature=1.0, seed=7) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]["total"] == 2
    assert all(len(texts) == 2 and all(texts) for texts in runs[0]["completions"])
