"""The reference's multiple-choice conversation, shared by the chat evaluations and the training mixtures."""


def render_mc(question: str, letters, choices) -> str:
    """The reference's multiple-choice prompt. Each letter follows its choice with no space before
    it, so it is the same token ("A", not " A") the assistant answers with; small models need that."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters, choices, answer: str, **extra) -> dict:
    """User asks, assistant answers with the letter; `letters` lets an evaluation compare only those."""
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), **extra}
