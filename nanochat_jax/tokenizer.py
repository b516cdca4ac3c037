"""GPT-4-style BPE: trained with rustbpe, encoded with tiktoken, plus chat rendering and loss masks.

The vocabulary is laid out like the reference's: ids [0, n) are the merged byte sequences in rank
order (the 256 single bytes first), and the 9 special tokens follow at n, n+1, ... in SPECIAL_TOKENS
order. A saved tokenizer is a directory with `tokenizer.json` (split pattern, special tokens and the
ranks as base64 bytes, the same schema as the golden files) and `token_bytes.npy` (bytes per id, for
bits-per-byte). JSON instead of the reference's pickle: readable, diffable, and safe to load.
"""

import base64
import codecs
import contextlib
import json
import os

import numpy as np
import tiktoken

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the packer aligns every row on it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's answer comes back (never supervised: Python wrote it)
    "<|output_end|>",
]

# GPT-4's pattern except \p{N}{1,2} instead of {1,3}: at a 32k vocab, fewer number tokens pay off.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


class Tokenizer:
    """A tiktoken `Encoding` plus the special-token conventions of nanochat."""

    def __init__(self, enc: tiktoken.Encoding, bos: str = "<|bos|>"):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(bos)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                   special_tokens=SPECIAL_TOKENS) -> "Tokenizer":
        offset = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(offset)):
            raise ValueError("mergeable ranks must be exactly 0..n-1")
        enc = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens={name: offset + i for i, name in enumerate(special_tokens)},
        )
        return cls(enc)

    @classmethod
    def train(cls, texts, vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Train on an iterable of strings. `vocab_size` counts the special tokens."""
        import rustbpe

        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens plus "
                             f"{len(SPECIAL_TOKENS)} special tokens, so at least {256 + len(SPECIAL_TOKENS)}")
        seen = {"docs": 0, "chars": 0}

        def counted():
            for text in texts:
                seen["docs"] += 1
                seen["chars"] += len(text)
                yield text

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(counted(), n_merged, pattern=pattern)
        if seen["chars"] == 0:
            raise ValueError(f"empty corpus: {seen['docs']} documents, no text to train on")
        ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
        if len(ranks) != n_merged:
            # Too little text to find that many distinct merges; a smaller vocab than asked for would
            # silently change every downstream shape, so say so instead.
            raise ValueError(f"corpus too small for vocab_size={vocab_size}: only {len(ranks) - 256} "
                             f"merges found ({seen['chars']:,} chars); use more text or a smaller vocab")
        return cls.from_ranks(ranks, trainer.get_pattern())

    @classmethod
    def from_directory(cls, path: str) -> "Tokenizer":
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer at {path} (missing {TOKENIZER_FILE}); train one "
                                    f"with `python -m launch.stage tok`")
        with open(file) as f:
            d = json.load(f)
        ranks = {base64.b64decode(k): v for k, v in d["mergeable_ranks_b64"].items()}
        return cls.from_ranks(ranks, d["pattern"], d["special_tokens"])

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """A published tiktoken encoding (e.g. "gpt2", "cl100k_base"), only from the local cache.

        tiktoken downloads missing encodings on first use; we never touch the network outside the
        explicit download commands, so a cache miss raises instead of fetching.
        """
        import tiktoken.load

        def refuse(blobpath):
            raise OSError(f"tiktoken encoding {name!r} is not in the local cache (would fetch {blobpath})")

        with _patched(tiktoken.load, "read_file", refuse):
            enc = tiktoken.get_encoding(name)
        return cls(enc, "<|endoftext|>")

    def save(self, path: str) -> None:
        """Write the directory atomically per file: a crash leaves the old files or the new ones."""
        os.makedirs(path, exist_ok=True)
        d = {
            "vocab_size": self.vocab_size,
            "pattern": self.enc._pat_str,
            "special_tokens": sorted(self.enc._special_tokens, key=self.enc._special_tokens.get),
            "mergeable_ranks_b64": {base64.b64encode(k).decode("ascii"): v
                                    for k, v in self.mergeable_ranks().items()},
        }
        _atomic_write(os.path.join(path, TOKENIZER_FILE), json.dumps(d).encode())
        tmp = os.path.join(path, TOKEN_BYTES_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.token_bytes())
        os.replace(tmp, os.path.join(path, TOKEN_BYTES_FILE))

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self.enc._mergeable_ranks)

    def special_ids(self) -> dict[str, int]:
        return dict(self.enc._special_tokens)

    def encode_special(self, name: str) -> int:
        return self.enc.encode_single_token(name)

    def token_bytes(self) -> np.ndarray:
        """int32 bytes per id (0 for special tokens), the denominator of bits-per-byte.

        Read from the raw token bytes: decoding to str first would replace the bytes of partial
        UTF-8 sequences with U+FFFD (3 bytes) and miscount them.
        """
        out = np.zeros(self.vocab_size, np.int32)
        for token, rank in self.enc._mergeable_ranks.items():
            out[rank] = len(token)
        return out

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text, prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded on `num_threads` threads).

        Special-token strings inside `text` are encoded as ordinary text, never as special ids:
        user-supplied text must not be able to forge a turn boundary.
        """
        pre = [self._special_id(prepend)] if prepend is not None else []
        post = [self._special_id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [pre + r + post for r in rows] if (pre or post) else rows
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def _special_id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ---- chat ---------------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048):
        """Token ids and the loss mask (1 = the assistant is trained to produce this token).

        A leading system message is merged into the first user message (the vocabulary has no
        system tokens); messages must then alternate user, assistant, user, ... Assistant content is
        a string or a list of parts: "text" and "python" (the tool call) are supervised,
        "python_output" is not (the tool writes it at inference time). Cut to `max_tokens`.
        """
        messages = _chat_messages(conversation)
        s = self.encode_special
        ids, mask = [self.bos_token_id], [0]

        def add(tokens, supervised):
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user content must be a string, not {type(content).__name__}")
                add([s("<|user_start|>"), *self.encode(content), s("<|user_end|>")], 0)
                continue
            add([s("<|assistant_start|>")], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, tokens = part.get("type"), self.encode(part.get("text", ""))
                    if kind == "text":
                        add(tokens, 1)
                    elif kind == "python":
                        add([s("<|python_start|>"), *tokens, s("<|python_end|>")], 1)
                    elif kind == "python_output":
                        add([s("<|output_start|>"), *tokens, s("<|output_end|>")], 0)
                    else:
                        raise ValueError(f"unknown assistant part type {kind!r} "
                                         f"(expected 'text', 'python' or 'python_output')")
            else:
                raise ValueError(f"assistant content must be a string or a list of parts, "
                                 f"not {type(content).__name__}")
            add([s("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """The prompt for sampling the last assistant turn: it is dropped, <|assistant_start|> added."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation ending in an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]


def _chat_messages(conversation) -> list[dict]:
    """Validate roles and turn order; return the messages with any system message merged."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("a conversation is a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged, *messages[2:]]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"conversation does not alternate: turn {i} is {m['role']!r}, "
                             f"expected {expected!r}")
    return messages


class StreamDecoder:
    """Token ids in, text out, one complete UTF-8 character at a time.

    A token can end in the middle of a multi-byte character (an emoji or CJK character split over
    tokens); its bytes wait here until the character is complete, so a streamed reply never shows
    a U+FFFD that the full decode would not have.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._enc = tokenizer.enc
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is pending is an incomplete character, shown as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
