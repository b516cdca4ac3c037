"""Reproduce the reference's golden outputs from their inputs (the `../shared/golden` contract).

    python -m launch.parity model IN.npz OUT.npz     # OUT: logits, loss
    python -m launch.parity tokenizer IN.json OUT.json [--corpus FILE.jsonl[.gz]]

The command computes and writes; it never reads the expected values from IN. Comparing is the
caller's job (the tests do it), so any file of the same format can be checked the same way.
"""

import argparse
import os
import sys


def _force_cpu_float32():
    # Parity is defined in float32; pin it before jax picks a backend or a compute dtype.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["NANOCHAT_DTYPE"] = "float32"


def parity_model(in_path: str, out_path: str) -> None:
    _force_cpu_float32()
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from nanochat_jax import convert, model

    with np.load(in_path) as f:
        config = convert.config_from_json(str(f["config"]))
        state = {k.removeprefix("param/"): f[k] for k in f.files if k.startswith("param/")}
        idx, targets = f["idx"], f["targets"]
    params = convert.from_reference(state, config)
    logits = jax.jit(model.forward, static_argnums=2)(params, idx, config)
    loss = jax.jit(model.loss_fn, static_argnums=3)(params, idx, targets, config)
    np.savez(out_path, logits=np.asarray(logits, np.float32), loss=np.asarray(loss, np.float64))
    print(f"wrote {out_path}: logits {tuple(logits.shape)}, loss {float(loss):.6f}")


def parity_tokenizer(in_path: str, out_path: str, corpus: str | None = None) -> None:
    """Re-encode IN's texts and conversations; with `corpus`, from ranks retrained on it."""
    import base64
    import hashlib
    import json

    from nanochat_jax import data
    from nanochat_jax.tokenizer import Tokenizer

    with open(in_path) as f:
        golden = json.load(f)
    if corpus is None:
        ranks = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
        tok = Tokenizer.from_ranks(ranks, golden["pattern"], golden["special_tokens"])
    else:
        texts = list(data.iter_jsonl_texts(corpus))
        tok = Tokenizer.train(texts, golden["vocab_size"], golden["pattern"])
    out = {
        "vocab_size": tok.vocab_size,
        "pattern": golden["pattern"],
        "special_tokens": golden["special_tokens"],
        "special_ids": tok.special_ids(),
        "mergeable_ranks_b64": {base64.b64encode(k).decode("ascii"): v
                                for k, v in tok.mergeable_ranks().items()},
        "encodings": [{"text": e["text"], "ids": tok.encode(e["text"])} for e in golden["encodings"]],
        "encodings_with_bos": [{"text": e["text"], "ids": tok.encode(e["text"], prepend=tok.bos_token_id)}
                               for e in golden["encodings_with_bos"]],
        "conversations": [],
    }
    for c in golden["conversations"]:
        ids, mask = tok.render_conversation(c["conversation"])
        out["conversations"].append({"conversation": c["conversation"], "ids": ids, "mask": mask,
                                     "completion_prompt": tok.render_for_completion(c["conversation"])})
    if corpus is not None:
        out["corpus"] = os.path.basename(corpus).removesuffix(".gz")
        out["corpus_sha256"] = hashlib.sha256("".join(texts).encode()).hexdigest()  # the golden convention
    with open(out_path, "w") as f:
        json.dump(out, f)
    print(f"wrote {out_path}: vocab {tok.vocab_size}, {len(out['encodings'])} texts, "
          f"{len(out['conversations'])} conversations" + (f", ranks retrained on {corpus}" if corpus else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("model", help="logits and loss of a reference model on its inputs")
    p.add_argument("inp", metavar="IN.npz")
    p.add_argument("out", metavar="OUT.npz")
    p = sub.add_parser("tokenizer", help="token ids, masks (and with --corpus, ranks) of a golden tokenizer file")
    p.add_argument("inp", metavar="IN.json")
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--corpus", metavar="FILE.jsonl[.gz]", help="retrain the ranks on this corpus (its 'text' fields)")
    args = parser.parse_args(argv)
    try:
        if args.what == "model":
            parity_model(args.inp, args.out)
        elif args.what == "tokenizer":
            parity_tokenizer(args.inp, args.out, args.corpus)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"parity {args.what}: {e}")


if __name__ == "__main__":
    main()
