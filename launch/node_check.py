"""The checks of a multi-GPU node: `python -m launch.node_check [--preset gpu|cpu] [--out DIR]`.

1. numerics: one optimizer step on every device equals the step on one device (`launch.mesh_check`,
   d12 in float32 on GPUs);
2. scaling: `launch.bench_train` at d20 on 1 device and on all of them; tokens/s per device on all
   must be at least 90% of the one-device figure;
3. elastic resume: a complete d12 pretraining run (the reference's horizon) on every device through
   the `tok` and `base` stages, checkpointed; then its middle checkpoint resumed on one device for a
   few minutes (SIGTERM saves and stops it), whose losses must follow the full run's.

`--preset cpu` runs the same on 8 fake CPU devices with tiny models (a minute or two). Each step's
output goes to <out>/<step>.log; the verdicts to <out>/node_check.json and the screen. Exits with 1
if a check fails.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

PRESETS = {
    "gpu": {
        "mesh_check": ["--depth", "12", "--device-batch-size", "4"],
        "bench": ["--depth", "20", "--steps", "5"],
        "tok": ["--vocab-size", "32768"],
        "base": ["--depth", "12", "--save-every", "500", "--keep", "10", "--sample-every", "-1"],
        "resume_seconds": 240,
        "loss_rtol": 2e-2,  # bf16: 8 micro-steps on one GPU round differently from one on eight
        "judge_scaling": True,
    },
    "cpu": {
        "mesh_check": ["--depth", "3", "--max-seq-len", "64", "--device-batch-size", "1"],
        "bench": ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "1", "--total-batch-size", "1024",
                  "--steps", "2", "--attention", "xla"],
        "tok": ["--vocab-size", "512", "--max-chars", "300000"],
        "base": ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "1", "--total-batch-size", "1024",
                 "--num-iterations", "16", "--warmup-steps", "2", "--eval-every", "8", "--eval-tokens", "1024",
                 "--sample-every", "-1", "--save-every", "4", "--keep", "10"],
        "resume_seconds": None,  # tiny: the resumed run goes to the end
        "loss_rtol": 1e-4,
        "judge_scaling": False,  # fake devices share the host's cores: the figure is reported, not judged
    },
}
SCALING_FLOOR = 0.9


def environment(preset: str, devices: int | None) -> dict:
    """The environment of a child process that sees `devices` devices (None: all)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if preset == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices or 8}")
    elif devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
    return env


def run(log_path: str, args: list[str], env: dict, stop_after: float | None = None, check: bool = True) -> str:
    """`python -m ARGS` with its output written to `log_path`; SIGTERM after `stop_after` seconds
    (the training stages save and exit on it). Returns the output; a failed exit raises when `check`."""
    print(f"$ python -m {' '.join(args)}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        # A timer, not a check between lines: progress bars write no newline for minutes.
        timer = threading.Timer(stop_after, proc.send_signal, [signal.SIGTERM]) if stop_after is not None else None
        if timer:
            timer.start()
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
        proc.wait()
        if timer:
            timer.cancel()
    if check and proc.returncode != 0:
        raise RuntimeError(f"`python -m {' '.join(args)}` failed (exit {proc.returncode}); see {log_path}")
    return "".join(lines)


def losses(stage_dir: str) -> dict[int, float]:
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main(argv=None):
    try:
        check_node(argv)
    except (RuntimeError, OSError, ValueError) as e:
        sys.exit(f"node_check: {e}")


def check_node(argv):
    p = argparse.ArgumentParser(prog="python -m launch.node_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--out", default="runs/node_check", help="logs, the run and the verdicts (default: %(default)s)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    os.makedirs(args.out, exist_ok=True)
    env_all = environment(args.preset, None)
    verdicts = {}

    # 1. numerics
    out = run(os.path.join(args.out, "mesh_check.log"), ["launch.mesh_check", *preset["mesh_check"]], env_all,
              check=False)  # a failed comparison exits with 1 and still prints its verdict
    verdicts["numerics"] = json.loads(out.strip().splitlines()[-1])

    # 2. scaling
    n = verdicts["numerics"]["devices"]
    out = run(os.path.join(args.out, "scaling.log"), ["launch.bench_train", *preset["bench"], "--devices", f"1,{n}"], env_all)
    one, all_ = json.loads(out.strip().splitlines()[-1])
    efficiency = all_["tokens_per_s_per_device"] / one["tokens_per_s_per_device"]
    verdicts["scaling"] = {"devices": n, "tokens_per_s_one": one["tokens_per_s"], "tokens_per_s_all": all_["tokens_per_s"],
                           "per_device_efficiency": efficiency,
                           "pass": efficiency >= SCALING_FLOOR if preset["judge_scaling"] else None}

    # 3. a full pretraining run on every device, its middle checkpoint resumed on one
    run_dir = os.path.join(args.out, "run")
    if not os.path.isdir(os.path.join(run_dir, "tokenizer")):
        run(os.path.join(args.out, "tok.log"), ["launch.stage", "tok", "--run-dir", run_dir, *preset["tok"]], env_all)
    base = ["launch.stage", "base", "--run-dir", run_dir, *preset["base"]]
    run(os.path.join(args.out, "base.log"), [*base, "--model-tag", "all", "--resume"], env_all)
    checkpoints = os.path.join(run_dir, "base", "all", "checkpoints")
    steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
    middle = steps[(len(steps) - 1) // 2]
    elastic = os.path.join(run_dir, "base", "one")
    shutil.rmtree(elastic, ignore_errors=True)
    os.makedirs(os.path.join(elastic, "checkpoints"))
    shutil.copytree(os.path.join(checkpoints, str(middle)), os.path.join(elastic, "checkpoints", str(middle)))
    run(os.path.join(args.out, "resume_one_device.log"), [*base, "--model-tag", "one", "--resume"],
        environment(args.preset, 1), stop_after=preset["resume_seconds"])
    full, resumed = losses(os.path.join(run_dir, "base", "all")), losses(elastic)
    worst = max(abs(resumed[s] - full[s]) / abs(full[s]) for s in resumed)
    verdicts["elastic_resume"] = {"full_run_steps": len(full), "resumed_from": middle, "steps_on_one_device": len(resumed),
                                  "worst_loss_rel_diff": worst, "pass": bool(resumed) and worst <= preset["loss_rtol"]}

    with open(os.path.join(args.out, "node_check.json"), "w") as f:
        json.dump(verdicts, f, indent=2)
    print(f"numerics: {n} devices vs 1, worst parameter error {verdicts['numerics']['worst_error']:.2e}: "
          f"{'PASS' if verdicts['numerics']['pass'] else 'FAIL'}")
    scaling = verdicts["scaling"]["pass"]
    print(f"scaling: {one['tokens_per_s']:,.0f} tok/s on 1 device, {all_['tokens_per_s']:,.0f} on {n} "
          f"({100 * efficiency:.1f}% per device): {'not judged' if scaling is None else 'PASS' if scaling else 'FAIL'}")
    e = verdicts["elastic_resume"]
    print(f"elastic resume: {e['full_run_steps']} steps on {n} devices; from step {middle} on 1 device for "
          f"{e['steps_on_one_device']} steps, worst loss difference {worst:.1e}: {'PASS' if e['pass'] else 'FAIL'}")
    if any(v["pass"] is False for v in verdicts.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
