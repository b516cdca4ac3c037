"""Commands `download` (the reference's hosted pretraining shards) and `make_shards` (your own text).

    python -m launch.data_cli download --dataset climbmix -n 8
    python -m launch.data_cli make_shards my_texts/ --out my_shards/

Any folder of `.parquet` (a `text` column) or `.jsonl[.gz]` (a `text` field) files is a source for
the `tok` and pretraining stages (`--source FOLDER`); the last file in name order is validation.
"""

import argparse
import os
import sys

DEFAULT_DATA_ROOT = os.path.join("~", ".cache", "nanochat_jax", "data")


def main_download(argv=None):
    from nanochat_jax import data

    parser = argparse.ArgumentParser(
        prog="download", description="Download pretraining shards (parquet, a `text` column) of the "
        "reference's datasets: parallel, retried, resumable and verified. The dataset's last shard, "
        "the validation split, is always fetched in addition to the -n training shards.")
    parser.add_argument("--dataset", choices=sorted(data.DATASETS), default="climbmix",
                        help="climbmix: nanochat's current ClimbMix-400B shuffle (6,542 train shards); "
                        "fineweb-edu: its earlier FineWeb-Edu-100B shuffle (1,822). Default: %(default)s")
    parser.add_argument("-n", "--num-shards", type=int, required=True,
                        help="training shards to fetch (about 100 MB and 250M chars each); -1: all")
    parser.add_argument("--out", help=f"target folder (default: {DEFAULT_DATA_ROOT}/<dataset>)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard (default: %(default)s)")
    parser.add_argument("--base-url", help="fetch from this mirror instead (same shard_NNNNN.parquet names)")
    parser.add_argument("--last-shard", type=int, help="with --base-url: index of the mirror's last (validation) shard")
    args = parser.parse_args(argv)

    remote = data.DATASETS[args.dataset]
    if args.base_url:
        remote = data.Remote(args.base_url.rstrip("/"), remote.last_shard if args.last_shard is None else args.last_shard)
    elif args.last_shard is not None:
        parser.error("--last-shard only goes with --base-url")
    out = os.path.expanduser(args.out or os.path.join(DEFAULT_DATA_ROOT, args.dataset))
    try:
        paths = data.download(out, remote, args.num_shards, args.workers, args.attempts)
    except (data.DownloadError, OSError) as e:
        sys.exit(f"download: {e}")
    print(f"{len(paths)} shards in {out} (validation: {os.path.basename(paths[-1])}); "
          f"use it with --source {out}")


def main_convert(argv=None):
    from nanochat_jax import data

    parser = argparse.ArgumentParser(
        prog="make_shards", description="Turn your own text into pretraining shards: .txt, .jsonl[.gz] "
        "or .parquet files (or folders of them) in, parquet shards with a `text` column out. "
        "The last --val-docs documents form the final shard, the validation split.")
    parser.add_argument("inputs", nargs="+", help="files or folders")
    parser.add_argument("--out", required=True, help="target folder")
    parser.add_argument("--text-field", default="text", help="the jsonl field with the text (default: %(default)s)")
    parser.add_argument("--txt-mode", choices=["file", "paragraph", "line"], default="file",
                        help="a .txt file is one document, or one per paragraph/line (default: %(default)s)")
    parser.add_argument("--shard-chars", type=int, default=250_000_000, help="characters per shard (default: %(default)s)")
    parser.add_argument("--row-group-docs", type=int, default=1024,
                        help="documents per row group, the unit of shuffling and of sharing among processes (default: %(default)s)")
    parser.add_argument("--val-docs", type=int, default=1000, help="documents held out for validation (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        paths = data.make_shards(args.inputs, args.out, args.shard_chars, args.row_group_docs,
                                 args.val_docs, args.text_field, args.txt_mode)
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"make_shards: {e}")
    print(f"wrote {len(paths)} shards to {args.out} (validation: {os.path.basename(paths[-1])}); "
          f"use it with --source {args.out}")


if __name__ == "__main__":
    commands = {"download": main_download, "make_shards": main_convert}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m launch.data_cli {{{','.join(commands)}}} [--help]")
    commands[sys.argv[1]](sys.argv[2:])
