import math
import os
import socket
import threading
import time
from dataclasses import replace

import pytest

from llama3.eval.sandbox import SandboxLimits, namespace_prefix, pass_at_k, run_program, run_programs
from llama3.eval.sandbox_child import landlock_abi

FAST = SandboxLimits(timeout_s=2.5, cpu_seconds=1)
# Only the kernel's layers: what contains code that gets past (or never meets) the audit hook.
KERNEL_ONLY = replace(FAST, audit_hook=False)
needs_namespaces = pytest.mark.skipif(not namespace_prefix(), reason="unshare cannot create namespaces here")
needs_landlock = pytest.mark.skipif(landlock_abi() < 4, reason="kernel lacks Landlock ABI 4 (files + TCP)")


def test_passing_and_failing_programs():
    ok, bad = run_programs(["print('hello')\nassert sorted([3, 1]) == [1, 3]", "assert 1 + 1 == 3"], FAST)
    assert ok.passed and ok.stdout.strip() == "hello"
    assert ok.returncode == 0
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError" in bad.stderr


def test_writes_inside_the_work_folder_are_allowed():
    result = run_program("open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())", FAST)
    assert result.passed and result.stdout.strip() == "x"


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


def test_fork_bomb_is_contained():
    before = len(os.listdir("/proc"))
    result = run_program(FORK_BOMB, FAST)
    assert not result.passed
    # the machine did not fill with processes (a bomb that ran would leave thousands)
    assert len(os.listdir("/proc")) < before + 50


@pytest.mark.parametrize("source", ["import ctypes\nctypes.CDLL(None).fork()", "import subprocess\nsubprocess.run(['true'])",
                                    "import os\nos.system('true')", "import multiprocessing"])
def test_other_ways_to_start_processes_are_refused(source):
    result = run_program(source, FAST)
    assert result.status == "failed" and "sandbox" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root is exempt from RLIMIT_NPROC")
def test_fork_bomb_is_contained_by_the_process_limit_alone():
    result = run_program(FORK_BOMB, replace(KERNEL_ONLY, namespaces=False, timeout_s=3.0))
    assert not result.passed


@needs_namespaces
def test_escaped_daemon_dies_with_the_program():
    # a child that leaves the process group is out of reach of killpg: the PID namespace takes it down
    # /proc is the host's, so /proc/self is the parent's host pid, and the daemon is listed as its child there
    source = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(60)
else:
    time.sleep(0.3)
    me = os.readlink('/proc/self')
    print(open(f'/proc/{me}/task/{me}/children').read().split()[0])
"""
    result = run_program(source, KERNEL_ONLY)
    assert result.passed, result.stderr
    daemon = int(result.stdout.split()[0])
    deadline = time.time() + 5
    while time.time() < deadline and _alive(daemon):
        time.sleep(0.05)
    assert not _alive(daemon)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("limits", [FAST, pytest.param(KERNEL_ONLY, marks=needs_landlock)], ids=["all", "kernel"])
def test_writes_outside_the_work_folder_are_blocked(tmp_path, limits):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", limits)
    assert not result.passed and "ermission" in result.stderr
    assert not target.exists()
    removed = tmp_path / "keep.txt"
    removed.write_text("keep")
    result = run_program(f"import os\nos.remove({str(removed)!r})", limits)
    assert not result.passed and removed.exists()


@pytest.mark.parametrize("limits", [FAST, pytest.param(KERNEL_ONLY, marks=needs_landlock)], ids=["all", "kernel"])
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


def test_memory_limit():
    result = run_program("x = bytearray(3 << 30)", replace(FAST, memory_bytes=512 << 20))
    assert not result.passed and "MemoryError" in result.stderr


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(5, 1, 1), (10, 3, 5), (20, 0, 1), (20, 20, 10), (7, 2, 7), (200, 13, 100)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
