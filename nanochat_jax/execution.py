"""Sandboxed Python: the calculator tool at inference time and HumanEval's generated programs.

Every run is a fresh `python -I` process in a new temporary directory (deleted afterwards) with a
scrubbed environment and no stdin, killed when its wall-clock timeout passes. Before the untrusted
code starts, a prelude

  - sets hard resource limits: address space (memory), CPU seconds, size of written files, no core;
  - moves the process into its own empty network namespace where the kernel allows it (it does for
    root and where unprivileged user namespaces are on), so there is no network interface at all;
  - installs an audit hook (PEP 578; hooks cannot be removed once added) that refuses, wherever the
    call comes from: process creation and signals, sockets, ctypes, writes/deletes/renames outside
    the temporary directory, chdir, frame introspection (sys._getframe, traceback and generator
    frames, settrace), gc's object walks, new code objects and marshal, and changing rlimits.

The hook is what makes "escapes" fail: reaching the original `os.system` through `__subclasses__`,
`__builtins__` or a frame's globals gets you the function, but calling it still raises the audit
event that is refused. The hook reads only constants and its own default arguments, so user code
cannot rewire it through module globals. No .pyc can be written, so the bytecode the import system
unmarshals is the installation's own. Not covered: hand-made bytecode passed to marshal directly
(the import system needs marshal, and its event cannot tell the callers apart), reading files (the process sees the same
file system, read-only in effect) and CPU-level side channels; this protects the machine from
model-written code, it is not a jail for a determined attacker with a kernel exploit.
"""

import dataclasses
import os
import subprocess
import sys
import tempfile

MAX_OUTPUT_BYTES = 1 << 20  # per stream; the rest is cut (writes past it fail inside the sandbox)


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None  # the exception's last traceback line, or why the run was stopped
    timeout: bool = False
    memory_exceeded: bool = False


# Runs in the child before the user's code. Everything lives inside functions so that nothing of
# it stays reachable from the user's globals; the user's code runs with fresh globals.
_PRELUDE = r'''
def _sandbox(tmp, memory_bytes, cpu_seconds, file_bytes):
    import builtins, os, resource, sys

    try:  # an empty network namespace: no interfaces, no routes, nothing to connect to
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
    except Exception:
        pass  # not permitted here; the audit hook still refuses every socket
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]

    limits = [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)]
    if memory_bytes:
        limits.append((resource.RLIMIT_AS, memory_bytes))
    for which, value in limits:
        resource.setrlimit(which, (value, value))

    def inside(path, tmp=tmp + "/", isinstance=isinstance, str=str, bytes=bytes):
        """Lexically inside the temp dir (the cwd, which cannot change; links cannot be made)."""
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not isinstance(path, str):
            return False  # path-likes could answer differently when the file is really opened
        if not path.startswith("/"):
            path = tmp + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return ("/" + "/".join(parts) + "/").startswith(tmp)

    refused = frozenset({
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.chdir", "os.fchdir",
        "os.symlink", "os.link", "os.chmod", "os.chown", "os.chroot", "os.setuid", "os.setgid",
        "subprocess.Popen", "pty.spawn", "sys._getframe", "sys._current_frames", "sys.settrace",
        "sys.setprofile", "code.__new__", "sys.remote_exec",
    })
    refused_prefixes = ("os.exec", "os.spawn", "os.posix_spawn", "socket.", "ctypes.", "gc.get_",
                        "resource.", "_posixsubprocess", "mmap.")
    path_events = frozenset({"os.remove", "os.rmdir", "os.rename", "os.mkdir", "shutil.rmtree",
                             "shutil.move", "shutil.copyfile", "os.truncate", "os.utime", "os.mkfifo",
                             "os.mknod", "os.replace", "os.removexattr", "os.setxattr"})
    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(event, args, refused=refused, refused_prefixes=refused_prefixes, path_events=path_events,
             frame_attributes=frame_attributes, write_flags=write_flags, inside=inside,
             PermissionError=PermissionError, isinstance=isinstance, str=str, bytes=bytes, int=int,
             ValueError=ValueError, any=any, all=all, bool=bool):
        bad = event in refused or event.startswith(refused_prefixes)
        if event == "import":
            bad = args[0].startswith(("_posixsubprocess", "ctypes", "_ctypes"))
        elif event == "open":
            path, mode, flags = args
            writes = (isinstance(flags, int) and flags & write_flags) or \
                (isinstance(mode, str) and any(c in mode for c in "wax+"))
            # os.open (mode None) is refused outright: it could give a directory fd, and dir_fd-relative
            # calls (os.open, os.remove, ...) show a path the check would wrongly read as inside tmp.
            bad = mode is None or (bool(writes) and not (isinstance(path, int) or (inside(path) and not
                                                                                   str(path).endswith(".pyc"))))
        elif event in path_events:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes))]
            bad = not isinstance(args[0], (str, bytes, int)) or not all(inside(p) for p in paths)
        elif event == "object.__getattr__":
            bad = args[1] in frame_attributes
        elif event == "object.__setattr__":
            bad = args[1] == "__code__"
        if bad:
            if event == "sys._getframe":
                # The library code that peeks at its caller (namedtuple, enum, typing) already
                # handles the ValueError of a too-shallow stack; any other error would break it.
                raise ValueError("sandbox: sys._getframe is not allowed")
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)
    os.environ.clear()
    for name in ("exit", "quit", "help", "input", "breakpoint"):
        setattr(builtins, name, None)
    for name in ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "chdir", "fchdir", "chroot"):
        setattr(os, name, None)


_sandbox(*_SANDBOX_ARGS)
del _sandbox, _SANDBOX_ARGS
exec(compile(_CODE, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 << 20,
                 maximum_file_bytes: int = 16 << 20) -> ExecutionResult:
    """Run `code` in the sandbox; stdout/stderr are captured, at most MAX_OUTPUT_BYTES each.

    Safe to call from any thread (the timeout is the parent's, not a signal).
    """
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        tmp = os.path.realpath(tmp)
        args = (tmp, maximum_memory_bytes, max(1, int(timeout) + 1), maximum_file_bytes)
        program = f"_SANDBOX_ARGS = {args!r}\n_CODE = {code!r}\n" + _PRELUDE
        # Output goes to files the parent opened (FSIZE-capped), not pipes a flood could fill RAM with.
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, env={},
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:  # run() has killed the child already
                timed_out = True
        stdout, stderr = (_read_capped(p) for p in (out_path, err_path))
    if timed_out:
        return ExecutionResult(False, stdout, stderr, f"timed out after {timeout:g} s (process killed)", timeout=True)
    if proc.returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    memory = "MemoryError" in stderr
    lines = stderr.strip().splitlines()
    error = lines[-1] if lines else f"exited with status {proc.returncode}"
    if proc.returncode < 0:
        error = f"killed by signal {-proc.returncode}" + (" (CPU time limit)" if -proc.returncode == 24 else "")
    return ExecutionResult(False, stdout, stderr, error, memory_exceeded=memory)


def _read_capped(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace")


# --- the calculator tool ------------------------------------------------------------------------
# What the model may ask for is the reference's: arithmetic (no powers, which can take forever and
# explode memory) or string .count() calls; anything else is refused before a process is started.

_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_COUNT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_FORBIDDEN_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "globals",
                    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


def use_calculator(expr: str, timeout: float = 3.0) -> str | None:
    """The tool's answer as text, or None when the expression is not allowed or fails."""
    expr = expr.replace(",", "")  # "1,234" is a number to the model
    if set(expr) <= _ARITHMETIC_CHARS:
        if "**" in expr:
            return None
    elif not (set(expr) <= _COUNT_CHARS and ".count(" in expr
              and not any(word in expr.lower() for word in _FORBIDDEN_WORDS)):
        return None
    code = f"print(eval({expr!r}, {{'__builtins__': {{}}}}, {{}}), end='')"
    result = execute_code(code, timeout=timeout, maximum_memory_bytes=256 << 20)
    return result.stdout if result.success else None
