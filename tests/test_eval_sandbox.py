import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llama3.eval.sandbox import (SandboxLimits, memory_limit_kind, pass_at_k, python_files, run_program,
                                 run_programs)
from llama3.eval.sandbox_child import landlock_abi

FAST = SandboxLimits(timeout_s=2.5, cpu_seconds=1)
# Only the namespaces and resource limits: what contains code that gets past (or never meets) the audit hook.
KERNEL_ONLY = replace(FAST, audit_hook=False, landlock=False)
# What the user gets by opting out of isolation: the tests' proof that their probes do find what isolation hides.
UNISOLATED = replace(FAST, isolate=False, audit_hook=False, landlock=False)
needs_landlock = pytest.mark.skipif(landlock_abi() < 4, reason="kernel lacks Landlock ABI 4 (files + TCP)")
LAYERS = pytest.mark.parametrize("limits", [FAST, KERNEL_ONLY], ids=["all", "kernel"])


def test_passing_and_failing_programs():
    ok, bad = run_programs(["print('hello')\nassert sorted([3, 1]) == [1, 3]", "assert 1 + 1 == 3"], FAST)
    assert ok.passed and ok.stdout.strip() == "hello"
    assert ok.returncode == 0
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError" in bad.stderr


def test_the_standard_library_and_the_work_folder_are_usable():
    source = """
import collections, decimal, fractions, hashlib, heapq, json, math, random, re, sqlite3, tempfile, zlib
open('scratch.txt', 'w').write('x')
with tempfile.NamedTemporaryFile('w', delete=False) as f:
    f.write('y')
print(open('scratch.txt').read(), hashlib.sha256(b'').hexdigest()[:8])
"""
    result = run_program(source, FAST)
    assert result.passed, result.stderr
    assert result.stdout.split()[:2] == ["x", "e3b0c442"]


def test_infinite_loop_is_stopped():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", FAST)
    assert result.status == "timeout"
    assert time.perf_counter() - start < FAST.timeout_s + 3


def test_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_program("import time\ntime.sleep(60)\n", replace(FAST, timeout_s=1.0))
    assert result.status == "timeout" and result.seconds < 4


FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except Exception:
        pass
"""


@LAYERS
def test_fork_bomb_is_contained(limits):
    before = len(os.listdir("/proc"))
    result = run_program(FORK_BOMB, limits)
    assert not result.passed
    # the machine did not fill with processes (a bomb that ran would leave thousands)
    assert len(os.listdir("/proc")) < before + 50


COUNT_FORKS = """
import os, time
children = 0
for _ in range(60):
    try:
        if os.fork() == 0:
            time.sleep(2)
            os._exit(0)
        children += 1
    except OSError:
        break
print(children)
"""


def test_process_count_is_limited_for_root_too():
    # without the audit hook; as root the kernel exempts user id 0 from RLIMIT_NPROC, so this holds only because
    # the program runs as a user id of its own
    result = run_program(COUNT_FORKS, replace(KERNEL_ONLY, processes=8, timeout_s=5))
    assert result.passed, result.stderr
    assert int(result.stdout) < 8  # PID 1 of the namespace and the program count too


@pytest.mark.parametrize("source", ["import ctypes\nctypes.CDLL(None).fork()", "import subprocess\nsubprocess.run(['true'])",
                                    "import os\nos.system('true')", "import multiprocessing"])
def test_other_ways_to_start_processes_are_refused(source):
    result = run_program(source, FAST)
    assert result.status == "failed" and "sandbox" in result.stderr


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_escaped_daemon_dies_with_the_program():
    # a child that leaves the process group is out of reach of killpg: the PID namespace takes it down. It
    # execs Python with a marker in its command line, so the host can find it.
    marker = f"llama3-daemon-{os.getpid()}-{time.time_ns()}"
    source = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
time.sleep(1.5)
"""
    seen = []
    runner = threading.Thread(target=lambda: seen.append(run_program(source, replace(KERNEL_ONLY, timeout_s=5))))
    runner.start()
    deadline = time.time() + 5
    alive_during_run = False
    while runner.is_alive() and time.time() < deadline:
        alive_during_run = alive_during_run or bool(_host_processes_with(marker))
        time.sleep(0.05)
    runner.join()
    assert seen[0].passed, seen[0].stderr
    assert alive_during_run  # the daemon did start
    deadline = time.time() + 5
    while time.time() < deadline and _host_processes_with(marker):
        time.sleep(0.05)
    assert not _host_processes_with(marker)


PROBE = """
import json, os
found = {}
def probe(name, action):
    try:
        found[name] = action()
    except Exception as e:
        pass
for path in PATHS:
    probe(path, lambda: open(path).read())
for folder in FOLDERS:
    probe(folder, lambda: os.listdir(folder))
print(json.dumps(found))
"""


def _probe(limits, paths=(), folders=()) -> dict:
    source = f"PATHS, FOLDERS = {list(paths)!r}, {list(folders)!r}\n" + PROBE
    result = run_program(source, limits)
    assert result.passed, result.stderr
    return json.loads(result.stdout)


def _leads_to_python(path: str) -> bool:
    return any((p + os.sep).startswith(path + os.sep) for p in python_files()[0])


@LAYERS
def test_files_outside_the_work_folder_cannot_be_read(tmp_path, limits):
    secret = tmp_path / "secret.txt"
    secret.write_text("the evaluator's secret")
    paths = [str(secret), "/etc/shadow", "/etc/passwd", "/etc/hostname"]
    folders = [str(tmp_path), str(Path.home()), str(Path.home() / ".ssh"), "/tmp", os.getcwd()]
    found = _probe(limits, paths, folders)
    # a folder on the way to the interpreter (Python installed under the home folder) lists only that way
    for folder, entries in found.items():
        assert all(_leads_to_python(os.path.join(folder, e)) for e in entries), found
    assert not set(found) & set(paths)
    # proof that the probe finds what isolation hides: opted out, the program reads the secret
    assert _probe(UNISOLATED, [str(secret)], [str(tmp_path)]) == {str(secret): "the evaluator's secret",
                                                                  str(tmp_path): ["secret.txt"]}


@LAYERS
def test_the_evaluator_environment_and_processes_are_invisible(limits):
    marker = f"llama3-token-{time.time_ns()}"
    evaluator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                 env={**os.environ, "HF_TOKEN": marker})
    try:
        source = f"""
import os
seen = [k for k in os.environ if k not in ('PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONHASHSEED', 'PYTHONDONTWRITEBYTECODE')]
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [{evaluator.pid}, {os.getpid()}]:
    for name in ('environ', 'cmdline'):
        try:
            if {marker!r}.encode() in open(f'/proc/{{pid}}/{{name}}', 'rb').read():
                seen.append((pid, name))
        except OSError:
            pass
print(seen, sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
"""
        for lim, hidden in ((limits, True), (UNISOLATED, False)):
            result = run_program(source, lim)
            assert result.passed, result.stderr
            seen, pids = result.stdout.split("] [")
            assert (seen == "[") is hidden, result.stdout
            if hidden:  # its own namespace: PID 1 and the program
                assert pids.rstrip("]\n").split(", ") == ["1", "2"]
    finally:
        evaluator.kill()
        evaluator.wait()


def test_disabling_the_audit_hook_leaves_the_kernel_layers(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the evaluator's secret")
    target = tmp_path / "escaped.txt"
    # the hook's tables are module globals of sandbox_child: reachable by walking frames, and emptied
    source = f"""
import os, socket, sys
frame = sys._getframe()
while frame is not None:
    g = frame.f_globals
    if '_ALWAYS_BLOCKED' in g:
        g['_ALWAYS_BLOCKED'] = ()
        g['_BLOCKED_IMPORTS'].clear()
        g['_PATH_EVENTS'].clear()
        g['_WRITE_FLAGS'] = 0
    frame = frame.f_back
import ctypes  # refused while the hook held
print('hook disabled')
escapes = []
for name, action in [('read', lambda: open({str(secret)!r}).read()), ('write', lambda: open({str(target)!r}, 'w').write('x')),
                     ('connect', lambda: socket.create_connection(('127.0.0.1', 22), timeout=1)),
                     ('shadow', lambda: open('/etc/shadow').read())]:
    try:
        action()
        escapes.append(name)
    except Exception:
        pass
forks = 0
for _ in range(40):
    try:
        if os.fork() == 0:
            import time; time.sleep(2); os._exit(0)
        forks += 1
    except OSError:
        break
print(escapes, forks)
"""
    result = run_program(source, replace(FAST, timeout_s=5))
    assert result.passed, result.stderr
    disabled, outcome = result.stdout.strip().splitlines()
    assert disabled == "hook disabled"
    assert outcome == f"[] {FAST.processes - 2}"  # 16 processes, PID 1 and the program among them
    assert not target.exists()


@LAYERS
def test_writes_outside_the_work_folder_are_blocked(tmp_path, limits):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", limits)
    assert not result.passed
    assert not target.exists()
    removed = tmp_path / "keep.txt"
    removed.write_text("keep")
    result = run_program(f"import os\nos.remove({str(removed)!r})", limits)
    assert not result.passed and removed.exists()
    for folder in ("/", "/etc", "/dev", os.path.dirname(sys.executable)):  # the view itself is read-only
        result = run_program(f"open({os.path.join(folder, 'x')!r}, 'w')", limits)
        assert not result.passed and ("Read-only" in result.stderr or "ermission" in result.stderr), result.stderr


@pytest.mark.parametrize("limits", [FAST, KERNEL_ONLY, pytest.param(replace(UNISOLATED, landlock=True), marks=needs_landlock)],
                         ids=["all", "kernel", "landlock"])
def test_network_is_blocked(limits):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections, finished = [], threading.Event()

    def accept():
        while not finished.is_set():
            try:
                connections.append(server.accept())
            except (socket.timeout, OSError):
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    source = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')"
    result = run_program(source, limits)
    time.sleep(0.3)  # a connection that got through would be accepted by now
    finished.set()
    thread.join()
    server.close()
    assert not result.passed
    assert connections == []


def test_the_program_cannot_kill_the_evaluator():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        source = f"""
import os, signal
for pid in (os.getppid(), {bystander.pid}, {os.getpid()}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
os.kill(-1, signal.SIGKILL)  # everything it may signal, itself included
"""
        result = run_program(source, KERNEL_ONLY)
        assert not result.passed
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_refuses_to_run_where_it_cannot_isolate():
    # root of a user namespace that maps only itself (as in a rootless container) has no user id to give the
    # program: nothing runs, unless isolation is explicitly turned off
    script = """
from llama3.eval.sandbox import SandboxLimits, SandboxUnavailable, run_program
try:
    run_program("print('ran')")
    print('ran isolated')
except SandboxUnavailable as e:
    print('refused:', e)
print(run_program("print('ran')", SandboxLimits(isolate=False)).stdout.strip())
"""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here")
    out = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: cannot isolate model-written code"), out.stdout + out.stderr
    assert "--allow-unisolated-code" in lines[0]
    assert lines[1] == "ran"


def test_memory_limit():
    result = run_program("x = bytearray(3 << 30)", replace(FAST, memory_bytes=512 << 20))
    assert not result.passed and "MemoryError" in result.stderr


MEMORY_HOGS = """
import os, time
def hog():
    held = []
    try:
        while True:
            held.append(bytearray(8 << 20))  # zero-filled: the pages are really used
    except MemoryError:
        print(len(held) * 8, flush=True)  # MiB it got
    time.sleep(1)  # holding it while the others take theirs
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        hog()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
hog()
x = bytearray(4 << 30)
"""


def test_memory_of_all_processes_together_is_limited():
    # without the audit hook (which refuses fork); six children and the program each take all they can get
    limit = 512 << 20
    hogs, after = run_programs([MEMORY_HOGS, "print('fine')"], replace(KERNEL_ONLY, memory_bytes=limit, timeout_s=20,
                                                                       cpu_seconds=10), workers=1)
    assert not hogs.passed and after.passed and after.stdout == "fine\n"  # one sample failed, the evaluator goes on
    if memory_limit_kind() == "cgroup":  # killed as a group when they went over memory.max
        assert "went over the memory limit (512 MiB)" in hogs.stderr, hogs.stderr
    else:  # each process got at most its share of the address space
        got = [int(line) for line in hogs.stdout.split()]
        assert len(got) == 7 and max(got) <= (limit >> 20) // KERNEL_ONLY.processes and "MemoryError" in hogs.stderr
        assert sum(got) <= limit >> 20


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(5, 1, 1), (10, 3, 5), (20, 0, 1), (20, 20, 10), (7, 2, 7), (200, 13, 100)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_the_work_folder_is_bounded_and_off_the_evaluators_disk():
    source = """
written = 0
try:
    for i in range(40):
        with open(f'fill{i}', 'wb') as f:
            f.write(b'x' * (8 << 20))
        written += 8
except OSError as e:
    print(written, e.strerror)
"""
    result = run_program(source, replace(KERNEL_ONLY, disk_bytes=32 << 20, timeout_s=10))
    assert result.passed, result.stderr
    written, reason = result.stdout.split(maxsplit=1)
    assert int(written) < 32 and "No space left" in reason
