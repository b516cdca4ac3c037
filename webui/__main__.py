"""`python -m webui --run-dir runs/x [--source sft]` or `python -m webui --demo`: serve the chat."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m webui", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory holding tokenizer/ and the models")
    p.add_argument("-i", "--source", default="sft", help="which stage's model: base, mid, sft, rl")
    p.add_argument("-g", "--model-tag", default=None, help="model subfolder (default: the newest)")
    p.add_argument("--demo", action="store_true", help="serve a tiny random-weight model: no checkpoint needed")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("-p", "--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=32, help="conversations decoded together in one batch")
    p.add_argument("--chunk", type=int, default=16, help="tokens per device call (and per streamed burst)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default most tokens per answer")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        serve(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"webui: {e}")
    except KeyboardInterrupt:
        pass


def serve(args):
    from werkzeug.serving import make_server

    from nanochat_jax.engine import Engine, demo_model, load_model
    from webui.server import ChatService, create_app

    if args.slots < 1 or args.chunk < 1:
        raise ValueError("--slots and --chunk must be at least 1")
    print("loading the model...", flush=True)
    if args.demo:
        params, config, tokenizer = demo_model()
        name = "nanochat-demo"
    else:
        params, config, tokenizer = load_model(args.run_dir, args.source, args.model_tag)
        name = f"nanochat-{args.source}"
    engine = Engine(params, config, tokenizer, chunk=args.chunk)
    service = ChatService(engine, slots=args.slots, model_name=name,
                          defaults={"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens})
    print("compiling (first request would wait otherwise)...", flush=True)
    warm = service.submit([tokenizer.bos_token_id], max_tokens=2, temperature=1.0)
    while not warm.done:
        warm.events.get(timeout=600)
    server = make_server(args.host, args.port, create_app(service), threaded=True)
    print(f"serving {name} on http://{args.host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    finally:
        service.close()


if __name__ == "__main__":
    main()
