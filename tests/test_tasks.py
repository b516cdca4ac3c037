"""Post-training data: the task loaders, the mid/SFT mixtures (sizes, order) and what the loss
sees (SFT: assistant tokens only, never tool outputs or padding; mid: every token but padding)."""

import json

import numpy as np
import pytest

from nanochat_jax import data
from nanochat_jax.tasks import chat, gsm8k, mixtures, spelling


@pytest.fixture(scope="module")
def mid_mix():
    return mixtures.train_mixture(mixtures.Recipe(**mixtures.MID))


def test_gsm8k_calculator_annotations_become_tool_calls():
    row = {"question": "2 apples and 3 more?", "answer": "She has 2+3=<<2+3=5>>5 apples.\n#### 5"}
    parts = gsm8k.conversation(row)["messages"][1]["content"]
    assert parts == [{"type": "text", "text": "She has 2+3="}, {"type": "python", "text": "2+3"},
                     {"type": "python_output", "text": "5"}, {"type": "text", "text": "5 apples.\n#### 5"}]
    assert len(gsm8k.load("train")) == 300 and len(gsm8k.load("test")) == 100  # the shipped samples


def test_mixture_sizes_follow_the_recipes(mid_mix):
    sizes = mid_mix.sizes
    assert sizes["identity_0"] == sizes["identity_1"] == 200  # identity twice
    others = sum(v for k, v in sizes.items() if "spelling" not in k)
    assert sizes["simple_spelling"] == round(others * 200_000 / mixtures.REFERENCE_MID_OTHER_ROWS)
    assert sizes["spelling_bee"] == round(others * 80_000 / mixtures.REFERENCE_MID_OTHER_ROWS)
    assert len(mid_mix) == sum(sizes.values())
    sft = mixtures.train_mixture(mixtures.Recipe(**mixtures.SFT))
    assert [k for k in sft.sizes] == ["smoltalk", "mmlu_aux_0", "mmlu_aux_1", "mmlu_aux_2",
                                      "gsm8k_0", "gsm8k_1", "gsm8k_2", "gsm8k_3"]
    assert sft.sizes["smoltalk"] == 450 and sft.sizes["mmlu_aux_0"] == 450 and sft.sizes["gsm8k_0"] == 300
    val = mixtures.val_mixture(mixtures.Recipe())
    assert val.sizes == {"smoltalk": 50, "mmlu": 200, "gsm8k": 100}


def test_mixture_order_is_fixed_and_covers_every_row():
    parts = {"a": [{"i": i} for i in range(5)], "b": [{"i": 10 + i} for i in range(3)]}
    one, two = mixtures.Mixture(parts), mixtures.Mixture(parts)
    seen = [one[i]["i"] for i in range(len(one))]
    assert seen == [two[i]["i"] for i in range(len(two))]
    assert sorted(seen) == [0, 1, 2, 3, 4, 10, 11, 12] and seen != sorted(seen)
    with pytest.raises(ValueError, match="empty"):
        mixtures.Mixture({"a": []})


def test_multiple_choice_format_puts_the_letter_after_the_choice():
    conv = mixtures.mmlu_auxiliary_train()[0]
    user, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
    assert user.startswith("Multiple Choice question: ") and user.endswith("Respond only with the letter of the correct answer.")
    assert f"={answer}\n" in user


def test_spelling_examples_are_deterministic_and_correct():
    bee = spelling.SpellingBee(50, "train")
    assert bee[7] == spelling.SpellingBee(50, "train")[7] != spelling.SpellingBee(50, "test")[7]
    for i in range(20):
        user, assistant = bee[i]["messages"]
        word = assistant["content"][2]["text"].split("'")[1]
        letter = assistant["content"][2]["text"].split("'")[3]
        assert assistant["content"][3] == {"type": "python_output", "text": str(word.count(letter))}
        assert assistant["content"][-1]["text"].endswith(f"#### {word.count(letter)}")
    simple = spelling.SimpleSpelling(5)[0]["messages"]
    word = simple[0]["content"].removeprefix("Spell the word: ")
    assert simple[1]["content"] == f"{word}:{','.join(word)}"


def test_your_conversations_load_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a"},
                                               {"role": "assistant", "content": "b"}]}) + "\n")
    assert len(chat.load_jsonl(str(good))) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*alternate"):
        chat.load_jsonl(str(bad))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        chat.load_jsonl(str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError):
        chat.load_jsonl(str(tmp_path / "none.jsonl"))
    recipe = mixtures.Recipe(conversations=str(good))
    assert mixtures.train_mixture(recipe).sizes["yours"] == 2


def _supervised_targets(tokenizer, conversations, supervise, rows=4, seq_len=96):
    batches = data.conversation_batches(conversations, tokenizer, rows, seq_len, supervise=supervise)
    inputs, targets = next(batches)
    return inputs, targets


def test_sft_supervises_only_assistant_tokens_never_tool_outputs(tiny_tokenizer):
    convs = gsm8k.load("train")[:6] + [spelling.SpellingBee(4)[i] for i in range(4)]
    s = tiny_tokenizer.encode_special
    user_ids = {s("<|user_start|>"), s("<|user_end|>")}
    output_start, output_end = s("<|output_start|>"), s("<|output_end|>")
    inputs, targets = _supervised_targets(tiny_tokenizer, convs, "assistant", seq_len=512)
    assert (targets >= 0).any() and (targets < 0).any()
    for row_in, row_t in zip(inputs, targets):
        inside_user = inside_output = False
        for x, t in zip(row_in, row_t):  # t is the token after x
            inside_user = (x == s("<|user_start|>")) or (inside_user and x != s("<|user_end|>"))
            inside_output = (x == output_start) or (inside_output and x != output_end)
            if t >= 0:
                assert t not in user_ids and t != tiny_tokenizer.bos_token_id
                assert not inside_user, "a user token is supervised"
                assert not inside_output, "a tool output token is supervised"
    # Each supervised target is exactly a token the assistant writes: compare with render_conversation.
    ids, mask = tiny_tokenizer.render_conversation(convs[0])
    assert sum(mask) > 0 and all(m == 0 for i, m in zip(ids, mask) if i in (output_start, output_end))


def test_mid_supervises_every_token_but_padding(tiny_tokenizer):
    convs = [chat.identity()[i] for i in range(20)]
    inputs, targets = _supervised_targets(tiny_tokenizer, convs, "all", seq_len=128)
    bos = tiny_tokenizer.bos_token_id
    for row_in, row_t in zip(inputs, targets):
        ignored = np.flatnonzero(row_t < 0)
        if ignored.size:  # padding: one run at the end of the row, made of BOS
            assert (ignored == np.arange(ignored[0], len(row_t))).all()
            assert (row_in[ignored[0] + 1:] == bos).all()
    assert (targets >= 0).mean() > 0.5
    with pytest.raises(ValueError, match="supervise"):
        data.conversation_batches(convs, tiny_tokenizer, 2, 64, supervise="users")


def test_no_conversation_token_is_dropped(tiny_tokenizer):
    convs = [chat.identity()[i] for i in range(12)]
    lengths = {len(tiny_tokenizer.render_conversation(c, max_tokens=10**6)[0]) for c in convs}
    batches = data.conversation_batches(convs, tiny_tokenizer, 6, max(lengths) + 8, supervise="all")
    inputs, targets = next(batches)
    bos = tiny_tokenizer.bos_token_id
    for row_in, row_t in zip(inputs, targets):
        full = np.append(row_in, row_t[-1])
        padded = np.flatnonzero(row_t < 0)
        content = full[: padded[0] + 1] if padded.size else full
        starts = np.flatnonzero(content == bos).tolist() + [len(content)]
        assert starts[0] == 0  # every row starts a conversation
        assert {b - a for a, b in zip(starts, starts[1:])} <= lengths  # whole conversations only
