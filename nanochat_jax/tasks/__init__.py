"""Task datasets as lists of conversations (the reference's `tasks/`), read from local copies.

Each task module turns its dataset's files (laid out as in `../shared/data`, see its README) into the
reference's conversation dicts: `messages` (user question, assistant answer) plus what the evaluation
needs (for multiple choice, the answer `letters`).
"""
