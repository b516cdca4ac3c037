"""General conversations: SmolTalk, nanochat's identity conversations, FastChat's dummy
conversations, and your own jsonl.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}`: an optional system message,
then user and assistant alternating (see `Tokenizer.render_conversation`). Every file is checked
when it is loaded, so a bad line is reported with its file and line number before training starts.
"""

import os

from nanochat_jax.tasks import sources
from nanochat_jax.tokenizer import _chat_messages as check_turns

FASTCHAT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
FASTCHAT_VAL_EVERY = 10  # every 10th FastChat conversation is held out for validation


def validated(conversation, where: str) -> dict:
    try:
        check_turns(conversation)
        for m in conversation["messages"]:
            if m["role"] != "assistant" and not isinstance(m.get("content"), str):
                raise ValueError(f"{m['role']} content must be a string")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return conversation


def load_jsonl(path: str) -> list[dict]:
    """Your own conversations: one per line, either a list of messages (nanochat's CustomJSON
    format) or an object with a "messages" list."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no conversation file {path}")
    out = []
    for number, row in enumerate(sources.read_jsonl(path), 1):
        conversation = {"messages": row} if isinstance(row, list) else row
        out.append(validated(conversation, f"{path}:{number}"))
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def identity(data_dir: str | None = None) -> list[dict]:
    """nanochat's synthetic identity conversations (who the assistant is)."""
    return load_jsonl(sources.find(data_dir, "chat/identity/identity_conversations.jsonl"))


def fastchat(split: str, data_dir: str | None = None) -> list[dict]:
    """FastChat's dummy multi-turn conversations (ShareGPT format), split 90/10 into train/test."""
    path = sources.find(data_dir, "chat/fastchat/dummy_conversation.json")
    rows = sources.read_json(path)
    out = []
    for i, row in enumerate(rows):
        if (i % FASTCHAT_VAL_EVERY == FASTCHAT_VAL_EVERY - 1) != (split == "test"):
            continue
        messages = [{"role": FASTCHAT_ROLES.get(t["from"], t["from"]), "content": t["value"]}
                    for t in row["conversations"]]
        out.append(validated({"messages": messages}, f"{path}: conversation {row.get('id', i)}"))
    return out


def smoltalk(split: str, data_dir: str | None = None, hf: bool = False) -> list[dict]:
    """`HuggingFaceTB/smol-smoltalk` (460K train / 24K test) with `hf`; offline, FastChat's dummy
    conversations stand in for it (SmolTalk has no copy outside the hub)."""
    if split not in ("train", "test"):
        raise ValueError(f"SmolTalk has splits train and test, not {split!r}")
    if not hf:
        return sources.shuffled(fastchat(split, data_dir))
    rows = sources.hub_rows("HuggingFaceTB/smol-smoltalk", None, split)
    return [validated({"messages": r["messages"]}, f"smol-smoltalk {split} row {i}")
            for i, r in enumerate(sources.shuffled(rows))]
