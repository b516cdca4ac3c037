"""The chat web UI and OpenAI-compatible API: `python -m webui --run-dir runs/x` (or `--demo`)."""
