"""Reproduce the reference's golden outputs from their inputs (the `../shared/golden` contract).

    python -m launch.parity model IN.npz OUT.npz     # OUT: logits, loss
    python -m launch.parity optim IN.npz OUT.npz     # OUT: after1/<name>, after2/<name>
    python -m launch.parity tokenizer IN.json OUT.json [--corpus FILE.jsonl[.gz]]
    python -m launch.parity core IN.json MODEL.npz OUT.json [--eval-bundle DIR]

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


def _groups_from_file(param_groups: list, config):
    """The file's param groups as our `Group`s and a label tree: each of our leaves takes the group
    of the reference names stacked into it (which must all share one group)."""
    from nanochat_jax import convert, optim

    groups, group_of = {}, {}
    for i, g in enumerate(param_groups):
        key = f"{i}_{g['kind']}"
        extra = dict(betas=tuple(g["betas"]), eps=g["eps"]) if g["kind"] == "adamw" else dict(beta2=g["beta2"], ns_steps=g["ns_steps"])
        groups[key] = optim.Group(g["kind"], g["lr"], g["weight_decay"], **extra)
        group_of.update(dict.fromkeys(g["param_names"], key))
    labels = {"blocks": {}}
    for path, names in convert.reference_names(config).items():
        keys = {group_of.get(n) for n in names}
        if None in keys:
            raise KeyError(f"{path}: {[n for n in names if n not in group_of][:3]} are in no param group")
        if len(keys) > 1:
            raise ValueError(f"{path} stacks parameters from different groups {sorted(keys)}")
        parent, _, leaf = path.rpartition("/")
        (labels[parent] if parent else labels)[leaf] = keys.pop()
    # The reference's training sets one momentum for all Muon groups; so does our optimizer.
    momenta = {g["momentum"] for g in param_groups if g["kind"] == "muon"}
    if len(momenta) > 1:
        raise ValueError(f"Muon groups with different momenta {sorted(momenta)}: one Muon momentum is supported")
    return groups, labels, momenta.pop() if momenta else 0.95


def parity_optim(in_path: str, out_path: str) -> None:
    _force_cpu_float32()
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    jax.config.update("jax_default_matmul_precision", "highest")
    from nanochat_jax import convert, optim

    with np.load(in_path) as f:
        config = convert.config_from_json(str(f["config"]))
        param_groups = json.loads(str(f["param_groups"]))
        trees = {stage: convert.from_reference({k.removeprefix(f"{stage}/"): f[k] for k in f.files if k.startswith(f"{stage}/")}, config)
                 for stage in ("before", "grad1", "grad2")}
    groups, labels, momentum = _groups_from_file(param_groups, config)
    tx = optim.build_optimizer(groups, labels, lr_multiplier=1.0, muon_momentum=momentum, muon_wd_multiplier=1.0,
                               ortho_dtype=jnp.float32)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = trees["before"]
    state = tx.init(params)
    out = {}
    for i in (1, 2):
        params, state = step(params, state, trees[f"grad{i}"])
        out.update({f"after{i}/{k}": v for k, v in convert.to_reference(params, config).items()})
    np.savez(out_path, **out)
    print(f"wrote {out_path}: {len(out) // 2} parameters after steps 1 and 2, {len(groups)} groups")


def _golden_tokenizer(golden: dict):
    """The tokenizer a golden tokenizer file describes (its ranks, split pattern, special tokens)."""
    import base64

    from nanochat_jax.tokenizer import Tokenizer

    ranks = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
    return Tokenizer.from_ranks(ranks, golden["pattern"], golden["special_tokens"])


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
        tok = _golden_tokenizer(golden)
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


def parity_core(in_path: str, model_path: str, out_path: str, bundle: str | None = None) -> None:
    """Re-render and re-score every example of a CORE golden file with its model and tokenizer.

    The task data comes from `bundle` (default: `../data/core` beside IN, where the golden set keeps
    it); IN's tasks, example count and seeds say what to take from it."""
    _force_cpu_float32()
    import json

    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from nanochat_jax import convert, sharding
    from nanochat_jax.evals import core
    from nanochat_jax.evals.scoring import Scorer

    with open(in_path) as f:
        golden = json.load(f)
    if golden.get("shuffle_seed", core.SHUFFLE_SEED) != core.SHUFFLE_SEED or \
            golden.get("fewshot_seed", "1234+idx") != f"{core.FEWSHOT_SEED}+idx":
        raise ValueError(f"{in_path}: seeds {golden.get('shuffle_seed')}, {golden.get('fewshot_seed')} are not the reference's")
    here = os.path.dirname(os.path.abspath(in_path))
    with open(os.path.join(here, golden["tokenizer"])) as f:
        tokenizer = _golden_tokenizer(json.load(f))
    bundle = bundle or os.path.join(here, "..", "data", "core")
    with np.load(model_path) as f:
        config = convert.config_from_json(str(f["config"]))
        params = convert.from_reference({k.removeprefix("param/"): f[k] for k in f.files if k.startswith("param/")}, config)
    # One device: parity is about numbers, and it keeps the longest prompts' batches small.
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    scorer = Scorer(params, config, mesh, pad_id=tokenizer.bos_token_id, batch_tokens=4096, dtype="float32")
    out = {k: v for k, v in golden.items() if k != "tasks"}
    out["tasks"] = {}
    for label, task_in in golden["tasks"].items():
        meta = task_in["meta"]
        task = core.CoreTask(label=label, dataset_uri=meta["dataset_uri"], task_type=meta["task_type"],
                             num_fewshot=meta["num_fewshot"], delimiter=meta["continuation_delimiter"],
                             random_baseline=0.0)
        path = core.task_data_path(bundle, task)
        if not os.path.exists(path):
            raise FileNotFoundError(f"task {label}: no data at {path} (pass --eval-bundle DIR)")
        result = core.evaluate_task(scorer, tokenizer, task, core.load_examples(path, golden["n_examples"]))
        out["tasks"][label] = {"meta": meta, "accuracy": result["accuracy"], "examples": result["examples"]}
        print(f"{label:<25} accuracy {result['accuracy']:.4f} over {len(result['examples'])} examples")
    with open(out_path, "w") as f:
        json.dump(out, f)
    print(f"wrote {out_path}: {len(out['tasks'])} tasks")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("model", help="logits and loss of a reference model on its inputs")
    p.add_argument("inp", metavar="IN.npz")
    p.add_argument("out", metavar="OUT.npz")
    p = sub.add_parser("optim", help="parameters after two optimizer steps from the file's params and grads")
    p.add_argument("inp", metavar="IN.npz")
    p.add_argument("out", metavar="OUT.npz")
    p = sub.add_parser("tokenizer", help="token ids, masks (and with --corpus, ranks) of a golden tokenizer file")
    p.add_argument("inp", metavar="IN.json")
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--corpus", metavar="FILE.jsonl[.gz]", help="retrain the ranks on this corpus (its 'text' fields)")
    p = sub.add_parser("core", help="CORE prompts, spans, losses and predictions of a golden CORE file")
    p.add_argument("inp", metavar="IN.json")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("out", metavar="OUT.json")
    p.add_argument("--eval-bundle", metavar="DIR", help="task data laid out like eval_bundle/ (default: ../data/core beside IN)")
    args = parser.parse_args(argv)
    try:
        if args.what == "model":
            parity_model(args.inp, args.out)
        elif args.what == "optim":
            parity_optim(args.inp, args.out)
        elif args.what == "tokenizer":
            parity_tokenizer(args.inp, args.out, args.corpus)
        elif args.what == "core":
            parity_core(args.inp, args.model, args.out, args.eval_bundle)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"parity {args.what}: {e}")


if __name__ == "__main__":
    main()
