"""`llama3 train --report RUN`: goodput, starts, faults and recovery times of a run directory, read back from
events.log (events.py), metrics.jsonl and goodput.json. Works on a finished run and on one still going."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from .events import read_events
from .metrics import read_jsonl


def summarize(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "events.log").exists() and not (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir}: not a training run directory (no events.log or metrics.jsonl)")
    events = read_events(run_dir)
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    final = {}  # the last record of each step is the one on the final trajectory
    for r in steps:
        final[r["step"]] = r
    goodput_file = run_dir / "goodput.json"
    record = json.loads(goodput_file.read_text()) if goodput_file.exists() else {}
    first = record.get("first_start") or min((e["time"] for e in events), default=None)
    last = max([e["time"] for e in events] + [r.get("time", 0) for r in steps], default=first)
    if "summary" in record and any(e["event"] == "end" for e in events[-1:]):
        goodput, productive, wall = (record["summary"][k] for k in ("goodput", "productive_s", "wall_s"))
    else:  # still running (or died): the steps on the final trajectory so far against the time since the start
        productive = sum(r["step_time_s"] for r in final.values())
        wall = (last - first) if first else 0.0
        goodput = productive / wall if wall > 0 else 0.0

    faults, recoveries = [], defaultdict(list)
    open_faults: list[dict] = []
    for e in events:
        if e["event"] == "fault":
            fault = {k: e.get(k) for k in ("kind", "step", "rank", "host", "message")} | {"recovery_s": None}
            faults.append(fault)
            open_faults.append(fault)
        elif e["event"] == "recovered":
            match = next((f for f in open_faults if f["kind"] == e["kind"] and f["step"] == e["fault_step"]), None)
            if match is not None:
                match["recovery_s"] = float(e["duration_s"])
                open_faults.remove(match)
            recoveries[e["kind"]].append(float(e["duration_s"]))
    return {"run_dir": str(run_dir), "goodput": goodput, "productive_s": productive, "wall_s": wall,
            "starts": sum(e["event"] == "start" for e in events),
            "actions": dict(Counter(e.get("kind") for e in events if e["event"] == "action")),
            "resumed": [e.get("resumed") for e in events if e["event"] == "start"],
            "last_step": max(final, default=0), "replayed_steps": sum(bool(r.get("replayed")) for r in steps),
            "finished": any(e["event"] == "end" for e in events[-1:]), "faults": faults,
            "recovery_by_kind": {k: {"count": len(v), "mean_s": sum(v) / len(v), "max_s": max(v)}
                                 for k, v in recoveries.items()}}


def format_report(s: dict) -> str:
    lines = [f"run {s['run_dir']}: {'finished' if s['finished'] else 'not finished'} at step {s['last_step']}",
             f"goodput {s['goodput']:.1%}: {s['productive_s']:.1f}s of productive steps in {s['wall_s']:.1f}s wall "
             f"time; {s['starts']} start(s) (resumed from: {', '.join(s['resumed']) or '-'}), "
             f"{s['replayed_steps']} replayed step(s)",
             f"{len(s['faults'])} fault(s); actions: "
             f"{', '.join(f'{k} x{n}' for k, n in sorted(s['actions'].items())) or 'none'}"]
    for f in s["faults"]:
        recovery = "not recovered" if f["recovery_s"] is None else f"recovered in {f['recovery_s']:.2f}s"
        lines.append(f"  step {f['step']:>6}  {f['kind']:<18} rank {f['rank']} on {f['host']}: {recovery}")
    if s["recovery_by_kind"]:
        lines.append("recovery time by kind (from the fault to the next productive step):")
        for kind, r in sorted(s["recovery_by_kind"].items()):
            lines.append(f"  {kind:<18} {r['count']:>3} x  mean {r['mean_s']:.2f}s  max {r['max_s']:.2f}s")
    return "\n".join(lines)
