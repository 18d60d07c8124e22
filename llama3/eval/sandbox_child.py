"""Runs inside the sandbox's subprocess: lock the process down, then run the untrusted program.

Started as `python -I sandbox_child.py PROGRAM WORKDIR LIMITS_JSON` (by path, so it imports nothing from the
package). The layers, outermost first:
  1. resource limits: CPU seconds, address space, file size, open files, no core dumps, process count;
  2. Landlock (Linux >= 5.13), when the kernel has it: files can be written only under WORKDIR, and from
     ABI 4 on no TCP connect or bind at all; it binds this process and every child and cannot be undone;
  3. an audit hook (PEP 578), which cannot be removed once added: no fork/exec/subprocess, no sockets, no
     ctypes calls, no writes, deletes or renames outside WORKDIR, no signals to other processes.
The parent adds the outermost ring when `unshare` works: fresh network and PID namespaces, so there is no
network device at all and every process the program made dies with it.
"""

import json
import os
import resource
import sys


def set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # root is exempt from RLIMIT_NPROC; there the audit hook and the PID namespace stop fork bombs
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)


# Landlock constants (include/uapi/linux/landlock.h)
_FS_WRITE_RIGHTS = {
    1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12),
    2: 1 << 13,  # REFER: link/rename across folders
    3: 1 << 14,  # TRUNCATE
    5: 1 << 15,  # IOCTL_DEV
}
_NET_TCP_BIND_CONNECT = (1 << 0) | (1 << 1)  # ABI 4
_SYSCALL = {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or this is not Linux on x86_64/aarch64, whose
    syscall numbers are the ones above)."""
    import ctypes
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    version = _libc().syscall(_SYSCALL["landlock_create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, version)


def landlock(workdir: str) -> int:
    """Allow file writes only below workdir and (ABI >= 4) no TCP at all. Returns the ABI used, 0 if none."""
    import ctypes

    abi = landlock_abi()
    if abi < 1:
        return 0
    libc = _libc()
    fs_rights = 0
    for version, rights in _FS_WRITE_RIGHTS.items():
        if abi >= version:
            fs_rights |= rights

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(fs_rights, _NET_TCP_BIND_CONNECT if abi >= 4 else 0)
    size = ctypes.sizeof(attr) if abi >= 4 else ctypes.sizeof(ctypes.c_uint64)
    ruleset = libc.syscall(_SYSCALL["landlock_create_ruleset"], ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    for path in (workdir, "/dev/null"):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        # a rule on a file may only grant file rights: WRITE_FILE, TRUNCATE, IOCTL_DEV
        rights = fs_rights if os.path.isdir(path) else fs_rights & ((1 << 1) | (1 << 14) | (1 << 15))
        rule = PathBeneath(rights, fd)
        libc.syscall(_SYSCALL["landlock_add_rule"], ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    PR_SET_NO_NEW_PRIVS = 38
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(_SYSCALL["landlock_restrict_self"], ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


_ALWAYS_BLOCKED = (
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill", "os.killpg",
    "os.setuid", "os.setgid", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.call_function", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
    "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request", "webbrowser.open", "signal.pthread_kill",
)
# Events that write to a path, and which arguments are the written paths; each must lie inside the work folder.
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,),
    "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "shutil.rmtree": (0,),
    "shutil.chown": (0,), "os.link": (1,), "os.symlink": (1,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
    "shutil.copymode": (1,), "shutil.copystat": (1,), "os.rename": (0, 1), "shutil.move": (0, 1),
}
# Modules that only serve to start processes or call C directly. Refused as ImportError, so that libraries which
# import them optionally (numpy tries ctypes) still load.
_BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install_audit_hook(workdir: str) -> None:
    root = os.path.realpath(workdir) + os.sep

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd: it was opened under the same rules
        path = os.fsdecode(path)
        return os.path.realpath(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event in _ALWAYS_BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in _BLOCKED_IMPORTS:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the work folder is not allowed")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the work folder is not allowed")

    for name in [m for m in sys.modules if m.partition(".")[0] in _BLOCKED_IMPORTS]:
        del sys.modules[name]  # Landlock's setup loaded ctypes: make the program import it afresh, and fail
    sys.addaudithook(hook)


def reap_as_init() -> None:
    """In a new PID namespace this process is PID 1, which the kernel shields from signals it does not handle,
    SIGXCPU from the CPU limit included. So PID 1 forks: the child runs the program, PID 1 only reaps and
    exits with the child's status."""
    child = os.fork()
    if child == 0:
        return
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main() -> None:
    program, workdir, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if os.getpid() == 1:
        reap_as_init()
    os.chdir(workdir)
    set_limits(limits)
    if limits.get("landlock", True):
        landlock(workdir)
    import runpy  # before the hook: the program's own imports may read anywhere, but runpy needs nothing more

    if limits.get("audit_hook", True):
        install_audit_hook(workdir)
    sys.argv = [program]
    sys.path.insert(0, workdir)
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
