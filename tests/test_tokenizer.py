import base64
import json
import os

import pytest

from launch.parity import parity_tokenizer
from nanochat_jax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN_TOK = os.path.join(GOLDEN, "tokenizer_a.json")
GOLDEN_CORPUS = os.path.join(GOLDEN, "AA_wiki_00.jsonl.gz")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN_TOK) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(golden):
    ranks = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
    return Tokenizer.from_ranks(ranks, golden["pattern"], golden["special_tokens"])


@pytest.mark.parametrize("retrain", [False, True])
def test_parity_with_reference(golden, tmp_path, retrain):
    out = tmp_path / "out.json"
    parity_tokenizer(GOLDEN_TOK, str(out), GOLDEN_CORPUS if retrain else None)
    mine = json.loads(out.read_text())
    assert golden["pattern"] == SPLIT_PATTERN and golden["special_tokens"] == SPECIAL_TOKENS
    for key in ["vocab_size", "special_ids", "mergeable_ranks_b64", "encodings", "encodings_with_bos",
                "conversations"]:
        assert mine[key] == golden[key], key
    if retrain:
        assert mine["corpus_sha256"] == golden["corpus_sha256"]


def test_stream_decode_emits_only_whole_characters(tok):
    text = "naïve café: 東京タワー 🌍🚀 done — ok"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # the 4-byte emoji and 3-byte CJK characters are split over several byte tokens in this
    # 1024-token vocabulary, so some pushes must have held their bytes back
    assert any(p == "" for p in pieces)
    assert sum(len(tok.enc.decode_single_token_bytes(i)) for i in ids) == len(text.encode())


def test_stream_decode_flushes_a_dangling_partial_character(tok):
    dec = tok.stream_decoder()
    first_byte_of_emoji = tok.encode("🌍")[0]
    assert dec.push(first_byte_of_emoji) == ""
    assert dec.flush() == "\ufffd"


def test_token_bytes_are_the_raw_bytes(tok):
    tb = tok.token_bytes()
    specials = set(tok.special_ids().values())
    assert tb.shape == (tok.vocab_size,) and tb.dtype.name == "int32"
    for i in range(tok.vocab_size):
        expected = 0 if i in specials else len(tok.enc.decode_single_token_bytes(i))
        assert tb[i] == expected, i
    # the str round trip would have counted the lone high bytes as 3-byte U+FFFD
    assert tb[0x80] == 1


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path / "t"))
    assert sorted(os.listdir(tmp_path / "t")) == ["token_bytes.npy", "tokenizer.json"]
    back = Tokenizer.from_directory(str(tmp_path / "t"))
    assert back.mergeable_ranks() == tok.mergeable_ranks() and back.special_ids() == tok.special_ids()
    assert back.encode("Hello <|bos|> world") == tok.encode("Hello <|bos|> world")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_directory(str(tmp_path / "missing"))


def test_encode_batch_matches_single_and_special_text_stays_text(tok):
    texts = ["a b c", "", "<|user_start|>x", "12345"]
    assert tok.encode(texts, prepend="<|bos|>", num_threads=2) == [tok.encode(t, prepend=tok.bos_token_id) for t in texts]
    assert tok.encode_special("<|user_start|>") not in tok.encode("<|user_start|>x")
    with pytest.raises(TypeError):
        tok.encode(42)


def test_train_small_vocab(golden):
    texts = ["the cat sat on the mat " * 20, "hello world 123 " * 20]
    t = Tokenizer.train(texts, 256 + len(SPECIAL_TOKENS) + 10)
    assert t.vocab_size == 256 + 9 + 10
    assert t.special_ids()["<|bos|>"] == 266 and t.decode(t.encode("the cat 12")) == "the cat 12"


@pytest.mark.parametrize("vocab, texts, match", [
    (264, ["abc"], "too small"),
    (300, [], "empty corpus"),
    (300, ["", ""], "empty corpus"),
    (5000, ["tiny text"], "corpus too small"),
])
def test_train_rejects_bad_input(vocab, texts, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.train(texts, vocab)


def test_render_truncates_and_masks(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ids, mask = tok.render_conversation(conv)
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=5)
    assert short_ids == ids[:5] and short_mask == mask[:5]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.encode_special("<|assistant_end|>")
    assert sum(mask) == len(tok.encode("hello there")) + 1


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "does not alternate"),
    ([{"role": "assistant", "content": "a"}], "does not alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only come first"),
    ([{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}],
     "unknown assistant part"),
    ([{"role": "user", "content": ["a"]}], "user content"),
])
def test_render_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_a_final_assistant_turn(tok):
    with pytest.raises(ValueError, match="ending in an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "a"}]})


def test_published_encodings_never_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    with pytest.raises(OSError, match="not in the local cache"):
        Tokenizer.from_tiktoken("gpt2")
