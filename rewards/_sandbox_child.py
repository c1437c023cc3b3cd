"""The program run inside each code-execution sandbox (``python -I -S -c <this source>``), stdlib only.

It reads one job (JSON) from stdin, confines itself, runs the candidate code and then each test in order:
a sandbox-judged test (``{"src"}``) counts as passed when it runs without raising; a trainer-judged one
(``{"holes"}``, ``rewards/_judge.py``) only has its hole expressions evaluated and their values encoded. It
writes ``{"values", "nonce", "passed", "total"}`` to the result pipe (``job["result_fd"]``, whose read end only
the parent holds), then exits 0. The nonce is a per-run secret from the parent: a result file, a write to the
pipe without it, or an exit before the harness's own counts as a crash. Its stdout/stderr are /dev/null (set
by the parent), so printing cannot flood the trainer.

Confinement, in order (each layer is the kernel's, except the audit hook):
1. rlimits: CPU seconds, address space, file size, no core files (soft = hard, so they cannot be raised);
2. a fresh network namespace (no interfaces but a down loopback) when allowed;
3. as root: stdlib modules a solution may need are imported first, then the process drops to the
   unprivileged uid leased to it (so it cannot read /root, write the repo or $HOME, or signal the trainer)
   with RLIMIT_NPROC (fork bombs stop);
4. Landlock (Linux >= 5.13, also for a non-root trainer): reads only the entries of the interpreter's import
   path but site-packages, the shared libraries and a few devices; no file creation, writing, removal or
   renaming outside the working directory; no execve anywhere; no TCP (ABI >= 4); no signals to processes
   outside the sandbox (ABI >= 6);
5. a ``sys.addaudithook`` that refuses sockets, process creation, signals, ctypes, writes outside the
   temporary working directory and reading ``/proc``. Python-level hooks can be subverted by code that
   patches modules, so the hook binds everything it uses when installed, and the harness binds
   ``exec``/``compile``/``os.write`` before the candidate runs; the kernel layers are what hold.

Not defended: the sandbox-judged tests run in the candidate's interpreter, so code that rewrites the job
(``gc.get_objects()``) or walks the interpreter's frames (``sys._getframe().f_back``) can make them pass or
read the secret (so can reading its own memory by a ``dir_fd`` route the hook cannot see, where no Landlock
stops reads of /proc and the trainer is not root). Refusing frame access would break ordinary code (``namedtuple``, ``TypeVar`` and ``Enum``
call ``sys._getframe``). The trainer-judged tests do not depend on this process's honesty.
"""

import json
import os
import resource
import sys

MB = 1 << 20
PRELOAD = (
    "math cmath re collections itertools functools heapq bisect string operator typing json random statistics "
    "fractions decimal datetime copy hashlib array textwrap unicodedata dataclasses enum numbers calendar "
    "struct abc io time traceback queue pprint contextlib weakref base64 binascii difflib collections.abc "
    "fnmatch keyword graphlib"
)  # the only modules a solution can import when the uid it drops to cannot read the stdlib (under /root)
DENY_EVENTS = (
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill", "os.killpg",
    "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chdir", "os.chroot",
    "os.setuid", "os.setgid", "os.setreuid", "os.setresuid", "resource.setrlimit", "resource.prlimit",
)
DENY_MODULES = {"_posixsubprocess", "ctypes", "_ctypes", "socket", "_socket", "subprocess", "multiprocessing",
                "pty", "mmap", "signal", "_signal", "resource"}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
               "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def confine(job):
    lim = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, job["cpu_s"]),
           (resource.RLIMIT_AS, job["memory_mb"] * MB), (resource.RLIMIT_FSIZE, job["file_mb"] * MB)]
    for res, val in lim:
        resource.setrlimit(res, (val, val))
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if job["netns"]:
        if os.getuid() != 0:  # unprivileged: a user namespace grants the right to make a network namespace
            libc.unshare(0x10000000 | 0x40000000)
        else:
            libc.unshare(0x40000000)  # CLONE_NEWNET; failure leaves the audit hook as the guard
    reads = readable_paths()  # listed while the directories are still readable
    uid = job["uid"]
    if uid is not None:
        for name in PRELOAD.split():
            __import__(name)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))
    landlock(ctypes, libc, os.getcwd(), reads)
    for name in [m for m in sys.modules if m.split(".")[0] in DENY_MODULES]:
        del sys.modules[name]  # so that importing them again goes through the audit hook


LIB_DIRS = ("/usr/lib", "/usr/lib64", "/lib64", "/usr/local/lib", "/usr/local/lib64")
DEVICES = ("/etc/ld.so.cache", "/dev/null", "/dev/urandom", "/dev/zero")
PRIVATE_DIRS = {"site-packages", "dist-packages"}  # where a dataset package (its reference solutions) may live


def readable_paths():
    """What the interpreter may read once confined, as (path, is_dir): each entry of its import path's
    directories (the stdlib and lib-dynload) except site-packages, but not the directories themselves (the
    import system has cached their listings already), so nothing else under the prefix is reachable; the shared
    libraries that extension modules load (the multiarch library directory, ``lib*.so*`` files in the library
    directories), the loader's cache and harmless devices."""
    out = []
    for entry in sys.path:
        try:
            with os.scandir(entry) as it:
                out += [(e.path, e.is_dir()) for e in it if e.name not in PRIVATE_DIRS]
        except OSError:
            continue
    arch = getattr(sys.implementation, "_multiarch", "")
    out += [(os.path.join(d, arch), True) for d in ("/usr/lib", "/lib") if arch and os.path.isdir(d + "/" + arch)]
    for d in LIB_DIRS:
        try:
            with os.scandir(d) as it:
                out += [(e.path, False) for e in it if e.name.startswith(("lib", "ld-")) and ".so" in e.name
                        and not e.is_dir()]
        except OSError:
            pass
    return out + [(p, False) for p in DEVICES if os.path.exists(p)]


def landlock(ctypes, libc, root, reads):
    """Kernel-enforced confinement: reads only ``reads`` and ``root``, writes only in ``root``, no execve at all,
    no TCP, no signals out (by ABI version); a no-op without Landlock."""
    c = ctypes.c_long
    abi = libc.syscall(c(444), None, c(0), c(1))  # landlock_create_ruleset(NULL, 0, ..._VERSION)
    if abi < 1:
        return 0
    read_file, read_dir = 1 << 2, 1 << 3
    fs = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 12  # write/rm/mk*
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER (renames/links), TRUNCATE
    fs |= 1 << 0 | read_file | read_dir  # EXECUTE (granted nowhere), READ_FILE, READ_DIR
    attr = (ctypes.c_uint64 * 3)(fs, 1 | 2, 1 | 2)  # fs; bind/connect TCP; abstract unix sockets, signals
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(c(444), ctypes.byref(attr), c(size), c(0))
    if ruleset < 0:
        return 0

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]  # noqa: RUF012

    rule, syscall, os_open, close, flags = PathBeneath(0, -1), libc.syscall, os.open, os.close, os.O_PATH | os.O_CLOEXEC
    args = (c(445), c(ruleset), c(1), ctypes.byref(rule), c(0))  # landlock_add_rule(..., PATH_BENEATH, &rule, 0)

    def allow(path, access):  # one reused rule struct: hundreds of rules per program, each must be cheap
        try:
            fd = os_open(path, flags)
        except OSError:  # unreadable to this uid anyway (a private home)
            return True
        rule.allowed_access, rule.parent_fd = access, fd
        try:
            return syscall(*args) == 0
        finally:
            close(fd)

    ok = allow(root, fs & ~1)  # everything but execute in the working directory
    for path, is_dir in reads:  # a read rule that fails only leaves that path unreadable
        allow(path, read_file | read_dir if is_dir else read_file)
    ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    ok = ok and libc.syscall(c(446), c(ruleset), c(0)) == 0  # landlock_restrict_self
    os.close(ruleset)
    return abi if ok else 0


def install_hook(root):
    # Everything the hook uses is bound here: candidate code can rebind module globals (``import __main__``),
    # builtins and ``os.path`` functions, but not these closure cells.
    deny_events, deny_modules, path_events = frozenset(DENY_EVENTS), frozenset(DENY_MODULES), frozenset(PATH_EVENTS)
    write_flags, sep = WRITE_FLAGS, os.sep
    realpath, fsdecode, denied = os.path.realpath, os.fsdecode, PermissionError
    _isinstance, _str, _bytes, _int, _any, _all = isinstance, str, bytes, int, any, all

    def inside(path):
        if _isinstance(path, _int):
            return True
        p = realpath(fsdecode(path))
        return p == root or p.startswith(root + sep)

    def hook(event, args):
        if event.startswith("socket.") or event in deny_events:
            raise denied("sandbox: " + event + " is not allowed")
        if event == "import" and args[0].split(".")[0] in deny_modules:
            raise denied("sandbox: import " + args[0] + " is not allowed")
        if event == "open" and _isinstance(args[0], (_str, _bytes)):
            p = realpath(fsdecode(args[0]))
            if p == "/proc" or p.startswith("/proc/"):
                raise denied("sandbox: reading /proc is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            writes = _any(ch in _str(mode) for ch in "wax+") or flags & write_flags
            if writes and not inside(args[0]):
                raise denied("sandbox: writing " + _str(args[0]) + " is not allowed")
        if event in path_events and not _all(inside(a) for a in args[:2] if _isinstance(a, (_str, _bytes))):
            raise denied("sandbox: " + event + " outside the working directory is not allowed")

    sys.addaudithook(hook)


def make_encoder(dumps, cap):
    """Encode a test value as JSON text in a tagged form of plain builtins (``rewards/_judge.py`` decodes it):
    ``["i", hex]``, ``["f", float.hex]``, ``["s", str]``, ``["l"|"t"|"S"|"F", items]``, ``["d", [["p", [k, v]]]]``,
    ``["q", num, den]`` (Fraction), ``["D", str]`` (Decimal); ``["?", type, truth]`` when it is none of these,
    ``["?", "too large"]`` when its text exceeds ``cap``. Subclasses encode as their builtin base (a namedtuple as a tuple)."""
    _isinstance, _type, _int, _float, _str, _complex = isinstance, type, int, float, str, complex
    _bytes, _bytearray, _list, _tuple, _dict, _set, _frozenset = bytes, bytearray, list, tuple, dict, set, frozenset
    int_hex, float_hex, str_copy, modules, _len, _type_error, _bool = (
        lambda v: _int.__format__(v, "x"), _float.hex, _str.__str__, sys.modules, len, TypeError, bool)

    def enc(v, depth):
        if depth > 100:
            raise _type_error("nested too deep")
        if v is None or v is True or v is False:
            return v
        if _isinstance(v, _int):
            return ["i", int_hex(v)]
        if _isinstance(v, _float):
            return ["f", float_hex(v)]
        if _isinstance(v, _str):
            return ["s", str_copy(v)]
        if _isinstance(v, _complex):
            return ["c", float_hex(v.real), float_hex(v.imag)]
        if _isinstance(v, _bytes | _bytearray):
            return ["y" if _isinstance(v, _bytes) else "Y", v.hex()]
        for cls, tag in ((_list, "l"), (_tuple, "t"), (_set, "S"), (_frozenset, "F")):
            if _isinstance(v, cls):
                return [tag, [enc(x, depth + 1) for x in v]]
        if _isinstance(v, _dict):
            return ["d", [["p", [enc(k, depth + 1), enc(x, depth + 1)]] for k, x in v.items()]]
        fr, dec = modules.get("fractions"), modules.get("decimal")
        if fr is not None and _isinstance(v, fr.Fraction):
            return ["q", int_hex(v.numerator), int_hex(v.denominator)]
        if dec is not None and _isinstance(v, dec.Decimal):
            return ["D", _str(v)]
        raise _type_error(_type(v).__name__)

    def encode(v):
        try:
            text = dumps(enc(v, 0))
        except BaseException:  # noqa: BLE001 - not a builtin value (a re.Match): its type and truth value only
            try:
                return dumps(["?", _type(v).__name__, _bool(v)])
            except BaseException as exc:  # noqa: BLE001 - its __bool__ raised
                return dumps(["!", _type(exc).__name__])
        return text if _len(text) <= cap else '["?", "too large"]'

    return encode


def run(job, encode, _exec=exec, _eval=eval, _compile=compile, _base=BaseException, _len=len, _type=type,
        _dumps=json.dumps):
    """Run the candidate, then each test in order: a sandbox-judged test counts as passed when it runs without
    raising; a trainer-judged one only has its holes evaluated and encoded (``["!", exception]`` when one raises).
    Returns (passed, [JSON text of one trainer-judged test's hole values, ...])."""
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        _exec(_compile(job["code"], "<solution>", "exec"), ns)
        for src in job["setup"]:
            _exec(_compile(src, "<setup>", "exec"), ns)
        if job["entry_point"]:
            ns["candidate"] = ns[job["entry_point"]]
    except _base:  # SystemExit included: code that exits before the tests fails them all
        return 0, []
    passed, values, room = 0, [], job["result_cap"]
    for test in job["tests"]:
        if "holes" in test:
            out = []
            for src in test["holes"]:
                try:
                    text = encode(_eval(_compile(src, "<test>", "eval"), ns))
                except _base as exc:
                    text = _dumps(["!", _type(exc).__name__])
                room -= _len(text) + 2
                out.append(text if room > 0 else '["?", "too large"]')
            values.append("[" + ", ".join(out) + "]")
            continue
        try:
            _exec(_compile(test["src"], "<test>", "exec"), ns)
            passed += 1
        except _base:
            pass
    return passed, values


def main():
    job = json.loads(sys.stdin.read())
    nonce, fd, total = job.pop("nonce"), job.pop("result_fd"), len(job["tests"])
    write, exit_ = os.write, os._exit
    encode = make_encoder(json.dumps, job["result_cap"] // 4)
    confine(job)
    install_hook(os.path.realpath(os.getcwd()))
    passed, values = run(job, encode)
    # Formatted without json (patchable), the harness's own fields last: in JSON the last of duplicate keys wins.
    write(fd, (f'{{"values": [{", ".join(values)}], "nonce": "{nonce}", "passed": {passed}, "total": {total}}}')
          .encode())
    exit_(0)


main()
