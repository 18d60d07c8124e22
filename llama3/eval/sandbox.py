"""Run untrusted Python (model-written code plus its tests) in a contained subprocess.

Each program runs in a fresh temporary folder as `python -I sandbox_child.py`, which moves into new namespaces
and a new root holding only that folder and, read-only, the Python it needs, drops its privileges, and sets
resource limits, Landlock and an audit hook before the program starts (see sandbox_child.py for the layers). Its
environment holds nothing of the evaluator's. A wall-clock timeout kills the whole process group. A program
passes when it exits with status 0 inside its limits. Where the machine cannot create the namespaces (no root
and no unprivileged user namespaces), nothing runs: SandboxUnavailable says why, and only an explicit
`isolate=False` runs code without them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
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
    # all the program's processes together: a cgroup's memory.max where the machine allows one (memory_limit_kind),
    # otherwise an address-space limit of memory_bytes / processes for each process
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20  # largest file (stdout/stderr included)
    disk_bytes: int = 64 << 20  # the isolated work folder's size (a tmpfs)
    processes: int = 8  # RLIMIT_NPROC (an isolated program never runs as root, whom the kernel exempts)
    # False runs the program without namespaces, where it can read every file the evaluator can: only for
    # machines that cannot create them, and only when the user asks
    isolate: bool = True
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


class SandboxUnavailable(ValueError):
    """This machine cannot isolate programs and the caller did not opt out of isolation (reported as the command
    line reports other unusable options)."""


_UNAVAILABLE = ("cannot isolate model-written code on this machine ({}); the sandbox needs real root or unprivileged "
                "user namespaces. Refusing to run it: isolate=False (llama3 eval --allow-unisolated-code) runs it "
                "without them, where it can read every file this process can")


@functools.cache
def python_files() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What an isolated program may read: the interpreter, its standard library and the shared libraries those
    load (as ldd resolves them; without ldd, the system's library folders); and the folders inside the standard
    library to hide (installed packages: a program under test needs only the standard library)."""
    paths = sysconfig.get_paths()
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(paths["platstdlib"], "lib-dynload")
    binaries = [sys.executable] + [os.path.join(dynload, f) for f in sorted(os.listdir(dynload)) if f.endswith(".so")]
    ldd = shutil.which("ldd")
    if ldd:
        listing = subprocess.run([ldd, *binaries], capture_output=True, text=True, timeout=60).stdout
        libraries = sorted(set(re.findall(r"(/\S+) \(0x", listing)))
    else:
        libraries = [d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d)]
    read_only = [sys.executable, *sorted(stdlib), *libraries] + ["/etc/ld.so.cache"] * os.path.exists("/etc/ld.so.cache")
    hidden = [p for p in {paths["purelib"], paths["platlib"]} if any(p.startswith(s + os.sep) for s in stdlib)]
    return tuple(read_only), tuple(hidden)


@functools.cache
def memory_cgroup_parent() -> str | None:
    """Where each run gets a cgroup (v2) of its own, whose memory.max holds all its processes together: the
    nearest cgroup at or above this process's that hands the memory controller to its children and lets this user
    create one (the root cgroup; a systemd slice, whose units are siblings). None where there is none (cgroup v1
    holds the memory controller, a container's cgroup namespace shows no such cgroup, or no permission)."""
    try:
        with open("/proc/self/mountinfo") as f:
            mount = next(line.split()[4] for line in f if line.partition(" - ")[2].startswith("cgroup2 "))
        with open("/proc/self/cgroup") as f:
            own = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    folder = os.path.normpath(os.path.join(mount, own.lstrip("/")))
    while folder.startswith(mount):
        try:
            with open(os.path.join(folder, "cgroup.subtree_control")) as f:
                if "memory" in f.read().split() and os.access(folder, os.W_OK):
                    return folder
        except OSError:
            pass
        if folder == mount:
            return None
        folder = os.path.dirname(folder)
    return None


def memory_limit_kind() -> str:
    """How SandboxLimits.memory_bytes is enforced on this machine: "cgroup" (memory.max over every process of a
    run) or "rlimit" (address space of memory_bytes / processes for each process, so that together they stay
    within memory_bytes)."""
    return "cgroup" if memory_cgroup_parent() else "rlimit"


def _make_cgroup(limits: SandboxLimits) -> str | None:
    parent = memory_cgroup_parent()
    if parent is None:
        return None
    group = os.path.join(parent, f"llama3-sandbox-{secrets.token_hex(8)}")
    try:
        os.mkdir(group)
    except OSError:
        return None
    settings = {"memory.max": limits.memory_bytes, "memory.swap.max": 0, "memory.oom.group": 1}
    try:
        for name, value in settings.items():
            if name == "memory.max" or os.path.exists(os.path.join(group, name)):  # swap accounting may be off
                with open(os.path.join(group, name), "w") as f:
                    f.write(str(value))
    except OSError:
        _remove_cgroup(group)
        return None
    return group


def _remove_cgroup(group: str) -> bool:
    """Kill whatever is left in the run's cgroup and remove it. True when the memory limit killed something."""
    def read(name: str) -> str:
        try:
            with open(os.path.join(group, name)) as f:
                return f.read()
        except OSError:
            return ""

    oom_kills = re.search(r"^oom_kill (\d+)", read("memory.events"), re.MULTILINE)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(group)
            break
        except OSError:
            if time.monotonic() > deadline:
                break  # a process stuck in the kernel: the empty cgroup stays, without harm
            if os.path.exists(os.path.join(group, "cgroup.kill")):
                with open(os.path.join(group, "cgroup.kill"), "w") as f:
                    f.write("1")
            else:
                for pid in read("cgroup.procs").split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
            time.sleep(0.01)
    return bool(oom_kills and int(oom_kills.group(1)))


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python source in a fresh folder under the limits and return what happened."""
    with tempfile.TemporaryDirectory(prefix="llama3-sandbox-") as tmp:
        workdir, logs, root, status = Path(tmp, "work"), Path(tmp, "logs"), Path(tmp, "root"), Path(tmp, "status")
        for folder in (workdir, logs, root):
            folder.mkdir()
        program = workdir / "program.py"
        program.write_text(source)
        read_only, hidden = python_files() if limits.isolate else ((), ())
        uid = 2_000_000_000 + secrets.randbelow(100_000_000)  # root runs each program as a user id of its own
        cgroup = _make_cgroup(limits)
        child_limits = {
            "cpu_seconds": max(1, math.ceil(limits.cpu_seconds)),
            # per process: all of it under a cgroup (a clean MemoryError, not a kill, for one large allocation)
            "memory_bytes": limits.memory_bytes if cgroup else limits.memory_bytes // limits.processes,
            "cgroup": cgroup,
            "file_bytes": limits.file_bytes,
            "processes": limits.processes,
            "isolate": limits.isolate,
            "landlock": limits.landlock,
            "audit_hook": limits.audit_hook,
            "uid": uid,
            "disk_bytes": limits.disk_bytes,
            "read_only": read_only,
            "hidden": hidden,
        }
        command = [sys.executable, "-I", str(_CHILD), str(program), str(workdir), str(root), str(status),
                   json.dumps(child_limits)]
        home = "/sandbox" if limits.isolate else str(workdir)  # sandbox_child.SANDBOX
        # nothing of the evaluator's environment (tokens, keys, paths) is passed on
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        out_of_memory = False
        try:
            with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
                proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, start_new_session=True)  # its own process group: killed as one
                try:
                    returncode = proc.wait(timeout=limits.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
                if timed_out:
                    returncode = proc.wait()
        finally:
            if cgroup:
                out_of_memory = _remove_cgroup(cgroup)
        seconds = time.perf_counter() - start
        if status.exists():
            raise SandboxUnavailable(_UNAVAILABLE.format(status.read_text()))
        stdout = (logs / "stdout").read_bytes()[-_OUTPUT_TAIL * 4 :].decode("utf-8", "replace")[-_OUTPUT_TAIL:]
        stderr = (logs / "stderr").read_bytes()[-_OUTPUT_TAIL * 4 :].decode("utf-8", "replace")[-_OUTPUT_TAIL:]
    if out_of_memory:
        stderr += f"\nsandbox: killed: its processes together went over the memory limit ({limits.memory_bytes >> 20} MiB)"
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
