"""Run untrusted Python (model-written code plus its tests) in a contained subprocess.

Each program runs in a fresh temporary folder as `python -I sandbox_child.py`, which sets resource limits,
Landlock and an audit hook before the program starts (see sandbox_child.py for the layers). Around it, when the
machine allows, `unshare` gives the process new network and PID namespaces: no network device exists inside, and
every process the program started dies when it ends. A wall-clock timeout kills the whole process group.
A program passes when it exits with status 0 inside its limits.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHILD = Path(__file__).with_name("sandbox_child.py")
_OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file (stdout/stderr included)
    processes: int = 16  # RLIMIT_NPROC, for users other than root
    namespaces: bool = True  # unshare network + PID namespaces when possible
    landlock: bool = True
    audit_hook: bool = True


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit or killed by a limit) or "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command line that works on this machine, or () when none does (no util-linux, no
    privilege for namespaces, or a container that forbids them)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    base = (unshare, "--net", "--pid", "--fork", "--kill-child")
    candidates = [base] if os.geteuid() == 0 else []
    candidates.append((unshare, "--user", "--map-root-user", *base[1:]))  # unprivileged user namespaces
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python source in a fresh folder under the limits and return what happened."""
    with tempfile.TemporaryDirectory(prefix="llama3-sandbox-") as tmp:
        workdir, logs = Path(tmp, "work"), Path(tmp, "logs")
        workdir.mkdir()
        logs.mkdir()
        program = workdir / "program.py"
        program.write_text(source)
        child_limits = {
            "cpu_seconds": max(1, math.ceil(limits.cpu_seconds)),
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "processes": limits.processes,
            "landlock": limits.landlock,
            "audit_hook": limits.audit_hook,
        }
        prefix = namespace_prefix() if limits.namespaces else ()
        command = [*prefix, sys.executable, "-I", str(_CHILD), str(program), str(workdir), json.dumps(child_limits)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)  # its own process group: killed as one
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
            if timed_out:
                returncode = proc.wait()
        seconds = time.perf_counter() - start
        stdout = (logs / "stdout").read_bytes()[-_OUTPUT_TAIL * 4 :].decode("utf-8", "replace")[-_OUTPUT_TAIL:]
        stderr = (logs / "stderr").read_bytes()[-_OUTPUT_TAIL * 4 :].decode("utf-8", "replace")[-_OUTPUT_TAIL:]
    # SIGXCPU from the CPU limit is a timeout too, as far as the program is concerned
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        status = "timeout"
    else:
        status = "passed" if returncode == 0 else "failed"
    return SandboxResult(status, None if timed_out else returncode, stdout, stderr, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (descendants that did not start a session of their own; the PID
    namespace, when present, takes the rest)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(sources: list[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None) -> list[SandboxResult]:
    """run_program over many sources, a few at a time (each is one process; they mostly wait on tests)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail
