"""Chaos run: train under torchrun with a random fault every ~50 steps and check that the run finishes unattended
on the fault-free run's final loss; print goodput.

    python benchmarks/chaos_run.py --preset debug --steps 300 --every 50
    python benchmarks/chaos_run.py --ft --preset debug-tiny --steps 6000 --every 500   # torchft replica groups

With --ft the runs are torchft replica groups, one per host, the hosts made of network namespaces (root and
iproute2; tests/netns.py): the lighthouse on host 0 and on each host `llama3 train ft.replicas=N ft.groups=[i]`,
as docs/RELIABILITY.md gives them (a dead or hung group is dropped from the quorum, the others go on, a spare
process takes its place and heals from a live peer). The fault-free reference runs at the same time as the chaos
run on hosts of its own (same machine load). The final losses then differ: while a group is away its block of
each batch is not trained on. Only there is the link of a host cut (its bridge port set down for --cut-seconds,
then up again): never host 0's, whose loss is the lighthouse's and so the whole job's.

Faults are drawn (seeded) from: a killed rank, a hung rank, a NaN step, a flipped parameter bit, a corrupted latest
checkpoint, a failing save, and with --ft a cut link. The fault-free reference skips the same batches the NaN steps skip, so the two runs
must end on bit-identical parameters and the same loss.

Checkpoint interval: Young/Daly's optimum is sqrt(2 x save cost x mean time between faults). The script measures the
save cost in the reference run and prints the optimum for the fault rate it injects.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the namespace hosts of the multi-host tests (netns.py)
KINDS = ["kill", "hang", "nan", "bitflip", "corrupt_checkpoint", "fail_save"]
FT_KINDS = ["kill", "hang", "nan", "bitflip", "corrupt_checkpoint", "cut_link", "fail_save"]


def torchrun(args: list[str], nproc: int, max_restarts: int, timeout: float) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "llama3.train", *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return time.perf_counter() - start


def final_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50, help="a fault about every this many steps")
    ap.add_argument("--checkpoint-every", default="25", help="steps, or auto (Young/Daly)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--watchdog", type=float, default=30.0, help="seconds without progress that count as a hang")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value training settings for both runs")
    ap.add_argument("--dir", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--ft", action="store_true", help="torchft replica groups (ft.replicas=--nproc) instead of DDP")
    ap.add_argument("--kinds", default=None, help="comma-separated fault kinds (default: every kind)")
    ap.add_argument("--cut-seconds", type=float, default=20.0, help="--ft: how long a cut link stays down")
    opts = ap.parse_args()
    import torch
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; machine shared with other jobs")

    rng = random.Random(opts.seed)
    kinds = opts.kinds.split(",") if opts.kinds else FT_KINDS if opts.ft else KINDS
    faults = []
    for i, at in enumerate(range(opts.every, opts.steps, opts.every)):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        step = max(2, at + rng.randint(-opts.every // 5, opts.every // 5))
        faults.append(f"{kind}:step={step}:rank={rng.randrange(opts.nproc)}" if kind in ("kill", "hang", "bitflip")
                      else f"{kind}:step={step}:rank={rng.randrange(1, opts.nproc)}" if kind == "cut_link"
                      else f"{kind}:step={step}")
    nan_steps = [int(f.split("step=")[1].split(":")[0]) for f in faults if f.startswith("nan")]
    restarts = sum(f.split(":")[0] in ("kill", "hang", "corrupt_checkpoint") for f in faults)

    base = Path(opts.dir or tempfile.mkdtemp(prefix="chaos-"))
    common = [f"model.preset={opts.preset}", "data.dataset=synthetic", f"data.seq_len={opts.seq_len}",
              f"training.batch_size={opts.batch_size}", f"training.steps={opts.steps}", "eval.every=-1",
              "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.export=false",
              f"parallel.dp_replicate={opts.nproc}", f"checkpoint.every={opts.checkpoint_every}",
              "checkpoint.keep=2", "faults.fingerprint_every=10", f"faults.watchdog_timeout_s={opts.watchdog}", *opts.extra]
    print(f"faults: {', '.join(faults)}")
    if opts.ft:
        return ft_main(opts, base, faults, nan_steps)
    ref_wall = torchrun(common + [f"run.dir={base / 'reference'}", f"faults.skip_steps={nan_steps}"],
                        opts.nproc, 0, timeout=3600)
    chaos_wall = torchrun(common + [f"run.dir={base / 'chaos'}", f"faults.inject={json.dumps(faults)}"],
                          opts.nproc, restarts + 2, timeout=3600)

    ref, chaos = final_loss(base / "reference"), final_loss(base / "chaos")
    g_ref = json.loads((base / "reference" / "goodput.json").read_text())["summary"]
    g = json.loads((base / "chaos" / "goodput.json").read_text())["summary"]
    save_cost = g_ref["checkpoint_stall_s_this_start"] / max(1, opts.steps // int(opts.checkpoint_every))
    step_time = g_ref["productive_s"] / opts.steps
    mtbf = opts.every * step_time
    print(f"final loss: fault-free {ref:.6f}, chaos {chaos:.6f} -> {'EQUAL' if ref == chaos else 'DIFFERENT'}")
    print(f"wall: fault-free {ref_wall:.1f}s, chaos {chaos_wall:.1f}s ({g['restarts']} restarts, "
          f"{g['rollbacks']} rollbacks)")
    print(f"goodput: fault-free {g_ref['goodput']:.1%}, chaos {g['goodput']:.1%}")
    print(f"save {save_cost * 1e3:.0f} ms, step {step_time * 1e3:.1f} ms, a fault every {mtbf:.1f}s -> "
          f"Young/Daly interval sqrt(2 x save x MTBF) = {math.sqrt(2 * save_cost * mtbf) / step_time:.0f} steps "
          f"(used {opts.checkpoint_every})")
    sys.exit(0 if ref == chaos else 1)


def ft_main(opts, base: Path, faults: list[str], nan_steps: list[int]) -> None:
    import shutil

    from netns import Hosts
    if os.geteuid() != 0 or shutil.which("ip") is None:
        sys.exit("--ft runs each replica group on a host made of a network namespace: it needs root and iproute2")

    from llama3.train.events import read_events
    from llama3.train.report import format_report, summarize
    common = [f"model.preset={opts.preset}", "data.dataset=synthetic", f"data.seq_len={opts.seq_len}",
              f"training.batch_size={opts.batch_size}", f"training.steps={opts.steps}", "eval.every=-1",
              "metrics.peak_tflops=1", "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.export=false",
              f"checkpoint.every={opts.checkpoint_every}", "checkpoint.keep=2",
              "faults.fingerprint_every=10", f"faults.watchdog_timeout_s={opts.watchdog}", *opts.extra]
    injected = [f for f in faults if not f.startswith("cut_link")]  # the trainer's own; the cuts are done here
    cuts = sorted((int(f.split("step=")[1].split(":")[0]), int(f.split("rank=")[1])) for f in faults
                  if f.startswith("cut_link"))
    runs = {"reference": common + [f"faults.skip_steps={nan_steps}"],
            "chaos": common + [f"faults.inject={json.dumps(injected)}"]}
    hosts = {}
    try:
        start = time.time()
        for name, args in runs.items():
            (base / name).mkdir(parents=True, exist_ok=True)
            hosts[name] = Hosts(opts.nproc)
            hosts[name].start_replica_groups(args + [f"run.dir={base / name}"], base / name)
        walls, cut_log = {}, []
        while len(walls) < len(runs):
            time.sleep(0.5)
            if cuts and last_step(base / "chaos") >= cuts[0][0]:
                step, host = cuts.pop(0)
                hosts["chaos"].cut(host)
                down = time.time()
                time.sleep(opts.cut_seconds)  # the other faults fire inside the trainer meanwhile
                hosts["chaos"].restore(host)
                cut_log.append((step, host, down, time.time()))
                print(f"cut host {host}'s link at step {step} for {opts.cut_seconds:.0f}s", flush=True)
            for name, h in hosts.items():
                if name not in walls and all(p.poll() is not None for p in h.procs):
                    walls[name] = time.time() - start
                    if any(p.returncode != 0 for p in h.procs):
                        sys.exit(f"{name} run failed: see {base / name}/host*.log")
    finally:
        for h in hosts.values():
            h.close()
    ref, chaos = final_loss(base / "reference"), final_loss(base / "chaos")
    g_ref = json.loads((base / "reference" / "goodput.json").read_text())["summary"]
    g = json.loads((base / "chaos" / "goodput.json").read_text())["summary"]
    report = summarize(base / "chaos")
    print(format_report(report))
    events = read_events(base / "chaos")
    for step, host, down, up in cut_log:  # the survivors' and the cut group's view of each cut
        lost = next((e for e in events if e["event"] == "recovered" and e["kind"] in ("replica_lost", "step_failed")
                     and down <= e["time"] <= up + 60), None)
        heal = next((e for e in events if e["event"] == "action" and e["kind"] == "heal" and e["time"] >= up), None)
        print(f"cut link at step {step} (host {host}, {up - down:.1f}s down): survivors "
              + (f"went on after {float(lost['duration_s']):.2f}s" if lost else "saw no gap")
              + (f"; the cut group healed to step {heal['step']} {heal['time'] - up:.2f}s after the link came back"
                 f" (its replica {heal['replica']})" if heal else "; no heal seen"))
    print(f"final loss: fault-free {ref:.6f}, chaos {chaos:.6f} (difference {chaos - ref:+.6f})")
    print(f"wall: fault-free {walls['reference']:.1f}s, chaos {walls['chaos']:.1f}s; {len(report['faults'])} "
          f"fault line(s) for {len(faults)} injected -> one injected fault every {g['wall_s'] / max(1, len(faults)):.0f}s")
    print(f"goodput: fault-free {g_ref['goodput']:.1%}, chaos {g['goodput']:.1%}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| fault kind | count | recovery mean | max |\n|---|---|---|---|")
    for kind, r in sorted(report["recovery_by_kind"].items()):
        print(f"| {kind} | {r['count']} | {r['mean_s']:.2f} s | {r['max_s']:.2f} s |")


def last_step(run_dir: Path) -> int:
    from llama3.train.metrics import read_jsonl
    return max((r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r), default=0)


if __name__ == "__main__":
    main()
