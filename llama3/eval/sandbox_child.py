"""Runs inside the sandbox's subprocess: lock the process down, then run the untrusted program.

Started as `python -I sandbox_child.py PROGRAM WORKDIR ROOTDIR STATUSFILE LIMITS_JSON` (by path, so it imports
nothing from the package). The layers, outermost first; the first three are the kernel's and hold on their own:
  1. namespaces: fresh mount, PID, network, IPC, UTS and cgroup namespaces. The program sees a new root holding
     only its work folder (at /sandbox: a fresh tmpfs of bounded size holding the program) and, read-only, the
     Python standard library and the shared libraries Python loads; a fresh /proc showing only its own processes; no network device. The evaluator's
     files, environment and processes do not exist for it. Root drops to a user id of its own for each run (so
     the process limit binds, and nothing it can see is writable); other users run in a user namespace with
     every capability dropped. If any of this fails the program does not run (STATUSFILE says why), unless
     the caller explicitly turned isolation off.
  2. resource limits: CPU seconds, address space, file size, open files, no core dumps, process count; and, where
     the evaluator made one, a cgroup whose memory.max holds all the program's processes together;
  3. Landlock (Linux >= 5.13), when the kernel has it: files can be written only under the work folder, and
     from ABI 4 on no TCP connect or bind at all;
  4. an audit hook (PEP 578): turns most escapes into a clear "sandbox: ... is not allowed" error. Python code
     can reach its data by walking frames, so it is a courtesy, not a wall.
"""

import ctypes
import json
import os
import resource
import signal
import sys

SANDBOX = "/sandbox"  # where the work folder appears inside the new root


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


# ---- 1. namespaces and the new root ----------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs flags -> mount flags: a bind mount made in a user namespace must keep the source's locked flags
_KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME,
               os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def isolate(root: str, workdir: str, limits: dict) -> None:
    """Move this process into fresh namespaces and a new root. Returns in PID 1 of the new PID namespace, in the
    new root, without privileges; the process that called it waits outside and exits with PID 1's status."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    as_root = uid == 0
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    _check(libc.unshare(flags if as_root else flags | CLONE_NEWUSER), "unshare")
    if not as_root:  # become root of the new user namespace, for the mounts; dropped again below
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    # the namespace dies with whoever waits for it outside (which shares the process group the evaluator kills)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    owner = f",uid={limits['uid']},gid={limits['uid']}" if as_root else ""
    _build_root(libc, root, workdir, limits, owner)
    os.chdir(root)
    _check(libc.syscall(_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detach the old root")  # the old root is gone, not just out of view
    os.chdir("/")
    _check(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
           "make the new root read-only")
    if as_root:  # a user id of its own: no root powers, and RLIMIT_NPROC counts only this program's processes
        sandbox_uid = int(limits["uid"])
        os.setgroups([])
        os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
        os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
    else:  # root of the user namespace only: drop every capability, so the mounts cannot be undone
        _drop_capabilities(libc)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(SANDBOX)


def _build_root(libc, root: str, workdir: str, limits: dict, owner: str) -> None:
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")  # nothing leaks out
    _check(libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"), "mount tmpfs")
    # the work folder is a fresh tmpfs of bounded size, owned by the program's user: what it writes never reaches
    # the evaluator's disk, and cannot fill it
    os.mkdir(root + SANDBOX)
    _check(libc.mount(b"tmpfs", (root + SANDBOX).encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                      f"size={limits['disk_bytes']},nr_inodes=4096,mode=0700{owner}".encode()), "mount the work folder")
    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as src, open(os.path.join(root + SANDBOX, name), "wb") as dst:
            dst.write(src.read())
        if owner:
            os.chown(os.path.join(root + SANDBOX, name), limits["uid"], limits["uid"])
    read_only, hidden = limits["read_only"], limits["hidden"]
    for path in read_only:
        _bind(libc, root, path, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in hidden:  # e.g. site-packages inside the standard library's folder: an empty, read-only folder
        if os.path.isdir(root + path):
            _check(libc.mount(b"tmpfs", (root + path).encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                              b"size=4k,mode=0755"), f"hide {path}")
    for device in filter(os.path.exists, _DEVICES):
        _bind(libc, root, device, MS_NOSUID | MS_NOEXEC)
    os.mkdir(root + "/proc")
    # a fresh /proc lists only this namespace's processes; where the kernel refuses one (a user namespace
    # inside a container), there is no /proc at all
    libc.mount(b"proc", (root + "/proc").encode(), b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def _bind(libc, root: str, source: str, flags: int) -> None:
    """Bind-mount source at the same path below root, reached through the same symbolic links, then remount it
    with flags (a bind ignores them the first time)."""
    source = _replicate_links(root, source)
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _check(libc.mount(source.encode(), target.encode(), None, MS_BIND, None), f"bind {source}")
    kept = 0
    for st_flag, ms_flag in _KEPT_FLAGS.items():
        if os.statvfs(source).f_flag & st_flag:
            kept |= ms_flag
    _check(libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | flags | kept, None), f"remount {source}")


def _replicate_links(root: str, path: str) -> str:
    """Recreate inside root the symbolic links met on the way to path (/lib -> usr/lib, python -> python3.11);
    return the path with every link resolved."""
    done, parts = "/", path.strip("/").split("/")
    for _ in range(256):
        if not parts:
            return done
        current = os.path.join(done, parts.pop(0))
        if not os.path.islink(current):
            done = current
            continue
        link, inside = os.readlink(current), root + current
        if not os.path.lexists(inside):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.symlink(link, inside)
        parts = os.path.normpath(os.path.join(done, link)).strip("/").split("/") + parts
        done = "/"
    raise OSError(f"too many symbolic links on the way to {path}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc) -> None:
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, all sets empty
    _check(libc.capset(ctypes.byref(header), data), "drop capabilities")


def processes_of(uid: int) -> int:
    """Processes this user id runs now (RLIMIT_NPROC counts all of them, the evaluator's included)."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            count += entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid
        except OSError:
            pass
    return count


# ---- 2. resource limits ---------------------------------------------------------------------------------------

def set_limits(limits: dict, others: int) -> None:
    """others: processes of this user id that are not the program's, which the process limit counts too."""
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # the kernel exempts user id 0 (and only it): an isolated program never runs as root
    resource.setrlimit(resource.RLIMIT_NPROC, (others + limits["processes"],) * 2)


# ---- 3. Landlock ----------------------------------------------------------------------------------------------

# Landlock constants (include/uapi/linux/landlock.h)
_FS_WRITE_RIGHTS = {
    1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12),
    2: 1 << 13,  # REFER: link/rename across folders
    3: 1 << 14,  # TRUNCATE
    5: 1 << 15,  # IOCTL_DEV
}
_NET_TCP_BIND_CONNECT = (1 << 0) | (1 << 1)  # ABI 4
_SYSCALL = {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or this is not Linux on x86_64/aarch64, whose
    syscall numbers are the ones above)."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"):
        return 0
    version = _libc().syscall(_SYSCALL["landlock_create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, version)


def landlock(workdir: str) -> int:
    """Allow file writes only below workdir and (ABI >= 4) no TCP at all. Returns the ABI used, 0 if none."""
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
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(_SYSCALL["landlock_restrict_self"], ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    os.close(ruleset)
    return abi


# ---- 4. the audit hook ----------------------------------------------------------------------------------------

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
        path = os.path.realpath(os.fsdecode(path)) + os.sep  # the folder itself too (tempfile's O_TMPFILE opens)
        return path.startswith(root)

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
    """PID 1 of a namespace is shielded from signals it does not handle, SIGXCPU from the CPU limit included.
    So PID 1 forks: the child runs the program, PID 1 only reaps and exits with the child's status (which ends
    every other process in the namespace)."""
    child = os.fork()
    if child == 0:
        return
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def join_cgroup(group: str) -> None:
    """Move this process (and so every process it starts) into the run's cgroup, whose memory.max bounds them all."""
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def main() -> None:
    program, workdir, root, status_file, limits = sys.argv[1:5] + [json.loads(sys.argv[5])]
    others = 0
    if limits["cgroup"]:
        try:
            join_cgroup(limits["cgroup"])
        except OSError as e:  # not within its memory limit: the program does not run
            with open(status_file, "w") as f:
                f.write(f"joining the cgroup {limits['cgroup']}: {e}")
            os._exit(125)
    if limits["isolate"]:
        others = 0 if os.getuid() == 0 else processes_of(os.getuid())
        try:
            isolate(root, workdir, limits)
        except Exception as e:  # the program must not run half-isolated: say why, for the evaluator
            with open(status_file, "w") as f:
                f.write(f"{type(e).__name__}: {e}")
            os._exit(125)
        workdir, program = SANDBOX, os.path.join(SANDBOX, os.path.basename(program))
    os.chdir(workdir)
    set_limits(limits, others)
    if limits["landlock"]:
        landlock(workdir)
    if os.getpid() == 1:
        reap_as_init()
    import runpy  # before the hook: the program's own imports may read what it can see, but runpy needs no more

    if limits["audit_hook"]:
        install_audit_hook(workdir)
    sys.argv = [program]
    sys.path.insert(0, workdir)
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
