"""Categorical chat evals: the ARC and MMLU loaders, the reference's prompt, letter scoring, ChatCORE."""

import json
import os

import numpy as np
import pytest

from nanochat_jax.evals import chat
from nanochat_jax.tasks import arc, common, mmlu, sources

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
    with pytest.raises(ValueError, match="need sampling"):
        chat.load_task("GSM8K", str(tmp_path))


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
