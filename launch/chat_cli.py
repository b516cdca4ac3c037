"""Chat in the terminal: `python -m launch.stage chat_cli --run-dir runs/x [-p "one question"]`.

Loads `<run-dir>/<source>/<model-tag>/` (the newest model of that stage without a tag) and the run's
tokenizer; `--demo` uses a tiny random-weight model instead. Interactive commands: `clear` starts
over, `quit`/`exit` (or Ctrl-D) leaves.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.stage chat_cli", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory holding tokenizer/ and the models")
    p.add_argument("-i", "--source", default="sft", help="which stage's model: base, mid, sft, rl")
    p.add_argument("-g", "--model-tag", default=None, help="model subfolder (default: the newest)")
    p.add_argument("-p", "--prompt", default="", help="ask this one question, print the answer and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--demo", action="store_true", help="a tiny random-weight model: no checkpoint needed")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        chat(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_cli: {e}")
    except KeyboardInterrupt:
        print()


def chat(args):
    from nanochat_jax.engine import Engine, Request, demo_model, load_model

    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise ValueError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and --max-tokens >= 1")
    params, config, tokenizer = demo_model() if args.demo else load_model(args.run_dir, args.source, args.model_tag)
    engine = Engine(params, config, tokenizer)
    s = tokenizer.encode_special
    user_start, user_end, assistant_start, assistant_end = (
        s("<|user_start|>"), s("<|user_end|>"), s("<|assistant_start|>"), s("<|assistant_end|>"))

    if not args.prompt:
        print(f"nanochat ({'demo' if args.demo else args.source} model, {config.n_layer} layers, "
              f"context {config.sequence_len}). 'clear' starts over, 'quit' or Ctrl-D leaves.")
    conversation = [tokenizer.bos_token_id]
    turn = 0
    while True:
        if args.prompt:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ").strip()
            except EOFError:
                print()
                return
            if text.lower() in ("quit", "exit"):
                return
            if text.lower() == "clear":
                conversation = [tokenizer.bos_token_id]
                print("(conversation cleared)")
                continue
            if not text:
                continue
        prompt = conversation + [user_start, *tokenizer.encode(text), user_end, assistant_start]
        room = config.sequence_len - len(prompt)
        if room < 1:
            message = f"the conversation ({len(prompt)} tokens) no longer fits the {config.sequence_len}-token context"
            if args.prompt:
                raise ValueError(message)
            print(f"({message}; type 'clear' to start over)")
            continue
        request_kw = dict(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed + turn)
        request = Request(prompt, **request_kw)
        if not args.prompt:
            print("\nAssistant: ", end="", flush=True)
        for piece in engine.stream(prompt, request=request, **request_kw):
            print(piece, end="", flush=True)
        print()
        conversation = prompt + request.samples[0].tokens + [assistant_end]
        turn += 1
        if args.prompt:
            return


if __name__ == "__main__":
    main()
