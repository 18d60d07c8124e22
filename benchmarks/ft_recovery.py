"""Killed-rank recovery with torchft replica groups (llama3/train/ft.py) against torchrun's restart.

    python benchmarks/ft_recovery.py --replicas 3 --preset debug --steps 60 --kill-at 15

Starts a lighthouse and N replica groups (one process each, gloo on CPU), SIGKILLs one replica after step
--kill-at, restarts it a moment later (as its launcher would) and reports:
  * the survivors' time with no productive step: from the kill to their next committed step;
  * that the survivors never restarted (one start record each, the same pid to the end);
  * the returning replica's cold start, itemised (imports, model build, manager + first quorum/heal), and the
    step it healed to from a live peer (no checkpoint read).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch
    from llama3.train.ft import lighthouse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-at", type=int, default=15)
    ap.add_argument("--restart-after", type=float, default=2.0, help="seconds before the killed replica returns")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--log-dir", default="/tmp", help="each replica's stderr goes to replica<i>.err here")
    opts = ap.parse_args()
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}; machine shared with other jobs")

    server = lighthouse("[::]:0", min_replicas=1, join_timeout_ms=500, heartbeat_timeout_ms=1000)
    overrides = [f"model.preset={opts.preset}", f"data.seq_len={opts.seq_len}",
                 f"training.batch_size={opts.batch_size}", f"training.steps={opts.steps}", "optim.warmup_steps=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RUST_LOG="error")
    records: list[dict] = []
    lock = threading.Lock()

    def launch(i: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "llama3.train.ft", "replica", "--replica", str(i), "--replicas",
                              str(opts.replicas), "--lighthouse", server.address(), *overrides], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=open(f"{opts.log_dir}/replica{i}.err", "a"), text=True)

        def read():
            for line in p.stdout:
                if line.startswith("{"):
                    with lock:
                        records.append(json.loads(line) | {"pid": p.pid})
        threading.Thread(target=read, daemon=True).start()
        return p

    procs = [launch(i) for i in range(opts.replicas)]
    victim = opts.replicas - 1
    while not any(r["event"] == "step" and r["replica"] == victim and r["committed"] and r["step"] >= opts.kill_at
                  for r in list(records)):
        time.sleep(0.01)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[victim].wait()
    time.sleep(opts.restart_after)
    returned_at = time.time()
    procs[victim] = launch(victim)
    for p in procs:
        p.wait(timeout=1800)
    time.sleep(0.2)
    server.shutdown()

    steps = [r for r in records if r["event"] == "step"]
    Path(opts.log_dir, "ft_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{opts.replicas} replicas, {opts.preset}, batch {opts.batch_size} x {opts.seq_len}; replica {victim} "
          f"SIGKILLed after step {opts.kill_at}, back {opts.restart_after:.1f}s later")
    for i in range(opts.replicas - 1):
        mine = [r for r in steps if r["replica"] == i]
        before = max(r["time"] for r in mine if r["committed"] and r["time"] <= killed_at)
        after = min((r for r in mine if r["committed"] and r["time"] > killed_at), key=lambda r: r["time"])
        starts = [r for r in records if r["event"] == "start" and r["replica"] == i]
        typical = sorted(r["step_time_s"] for r in mine)[len(mine) // 2]
        print(f"survivor {i}: kill -> next committed step (step {after['step']}, {after['replicas']} replicas) "
              f"{after['time'] - killed_at:.2f}s; gap between committed steps {after['time'] - before:.2f}s "
              f"(median step {typical:.2f}s); failed steps {sum(not r['committed'] for r in mine)}; "
              f"starts {len(starts)} (pids {sorted({r['pid'] for r in starts})})")
    back = [r for r in records if r["replica"] == victim and r["time"] > returned_at]
    start = next(r for r in back if r["event"] == "start")
    first = next((r for r in back if r["event"] == "step" and r["committed"]), None)
    if first is None:
        sys.exit("the returning replica committed no step before the run ended: use more --steps")
    healed = "healed from a live peer's memory, no checkpoint read" if first.get("healed_from") is not None \
        else "not healed"
    print(f"returning replica: imports {start['imports_s']:.2f}s, model build {start['build_s']:.2f}s, manager "
          f"{start['manager_s']:.2f}s, join + heal {first['time'] - start['time']:.2f}s -> committed step "
          f"{first['step']} ({healed}) {first['time'] - returned_at:.2f}s after its launch")
    later = [r for r in back if r["event"] == "step" and r["time"] > first["time"]]
    if later:
        print(f"  then in quorums of {max(r['replicas'] for r in later)} replicas")
    ends = [r for r in records if r["event"] == "end"]
    print(f"finished: {sorted((r['replica'], r['step']) for r in ends)}")


if __name__ == "__main__":
    main()
