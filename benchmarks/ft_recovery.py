"""Killed replica group recovery under `llama3 train ft.replicas=N` (torchft replica groups, llama3/train/ft.py).

    python benchmarks/ft_recovery.py --replicas 2 --steps 300 --kill-at 50

Runs the training twice, alternating: with a spare process (`ft.spares=1`, the default: imports done, it takes
the dead group's place) and without (`ft.spares=0`: the launcher starts a fresh process). In each, the last group's
process is SIGKILLed from outside once it passed step --kill-at (its pid from ranks/rank-R.json), and the report
comes from events.log:
  * the survivors' time with no productive step: from their last committed step before the kill to the next one;
  * that the survivors never restarted (one start line each, one pid);
  * the returning group: kill -> its first productive step (its start-up, the heal from a live peer).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(opts, run_dir: Path, spares: int) -> dict:
    from llama3.train.events import read_events
    cmd = [sys.executable, "-m", "llama3.train", f"model.preset={opts.preset}", "data.dataset=synthetic",
           f"data.seq_len={opts.seq_len}", f"training.batch_size={opts.batch_size}", f"training.steps={opts.steps}",
           "optim.warmup_steps=5", "eval.every=-1", "metrics.peak_tflops=1", "metrics.tensorboard=false",
           "metrics.plot=false", "checkpoint.export=false", f"ft.replicas={opts.replicas}", f"ft.spares={spares}",
           f"run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = opts.replicas - 1
    status = run_dir / "ranks" / f"rank-{victim}.json"
    while True:
        try:
            s = json.loads(status.read_text())
            if s["step"] >= opts.kill_at and s["state"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            sys.exit(f"the run ended before step {opts.kill_at}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    os.kill(s["pid"], signal.SIGKILL)
    killed_at = time.time()
    _, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{err[-5000:]}")
    events = read_events(run_dir)
    starts = {r: [e["pid"] for e in events if e["event"] == "start" and e.get("replica") == str(r)]
              for r in range(opts.replicas)}
    survivors = [e for e in events if e["event"] == "recovered" and e["kind"] in ("replica_lost", "step_failed")]
    back = [e for e in events if e["event"] == "recovered" and e["kind"] == "process_died"]
    heal = [e for e in events if e["event"] == "action" and e.get("kind") == "heal" and e["time"] > killed_at]
    return {"survivor_s": float(survivors[0]["duration_s"]) if survivors else None,
            "returning_s": float(back[0]["duration_s"]) if back else None,
            "heal_s": float(heal[0]["duration_s"]) if heal else None, "heal_step": heal[0]["step"] if heal else None,
            "survivor_starts": {r: len(p) for r, p in starts.items() if r != victim},
            "returning_start": next((e for e in events if e["event"] == "start" and e["time"] > killed_at), {})}


def main() -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--preset", default="debug-tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kill-at", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs (spare, no spare)")
    opts = ap.parse_args()
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; machine shared with other jobs")
    base = Path(tempfile.mkdtemp(prefix="ft-recovery-"))
    results = {1: [], 0: []}
    for i in range(opts.rounds):
        for spares in (1, 0):
            r = run(opts, base / f"run{i}-spares{spares}", spares)
            results[spares].append(r)
            s = r["returning_start"]
            print(f"spares={spares}: survivors' kill -> next committed step {r['survivor_s']:.2f}s, survivor starts "
                  f"{r['survivor_starts']}; returning group: kill -> first productive step {r['returning_s']:.2f}s "
                  f"(start-up: imports {s.get('imports_s')}s, model {s.get('model_s')}s; heal from a live peer "
                  f"{r['heal_s']}s to step {r['heal_step']})", flush=True)
    for key in ("survivor_s", "returning_s"):
        a, b = (sum(r[key] for r in results[n]) / len(results[n]) for n in (1, 0))
        print(f"{key}: with a spare {a:.2f}s, without {b:.2f}s -> ratio {b / a:.1f}x")


if __name__ == "__main__":
    main()
