"""Hostile samples against the HumanEval sandbox: each must be reported failed / timed out, the evaluation must
finish, and nothing outside the sandbox's temporary directory may change.

Safety while developing: every hostile program below only ever runs through ``Sandbox.run`` (via
``evaluate_samples``); the canaries and the fake $HOME are directories under /tmp made by the fixtures.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import threading
import uuid

import pytest

from intro2llm.evaluation import sandbox as sb
from intro2llm.evaluation.humaneval import evaluate_samples
from intro2llm.testing import sandbox_available

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OS sandbox layers are Linux-only")

PROBE = sb.probe_isolation() if sys.platform.startswith("linux") else {}
HAS_NS = PROBE.get("namespaces", "x") is None
HAS_DROP = PROBE.get("drop_privileges", "x") is None
HAS_SECCOMP = PROBE.get("seccomp", "x") is None
TIMEOUT = 1.5


ISOLATED = sandbox_available()


def _snapshot(root: str) -> dict[str, tuple]:
    """Every path under ``root`` with its mode, size, mtime and content hash."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            snap[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, digest)
    return snap


def _make_tree(root: str, mode_dir: int, mode_file: int) -> None:
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    for rel in ("a.txt", "sub/b.txt"):
        with open(os.path.join(root, rel), "w") as f:
            f.write(f"canary {rel}\n")
        os.chmod(os.path.join(root, rel), mode_file)
    for d in (root, os.path.join(root, "sub")):
        os.chmod(d, mode_dir)


@pytest.fixture
def world(monkeypatch):
    """Canaries under /tmp: a root-owned 0755 one, a world-writable 0777 one (only the read-only mount view
    protects it), a fake $HOME, and a TCP listener on 127.0.0.1 that records connections."""
    base = tempfile.mkdtemp(prefix="intro2llm-hostile-")
    os.chmod(base, 0o755)
    private, open_, home = (os.path.join(base, n) for n in ("canary", "canary_open", "home"))
    _make_tree(private, 0o755, 0o644)
    _make_tree(open_, 0o777, 0o666)
    _make_tree(home, 0o755, 0o644)
    monkeypatch.setenv("HOME", home)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn.recv(100))
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    tag = uuid.uuid4().hex[:12]
    stray = [f"/tmp/pwned-{tag}", f"/dev/shm/pwned-{tag}", f"/var/tmp/pwned-{tag}"]
    before = {p: _snapshot(p) for p in (private, open_, home)}
    w = dict(base=base, private=private, open=open_, home=home, port=listener.getsockname()[1], accepted=accepted,
             tag=tag, stray=stray, before=before)
    yield w
    stop.set()
    t.join()
    listener.close()
    shutil.rmtree(base, ignore_errors=True)
    for p in stray:
        if os.path.lexists(p):
            os.unlink(p)


def _attacks(w: dict) -> dict[str, tuple[str, set[str]]]:
    """name -> (function body run inside ``f(x)`` before ``return x``, accepted statuses)."""
    # "failed" also accepts "timed out": under load (fork bombs run beside) a blocked attack may just be slow.
    failed = either = {"failed", "timed out"}
    timed_out = {"timed out"}
    stray_writes = "\n".join(f"try:\n    open({p!r}, 'w').write('x')\nexcept OSError:\n    pass" for p in w["stray"])
    return {
        "infinite_loop": ("while True:\n    pass", timed_out),
        "fork_bomb_ctypes": ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()", timed_out),
        "fork_bomb_os": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                         timed_out),
        "escaping_daemon": ("import ctypes, time\nlibc = ctypes.CDLL(None)\n"
                            "if libc.fork() == 0:\n    libc.setsid()\n    time.sleep(60)\n"
                            f"    open({w['open'] + '/late'!r}, 'w')\n"
                            "assert False, 'parent gives up'", failed),
        "memory_bomb": ("x = bytearray(8 << 30)", failed),
        "memory_bomb_loop": ("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))", either),
        "os_system": (f"import os\nassert os.system('touch {w['private']}/pwned') == 0", failed),
        "libc_system": ("import ctypes\n"
                        f"assert ctypes.CDLL(None).system(b'rm -rf {w['private']} {w['open']}; "
                        f"touch {w['stray'][0]}') == 0", failed),
        "libc_system_private": ("import ctypes\n"
                                f"assert ctypes.CDLL(None).system(b'rm -rf {w['private']}/* {w['home']}/*') == 0",
                                failed),
        "subprocess_reloaded": ("import importlib, subprocess\nimportlib.reload(subprocess)\n"
                                f"subprocess.run(['sh', '-c', 'rm -rf {w['home']}/*; echo x > {w['open']}/a.txt'],"
                                " check=True)", failed),
        "rmtree_parent": ("import importlib, os, shutil\nimportlib.reload(shutil)\n"
                          "shutil.rmtree(os.path.dirname(os.getcwd()))", failed),
        "rmtree_home": ("import importlib, os, shutil\nimportlib.reload(shutil)\n"
                        f"shutil.rmtree({w['home']!r})\nshutil.rmtree(os.path.expanduser('~'))", failed),
        "write_outside": (f"open({w['private'] + '/a.txt'!r}, 'w').write('pwned')", failed),
        "write_world_writable": (f"open({w['open'] + '/a.txt'!r}, 'w').write('pwned')\n"
                                 f"open({w['open'] + '/new.txt'!r}, 'w').write('pwned')", failed),
        "write_tmp_shm": (stray_writes + f"\nassert any(__import__('os').path.exists(p) for p in {w['stray']!r})",
                          failed),
        "socket": (f"import socket\ns = socket.create_connection(('127.0.0.1', {w['port']}), timeout=0.5)\n"
                   "s.sendall(b'pwned')", failed),
        "socket_raw_syscall": ("import ctypes\nfd = ctypes.CDLL(None).socket(2, 1, 0)\nassert fd >= 0", failed),
        "sys_exit": ("import sys\nsys.exit(0)", failed),
        "os_exit": ("import os\nos._exit(0)", failed),
        "kill_parent": ("import ctypes, os\nlibc = ctypes.CDLL(None)\n"
                        f"r1 = libc.kill(os.getppid(), 9)\nr2 = libc.kill({os.getpid()}, 9)\n"
                        "assert r1 == 0 and r2 == 0 and os.getppid() > 0", failed),
        "disk_filler": ("i = 0\nwhile True:\n    open(f'fill{i}', 'wb').write(b'x' * (8 << 20))\n    i += 1", either),
        "recursion_bomb": ("import sys\nsys.setrecursionlimit(10**7)\ndef r(n):\n    return r(n + 1)\nr(0)", either),
        "stdout_100mb": ("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n"
                         "sys.stdout.flush()", {"output limit"}),
        "sleep_past_timeout": ("import time\ntime.sleep(60)", timed_out),
        "patch_builtins": ("import builtins, os, sys\n_w = os.write\n"
                           "for fd in range(3, 64):\n    try:\n        _w(fd, b'passed')\n    except OSError:\n"
                           "        pass\nprint('passed')\nbuiltins.print = lambda *a, **k: None\n"
                           "builtins.exec = builtins.compile = lambda *a, **k: None\n"
                           "os._exit = sys.exit = lambda *a, **k: None\nos.write = lambda *a, **k: 0\n"
                           "builtins.AssertionError = type('Nope', (Exception,), {})\nreturn None", failed),
        "remount_rw": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                       f"assert libc.mount(None, b'/', None, 32 | 4096, None) == 0\n"
                       f"open({w['private'] + '/a.txt'!r}, 'w').write('pwned')", failed),
    }


def _problems_and_samples(w: dict):
    problems, samples, expected = {}, [], {}
    for name, (body, statuses) in _attacks(w).items():
        tid = f"hostile/{name}"
        problems[tid] = {"task_id": tid, "prompt": "def f(x):\n", "entry_point": "f",
                         "test": "def check(c):\n    assert c(1) == 1\n"}
        samples.append({"task_id": tid, "completion": textwrap.indent(body, "    ") + "\n    return x\n"})
        expected[tid] = statuses
    return problems, samples, expected


def _sandbox_processes() -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if sb._UID_BASE <= uid < 2**31 or sb._UID_BASE_LOW <= uid < sb._UID_BASE_LOW + sb._UID_SPAN_LOW:
                pids.append(int(name))
    return pids


def _assert_untouched(w: dict, check_open: bool) -> None:
    for key in ("private", "home") + (("open",) if check_open else ()):
        assert _snapshot(w[key]) == w["before"][w[key]], f"{key} canary changed"
    assert [p for p in w["stray"] if os.path.lexists(p)] == []
    assert w["accepted"] == [], f"the sandbox reached the host network: {w['accepted']}"
    assert _sandbox_processes() == []


def _check_results(out: dict, expected: dict, pass_at_1: float = 0.0) -> None:
    got = {r["task_id"]: r for r in out["results"]}
    assert set(got) == set(expected), "evaluation did not finish every sample"
    wrong = {t: got[t]["result"] for t, st in expected.items() if got[t]["result"].split(":")[0] not in st}
    assert wrong == {}
    assert out["pass@k"]["pass@1"] == pytest.approx(pass_at_1)


@pytest.mark.skipif(not ISOLATED, reason=f"this machine cannot isolate untrusted code: {PROBE}")
@pytest.mark.parametrize("guards,namespaces", [(True, None), (False, None), (True, False)],
                         ids=["with-python-guards", "os-layers-only", "without-namespaces"])
def test_hostile_suite_contained(world, guards, namespaces):
    """The whole suite with every layer this machine has; and once more as a container without namespaces
    would run it (a fresh uid + seccomp + rlimits + guards), where available."""
    if namespaces is False and not HAS_DROP:
        pytest.skip("the no-namespace mode needs root (to switch to a fresh uid)")
    problems, samples, expected = _problems_and_samples(world)
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT), guards=guards, namespaces=namespaces) as box:
        assert box.isolated
        with_ns = box.isolation["namespaces"]
        out = evaluate_samples(samples, k=(1,), timeout=TIMEOUT, n_workers=4, problems=problems, sandbox=box)
    if not with_ns:
        # The documented gap of this mode: world-writable places (the 0777 canary, /tmp, /dev/shm) are writable
        # while the program runs, so these attacks may "succeed" there (root-owned files and $HOME still hold).
        gaps = {"hostile/" + n for n in ("write_tmp_shm", "write_world_writable", "libc_system", "subprocess_reloaded")}
        expected.update({t: {"passed", "failed", "timed out"} for t in gaps})
        passed = {r["task_id"] for r in out["results"] if r["passed"]}
        assert passed <= gaps
        _check_results(out, expected, pass_at_1=len(passed) / len(expected))
    else:
        _check_results(out, expected)
    _assert_untouched(world, check_open=with_ns)  # /tmp, /dev/shm, /var/tmp: swept after the run either way


@pytest.mark.skipif(not HAS_NS, reason=f"namespaces unavailable here: {PROBE.get('namespaces')}")
def test_namespaces_alone_contain(world):
    """Mount/net/pid namespaces only: no uid change, no seccomp, no Python guards."""
    problems, samples, expected = _problems_and_samples(world)
    keep = {"hostile/" + n for n in ("write_world_writable", "write_outside", "socket", "kill_parent",
                                     "escaping_daemon", "fork_bomb_ctypes", "remount_rw", "rmtree_home",
                                     "libc_system", "write_tmp_shm")}
    samples = [s for s in samples if s["task_id"] in keep]
    # As root, namespaces without the uid change count as unsafe (uid 0 still owns device nodes): opt in.
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT), namespaces=True, drop_privileges=False, seccomp=False,
                    guards=False, allow_unsafe=os.geteuid() == 0) as box:
        assert box.isolated == (os.geteuid() != 0)
        out = evaluate_samples(samples, k=(1,), timeout=TIMEOUT, n_workers=4, problems=problems, sandbox=box)
    _check_results(out, {t: expected[t] for t in keep})
    _assert_untouched(world, check_open=True)


@pytest.mark.skipif(not (HAS_DROP and HAS_SECCOMP), reason=f"needs root and seccomp: {PROBE}")
def test_unprivileged_uid_and_seccomp_alone_contain(world):
    """The fallback for containers without namespaces: a fresh uid + seccomp + rlimits, no Python guards.
    (Documented limit of this mode: world-writable places such as /tmp are writable while the program runs;
    what its uid leaves at their top level is swept afterwards, which write_tmp_shm checks.)"""
    problems, samples, expected = _problems_and_samples(world)
    keep = {"hostile/" + n for n in ("write_outside", "socket", "socket_raw_syscall", "kill_parent",
                                     "escaping_daemon", "fork_bomb_ctypes", "rmtree_home", "libc_system_private",
                                     "remount_rw", "stdout_100mb", "write_tmp_shm")}
    samples = [s for s in samples if s["task_id"] in keep]
    expected["hostile/write_tmp_shm"] = {"passed"}  # the known gap of this mode: the writes happen, then are swept
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT), namespaces=False, drop_privileges=True, seccomp=True,
                    guards=False) as box:
        out = evaluate_samples(samples, k=(1,), timeout=TIMEOUT, n_workers=4, problems=problems, sandbox=box)
    _check_results(out, {t: expected[t] for t in keep}, pass_at_1=1 / len(keep))
    _assert_untouched(world, check_open=False)


def test_refuses_without_isolation(monkeypatch):
    none = {"namespaces": "no", "drop_privileges": "no", "seccomp": "no"}
    monkeypatch.setitem(sb._PROBE_CACHE, sys.executable, none)
    with pytest.raises(sb.SandboxUnavailableError, match="allow_unsafe"):
        sb.Sandbox()
    with pytest.raises(sb.SandboxUnavailableError, match="allow_unsafe"):
        evaluate_samples([], problems={}, timeout=1.0)
    with sb.Sandbox(allow_unsafe=True) as box:  # explicit opt-in: runs with rlimits + process group only
        assert not box.isolated
        assert box.run("print(6 * 7)").stdout.strip() == "42"
    only_fs = dict(none, drop_privileges=None)
    monkeypatch.setitem(sb._PROBE_CACHE, sys.executable, only_fs)
    with pytest.raises(sb.SandboxUnavailableError, match="network"):
        sb.Sandbox()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="about running as root")
def test_root_without_uid_change_is_refused(monkeypatch):
    monkeypatch.setitem(sb._PROBE_CACHE, sys.executable, {"namespaces": None, "drop_privileges": "EPERM",
                                                          "seccomp": None})
    with pytest.raises(sb.SandboxUnavailableError, match="unprivileged uid"):
        sb.Sandbox()


@pytest.mark.skipif(not (ISOLATED and HAS_DROP), reason=f"needs root: {PROBE}")
def test_low_uid_range_for_rootless_containers(monkeypatch):
    """Where only uids 0..65535 are mapped, the probe falls back to a low range that skips real accounts."""
    import pwd

    monkeypatch.setitem(sb._PROBE_CACHE, sys.executable, dict(PROBE, uid_base=sb._UID_BASE_LOW))
    with sb.Sandbox(sb.SandboxLimits(timeout=5.0)) as box:
        r = box.run("import os\nprint(os.getuid())")
        assert r.passed, r.stderr
        uid = int(r.stdout)
        assert sb._UID_BASE_LOW <= uid < sb._UID_BASE_LOW + sb._UID_SPAN_LOW
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
        assert box.run("import os\nwhile True:\n    os.fork()").status in ("timed out", "failed")
    assert _sandbox_processes() == []


@pytest.mark.skipif(not (ISOLATED and HAS_DROP), reason=f"needs root (sandbox uids to look for): {PROBE}")
def test_graded_runs_leave_not_even_a_zombie():
    """The candidate still serves when its tests give the verdict, so every graded run ends it early. Its bootstrap
    must reap it: a SIGKILLed bootstrap orphaned it to the host's init, and it lingered as a zombie under the
    sandbox uid (seen in CI as a stray pid after the hostile suite)."""
    with sb.Sandbox(sb.SandboxLimits(timeout=10.0)) as box:
        for _ in range(5):
            r = box.run_tests("def f(x):\n    return x + 1\n", "def check(f):\n    assert f(1) == 2\n", "f")
            assert r.passed, r.stderr
            assert _sandbox_processes() == []  # right after the run, not after a grace period


def test_requested_layer_missing_is_an_error(monkeypatch):
    monkeypatch.setitem(sb._PROBE_CACHE, sys.executable, {"namespaces": "EPERM", "drop_privileges": None,
                                                          "seccomp": None})
    with pytest.raises(sb.SandboxUnavailableError, match="namespaces"):
        sb.Sandbox(namespaces=True)


@pytest.mark.skipif(not ISOLATED, reason=f"this machine cannot isolate untrusted code: {PROBE}")
def test_sandbox_basics():
    with sb.Sandbox(sb.SandboxLimits(timeout=5.0)) as box:
        r = box.run("import os, sys\nprint(os.getcwd(), os.environ.get('HOME'))\nprint('err', file=sys.stderr)\n"
                    "open('scratch.txt', 'w').write('ok')\nprint(sorted(os.environ))")
        assert r.passed, r.stderr
        cwd, home = r.stdout.split("\n")[0].split()
        assert cwd == home and cwd.startswith(box._root)  # the fresh temp dir is cwd and $HOME
        assert "err" in r.stderr
        assert "PYTHONPATH" not in r.stdout and "SSH_AUTH_SOCK" not in r.stdout  # scrubbed environment
        assert not os.path.exists(cwd)  # removed after the run
        # The whole stdlib stays importable after the uid change, also submodules of packages loaded earlier.
        r = box.run("import email.utils, xml.etree.ElementTree, json, collections.abc, decimal, fractions\n"
                    "assert 'bücher.de'.encode('idna') == b'xn--bcher-kva.de'\nassert 'x'.encode('cp1252') == b'x'")
        assert r.passed, r.stderr
        if HAS_DROP:
            assert "uid" not in box.run(f"import os\nassert os.getuid() not in (0, {os.getuid()}), 'uid'").stderr
        # Bad programs are the sample's failure; only trusted set-up code can report "setup failed".
        assert [box.run(c).status for c in ("x = (", "x = 1\n\0", "import os\nos._exit(97)")] == ["failed"] * 3
        box.limits.max_open_files = -5  # an rlimit the bootstrap cannot set: the isolation is incomplete
        assert box.run("print(1)").status == "setup failed"
        problems = {"t/0": {"task_id": "t/0", "prompt": "", "entry_point": "f", "test": "def check(f):\n    pass\n"}}
        # A sandbox that cannot isolate is that sample's result (counted in "errors"), never an abort.
        out = evaluate_samples([{"task_id": "t/0", "completion": "def f():\n    pass\n"}], problems=problems,
                               sandbox=box)
        assert out["errors"] == 1 and out["results"][0]["result"].startswith("setup failed")
        assert not out["results"][0]["passed"]
    with pytest.raises(ValueError, match="timeout"):
        sb.SandboxLimits(timeout=0)
    with sb.Sandbox() as box, pytest.raises(TypeError, match="code must be str"):
        box.run(b"print(1)")
