"""Stages `tok` (train the tokenizer) and `tok_eval` (its compression on held-out text).

    python -m launch.stage tok --run-dir runs/default --vocab-size 32768    # writes <run-dir>/tokenizer
    python -m launch.stage tok_eval --run-dir runs/default

With no `--data-dir` both read the small Wikipedia corpus built into the package, so they run on a
fresh machine; point `--data-dir` at downloaded shards (`download`) or your own (`make_shards`).
"""

import argparse
import json
import os
import sys
import time

DEFAULT_RUN_DIR = os.path.join("runs", "default")


def tokenizer_dir(run_dir: str) -> str:
    """Where the `tok` stage leaves the tokenizer that every later stage of the run reads."""
    return os.path.join(run_dir, "tokenizer")

# Short samples of kinds of text the training corpus may lack (written for this project).
SAMPLES = {
    "multilingual": "Die Katze schläft auf dem Sofa. Le chat dort sur le canapé. 猫はソファで寝ています。"
                    "고양이가 소파에서 자고 있어요. Кошка спит на диване. القطة نائمة على الأريكة.",
    "numbers": "In 2024 the 3 plants produced 12,345.67 t (up 8.9% from 11,337.2 t); ids 0x1F, 0b1010, 1e-9.",
}


def main_tok(argv=None):
    parser = argparse.ArgumentParser(prog="tok", description="Train the BPE tokenizer (rustbpe) on the "
                                     "first --max-chars characters of the pretraining text.")
    parser.add_argument("--data-dir", help="folder of .parquet/.jsonl[.gz] shards (default: the built-in corpus)")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="saves <run-dir>/tokenizer (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="including the 9 special tokens (default: %(default)s)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on this many characters (default: 2B)")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters per document (default: %(default)s)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from nanochat_jax import data
    from nanochat_jax.tokenizer import Tokenizer

    try:
        texts = data.iter_texts(args.data_dir, "train", args.max_chars, args.doc_cap)
        bar = tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading")

        def counted():
            for t in texts:
                bar.update(len(t))
                yield t

        t0 = time.time()
        tok = Tokenizer.train(counted(), args.vocab_size)
        bar.close()
        print(f"trained vocab {tok.vocab_size:,} on {bar.n:,} chars in {time.time() - t0:.1f}s")
        sample = "Hello world! Numbers: 123, 4567. Contractions: I'm, you're. Unicode: 你好 🌍\n\ttabs"
        if tok.decode(tok.encode(sample)) != sample:
            raise RuntimeError("the trained tokenizer does not round-trip text")  # a bug, not user error
        tok.save(tokenizer_dir(args.run_dir))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"tok: {e}")
    tb = tok.token_bytes()
    print(f"saved {tokenizer_dir(args.run_dir)}: tokenizer.json, token_bytes.npy "
          f"(bytes per token: mean {tb[tb > 0].mean():.2f}, max {tb.max()})")


def main_tok_eval(argv=None):
    parser = argparse.ArgumentParser(prog="tok_eval", description="Compression (bytes per token) of the "
                                     "trained tokenizer on training, held-out and sample text; compared "
                                     "with GPT-2 and GPT-4 when tiktoken has them cached offline.")
    parser.add_argument("--data-dir", help="folder of shards (default: the built-in corpus)")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="reads <run-dir>/tokenizer (default: %(default)s)")
    parser.add_argument("--max-chars", type=int, default=2_000_000, help="characters of train/val text to measure (default: %(default)s)")
    parser.add_argument("--out", help="write the results as JSON here (default: <run-dir>/tokenizer/tok_eval.json)")
    args = parser.parse_args(argv)

    from nanochat_jax import data
    from nanochat_jax.tokenizer import Tokenizer

    try:
        ours = Tokenizer.from_directory(tokenizer_dir(args.run_dir))
        with open(os.path.join(os.path.dirname(data.__file__), "tokenizer.py")) as f:
            code = f.read()  # our own source: code text we may ship
        texts = {
            "train": "\n".join(data.iter_texts(args.data_dir, "train", args.max_chars)),
            "val (held out)": "\n".join(data.iter_texts(args.data_dir, "val", args.max_chars)),
            "code": code,
            **SAMPLES,
        }
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"tok_eval: {e}")
    tokenizers = {"ours": ours}
    for label, name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
        try:
            tokenizers[label] = Tokenizer.from_tiktoken(name)
        except Exception as e:  # missing plugin, cache miss, or a broken cache entry: all mean "skip"
            print(f"skipping {label}: {e}")
    results = {}
    for label, tok in tokenizers.items():
        results[label] = {"vocab_size": tok.vocab_size, "texts": {}}
        for name, text in texts.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, (label, name)
            n_bytes = len(text.encode())
            results[label]["texts"][name] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / max(1, len(ids))}
    header = f"{'text':<16}{'bytes':>10}" + "".join(f"{k + ' tok':>12}{k + ' B/tok':>12}" for k in results)
    print("\n" + header + "\n" + "-" * len(header))
    for name in texts:
        row = f"{name:<16}{results['ours']['texts'][name]['bytes']:>10,}"
        for k in results:
            r = results[k]["texts"][name]
            row += f"{r['tokens']:>12,}{r['ratio']:>12.2f}"
        print(row)
    print("vocab sizes: " + ", ".join(f"{k} {v['vocab_size']:,}" for k, v in results.items()))
    out = args.out or os.path.join(tokenizer_dir(args.run_dir), "tok_eval.json")
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    commands = {"tok": main_tok, "tok_eval": main_tok_eval}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m launch.tok {{{','.join(commands)}}} [--help]")
    commands[sys.argv[1]](sys.argv[2:])
