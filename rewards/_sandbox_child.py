"""The program run inside each code-execution sandbox (``python -I -S -c <this source>``), stdlib only.

It reads one job (JSON) from stdin, confines itself, runs the candidate code and then each test, and writes
``{"nonce", "passed", "total", "error"}`` to the result pipe (``job["result_fd"]``, whose read end only the
parent holds), then exits 0. The nonce is a per-run secret from the parent, kept only in ``main``'s frame
while untrusted code runs; the audit hook refuses the ways to reach a frame (``sys._getframe``, traceback /
generator frames, tracing, gc walks) and reading ``/proc``, so a program cannot forge a passing result
(writing a result file or to the pipe without the nonce counts as a crash). Its stdout/stderr are
/dev/null (set by the parent), so printing cannot flood the trainer.

Confinement, in order (each layer is the kernel's, except the audit hook):
1. rlimits: CPU seconds, address space, file size, no core files (soft = hard, so they cannot be raised);
2. a fresh network namespace (no interfaces but a down loopback) when allowed;
3. as root: stdlib modules a solution may need are imported first, then the process drops to an unprivileged
   uid of its own (so it cannot read /root, write the repo or $HOME, or signal the trainer) with
   RLIMIT_NPROC (fork bombs stop);
4. a ``sys.addaudithook`` that refuses sockets, process creation, signals, ctypes, writes outside the
   temporary working directory, frame introspection and ``/proc``.
"""

import json
import os
import resource
import sys

MB = 1 << 20
PRELOAD = (
    "math cmath re collections itertools functools heapq bisect string operator typing json random statistics "
    "fractions decimal datetime copy hashlib array textwrap unicodedata dataclasses enum numbers calendar "
    "struct abc io time"
)
DENY_EVENTS = (
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill", "os.killpg",
    "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chdir", "os.chroot",
    "os.setuid", "os.setgid", "os.setreuid", "os.setresuid", "resource.setrlimit", "resource.prlimit",
    "sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents",
)
FRAME_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"}
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
    if job["netns"]:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if os.getuid() != 0:  # unprivileged: a user namespace grants the right to make a network namespace
            libc.unshare(0x10000000 | 0x40000000)
        else:
            libc.unshare(0x40000000)  # CLONE_NEWNET; failure leaves the audit hook as the guard
    uid = job["uid"]
    if uid is not None:
        for name in PRELOAD.split():
            __import__(name)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))


def install_hook(root):
    def inside(path):
        if isinstance(path, int):
            return True
        p = os.path.realpath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep)

    def hook(event, args):
        if event.startswith("socket.") or event in DENY_EVENTS:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and args[0].split(".")[0] in DENY_MODULES:
            raise PermissionError("sandbox: import " + args[0] + " is not allowed")
        if event == "object.__getattr__" and args[1] in FRAME_ATTRS:
            raise PermissionError("sandbox: frame introspection is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes)):
            p = os.path.realpath(os.fsdecode(args[0]))
            if p == "/proc" or p.startswith("/proc/"):
                raise PermissionError("sandbox: reading /proc is not allowed")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & WRITE_FLAGS
            if writes and not inside(args[0]):
                raise PermissionError("sandbox: writing " + str(args[0]) + " is not allowed")
        if event in PATH_EVENTS and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError("sandbox: " + event + " outside the working directory is not allowed")

    sys.addaudithook(hook)


def run(job):
    ns = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<solution>", "exec"), ns)
        for src in job["setup"]:
            exec(compile(src, "<setup>", "exec"), ns)
        if job["entry_point"]:
            ns["candidate"] = ns[job["entry_point"]]
    except BaseException as err:  # SystemExit included: code that exits before the tests fails them all
        return 0, type(err).__name__ + ": " + str(err)[:200]
    passed = 0
    for src in job["tests"]:
        try:
            exec(compile(src, "<test>", "exec"), ns)
            passed += 1
        except BaseException:
            pass
    return passed, None


def main():
    job = json.loads(sys.stdin.read())
    nonce, fd = job.pop("nonce"), job.pop("result_fd")
    confine(job)
    install_hook(os.path.realpath(os.getcwd()))
    passed, error = run(job)
    os.write(fd, json.dumps({"nonce": nonce, "passed": passed, "total": len(job["tests"]), "error": error}).encode())
    os._exit(0)


main()
