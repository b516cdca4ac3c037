"""The report card: `python -m launch.stage report --run-dir runs/cpu`.

Writes `<run-dir>/report/report.md` (system, summary table, every stage's settings, time, tokens,
MFU and results, loss and val-bpb plots) and a copy `report.md` in the working directory whose
image links point into the run directory. See `nanochat_jax/report.py` for the files it reads.
"""

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.stage report", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="the run directory to report on")
    p.add_argument("--copy-to", default=".", help="also write report.md here ('' = no copy)")
    args = p.parse_args(argv)
    from nanochat_jax import report

    try:
        path = report.build(args.run_dir)
        print(f"wrote {path}")
        if args.copy_to:
            print(f"wrote {report.copy_to(path, args.copy_to)}")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        sys.exit(f"report: {e}")
    return os.path.abspath(path)
