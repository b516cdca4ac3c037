"""Task datasets: conversations for mid-training, SFT and RL, and the chat evaluations.

Every loader reads local files laid out like `../shared/data` (`sources.py`) and returns the
reference's conversation dicts: `messages` plus what an evaluation needs (for multiple choice, the
answer `letters`).
"""
