"""The run's record of faults: `<run dir>/events.log`, one line per start, fault, action and recovery.

    2026-12-01 12:40:03.512 start attempt=1 world=2 hosts=node0,node1 resumed=step-00000004 | ...
    2026-12-01 12:40:03.530 fault kind=process_died step=5 rank=1 host=node1 at=12:39:57.101 | ...
    2026-12-01 12:40:03.531 action kind=restart attempt=1 resumed=step-00000004 | ...
    2026-12-01 12:40:04.020 recovered kind=process_died step=5 duration_s=6.919 replayed=0 | ...

Each line is a time, an event (start, fault, action, recovered, end, note), `key=value` fields (a value with spaces
is JSON-quoted) and, after `|`, a sentence for people. `report.py` reads it back.

A process that dies outright cannot say so. Every rank therefore keeps a small status file
`<run dir>/ranks/rank-R.json` (host, step, state, time) up to date; a rank stopped by the launcher (SIGTERM) or by
its watchdog marks itself so on the way out. When the job starts again, rank 0 reads the previous attempt's files:
a rank still marked `running` died without a word (SIGKILL, OOM, segfault, a lost host), one marked `failed` raised
an error (when a rank died too, usually the broken collective it left), and the time of its last step is when
the fault struck, so the recovery's duration runs from there to the first productive step after.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the interpreter start and the imports that
    run before the trainer is built. A spare process that waited, imports done, counts from its assignment
    ($LLAMA3_STARTED_AT, epoch seconds)."""
    if os.environ.get("LLAMA3_STARTED_AT"):
        return time.time() - float(os.environ["LLAMA3_STARTED_AT"])
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def format_fields(fields: dict) -> str:
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.3f}"
        value = str(value)
        out.append(f"{key}={json.dumps(value) if (not value or ' ' in value or '|' in value) else value}")
    return " ".join(out)


def parse_line(line: str) -> dict | None:
    """One events.log line -> {"time": epoch seconds, "event": ..., fields..., "message": ...}; None if not ours."""
    head, _, message = line.partition(" | ")
    parts = head.split(" ", 3)
    if len(parts) < 3:
        return None
    try:
        when = datetime.strptime(f"{parts[0]} {parts[1]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None
    record = {"time": when, "event": parts[2], "message": message.strip()}
    for item in shlex.split(parts[3]) if len(parts) > 3 else []:
        key, _, value = item.partition("=")
        record[key] = value
    return record


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.log"
    if not path.exists():
        return []
    return [r for line in path.read_text().splitlines() if (r := parse_line(line)) is not None]


class EventLog:
    """Writes events.log (rank 0, or any rank for what only it can see: its own hang or termination) and this
    rank's status file; remembers a fault until the first productive step after it, to log the recovery."""

    def __init__(self, run_dir: Path, rank: int, echo: bool = True):
        self.path, self.rank, self.echo = run_dir / "events.log", rank, echo
        self.host = socket.gethostname()
        self.status_path = run_dir / "ranks" / f"rank-{rank}.json"
        self.step = 0
        # whether this process writes the run's lines: rank 0; with torchft replica groups, the quorum's first
        # member (the trainer updates it every step), while each group writes its own start, hang and heal
        self.leads = rank == 0
        self.faults = 0  # faults this process has seen (for the measured mean time between faults)
        self.pending: list[dict] = []  # faults awaiting their recovery: kind, step, time, whether we wrote it
        self.status_path.parent.mkdir(parents=True, exist_ok=True)

    # ---- lines -----------------------------------------------------------------------------------------------

    def write(self, event: str, message: str = "", *, everyone: bool = False, **fields) -> None:
        """One line; only rank 0 writes unless `everyone` (then each rank writes its own, tagged with it)."""
        if not self.leads and not everyone:
            return
        line = f"{datetime.now():%Y-%m-%d %H:%M:%S.%f}"[:-3] + f" {event} {format_fields(fields)}"
        if message:
            line += f" | {message}"
        with open(self.path, "a") as f:  # one short write in append mode: ranks' lines do not interleave
            f.write(line + "\n")
        if self.echo and message:
            print(message, file=sys.stderr, flush=True)

    def note(self, message: str, event: str = "note", **fields) -> None:
        """A line from code that does not know this class (checkpoint.py's `log`): a fault, or just a note."""
        if event == "fault":
            self.fault(fields.pop("kind"), message, **fields)
        else:
            self.write(event, message, **fields)

    def fault(self, kind: str, message: str, *, step: int | None = None, at: float | None = None,
              everyone: bool = False, **fields) -> None:
        """A fault was detected; `at` is when it struck (default now). The recovery is logged at the next
        productive step (`productive`)."""
        at = time.time() if at is None else at
        step = self.step if step is None else step
        self.faults += 1
        self.write("fault", message, everyone=everyone, kind=kind, step=step,
                   rank=fields.pop("rank", self.rank), host=fields.pop("host", self.host),
                   at=f"{datetime.fromtimestamp(at):%H:%M:%S.%f}"[:-3], **fields)
        # whoever wrote the fault writes its recovery
        self.pending.append({"kind": kind, "step": step, "at": at, "everyone": everyone or self.leads})

    def action(self, kind: str, message: str, **fields) -> None:
        self.write("action", message, kind=kind, **fields)

    def productive(self, step: int) -> None:
        """A step whose update counts has finished: every fault before it is recovered."""
        for fault in self.pending:
            duration = time.time() - fault["at"]
            self.write("recovered", f"recovered from {fault['kind']} (step {fault['step']}) in {duration:.2f}s",
                       everyone=fault.get("everyone", False), kind=fault["kind"], step=step,
                       fault_step=fault["step"], duration_s=duration)
        self.pending.clear()

    # ---- this rank's status ----------------------------------------------------------------------------------

    def set_status(self, state: str, step: int | None = None, what: str = "", since: float | None = None) -> None:
        """Overwrite this rank's status file (state running / stopped / hang / done, since now or `since`)."""
        if step is not None:
            self.step = step
        status = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "state": state, "step": self.step,
                  "what": what, "time": time.time() if since is None else since}
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.status_path)

    def take_previous_statuses(self, own_only: bool = False) -> list[dict]:
        """The status files the previous start left, removed once read (rank 0, before any rank of this start
        writes its own): a rank of an earlier, larger world must not be taken for one of the last start.
        `own_only`: just this process's file (a torchft replica group restarts on its own)."""
        out = []
        for p in sorted(self.status_path.parent.glob(self.status_path.name if own_only else "rank-*.json")):
            try:
                out.append(json.loads(p.read_text()))
                p.unlink()
            except (OSError, json.JSONDecodeError):
                continue
        return out

    def record_termination(self) -> None:
        """When the launcher stops this rank (SIGTERM after another rank failed), mark the status `stopped`, so
        the next start can tell the rank that failed from the ones that were stopped. The main thread may be stuck
        in a collective, where Python signal handlers do not run; the C-level handler still writes the signal
        number to a wake-up pipe, which a thread of ours reads."""
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: None)  # the watcher thread ends the process

        def watch():
            while True:
                if signal.SIGTERM in os.read(read_fd, 64):
                    self.set_status("stopped", what="SIGTERM from the launcher")
                    os._exit(SIGTERM_EXIT_CODE)

        threading.Thread(target=watch, name="sigterm-watcher", daemon=True).start()


def restart_faults(events: EventLog, previous: list[dict], world_size: int) -> list[dict]:
    """The faults that ended the previous start, from its ranks' status files: ranks that died without a word,
    hung (their watchdog logged that already) or never reported. Logged as faults of this start, pending
    recovery."""
    states = {s["state"] for s in previous}
    if not previous or states <= {"done"}:
        return []
    died = [s for s in previous if s["state"] == "running"]
    for s in died:
        events.fault("process_died", f"rank {s['rank']} on {s['host']} died without a word during "
                     f"{s.get('what') or 'step ' + str(s['step'])} (killed, crashed or its host lost)",
                     step=s["step"], at=s["time"], rank=s["rank"], host=s["host"])
    failed = [s for s in previous if s["state"] == "failed"]
    for s in failed if not died else []:  # with a dead rank, the others' errors are its echo (a broken collective)
        events.fault("error", f"rank {s['rank']} on {s['host']} failed in step {s['step']}: {s['what']}",
                     step=s["step"], at=s["time"], rank=s["rank"], host=s["host"])
    hung = [s for s in previous if s["state"] == "hang"]
    if hung and not died:  # the watchdog already logged the fault itself; recovery runs from the hang's start
        first = min(hung, key=lambda s: s["time"])
        events.pending.append({"kind": "hang", "step": first["step"], "at": first["time"], "everyone": True})
    if not died and not failed and not hung and "stopped" in states:
        first = min(previous, key=lambda s: s["time"])
        if world_size > len(previous):  # torchrun's agents stop the job to let a returning host in
            events.action("scale_up", f"the launcher stopped the job at step {first['step']} to take back a host "
                          f"({len(previous)} -> {world_size} processes)", step=first["step"])
        else:
            events.fault("job_stopped", "every rank was stopped from outside (SIGTERM)", step=first["step"],
                         at=first["time"], rank="all", host=first["host"])
    return died + failed + hung
