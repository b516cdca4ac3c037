"""Task datasets: conversations for mid-training, SFT and RL, and the chat evaluations."""
