"""The grading sandbox: what student code may touch in a test process, enforced by a Python audit hook.

The isolated grader (testcases/grade.py) runs each stage's tests in a child process whose working
directory is a fresh sandbox: copies of the given code, the tests and the student files. Before the
student files load, the grading plugin calls ``install()``, which adds an audit hook (PEP 578,
``sys.addaudithook``) for the rest of the process; there is no way to take it out. From then on:

    read    the sandbox; the Python installation and the venv (``sys.prefix``, ``sys.base_prefix``,
            ``sys.exec_prefix`` and the site-packages folders on ``sys.path``: their own trees, never
            a parent); /dev/null, /dev/urandom. (Running every graded test of the reference under
            the hook needed nothing more: no /proc, /sys, /etc or /usr.)
    write   the sandbox's scratch folders (home, tmp, pytest's temporary directory) and new files
            in the sandbox; never what the grader put there (the given code, the tests, the student
            files), so a restarted test process runs the same tests; /dev/null
    never   start a program (``subprocess``, ``os.system``, ``os.exec*``, ``os.posix_spawn``,
            ``os.spawn*``, ``os.fork``; ``_posixsubprocess.fork_exec``, which raises no audit event,
            is replaced by a function that does); call C through ``ctypes`` or load an extension
            module from outside the Python installation; walk the heap (``gc.get_objects``,
            ``get_referrers``, ``get_referents``: a refused function must not be dug back up);
            create a subinterpreter (it would run without this hook); install a trace or profile
            function (it could rewrite this hook's variables); add another audit hook; change the
            process's limits; open a network connection; make a hard link, or a symbolic link that
            leads anywhere but a writable part of the sandbox

Every path is judged by where it really leads, resolved here component by component the way the
kernel does (symbolic links, ``/proc/<pid>/cwd``, ``/proc/self/root``, ``/proc/self/fd/N``); a path
with a ``..`` component is refused outright (a ``..`` after a symbolic link that another thread
swaps could climb out between the check and the use), and so is opening a folder anywhere but a
writable one (a folder's descriptor would make later relative paths unaccountable).

Where the kernel offers Landlock (Linux 5.13 and later), ``install()`` also has the kernel enforce
the same folders (read: the sandbox and Python's; write: the sandbox) on everything the process
does, native code included (``torch.from_file`` opens a file with no audit event), and refuse TCP.

A refusal raises ``PermissionError`` naming the operation and the path. It is also recorded: in
the process's list (``install()`` returns its reader) and, in the grader's children, on the report
pipe at once, before the error is raised, so the scorer learns of it even if the student code
catches the error. The plugin fails the test during which it happened ("this test does not count"),
or, during a student file's import, makes that file "could not be imported".

The hook trusts nothing student code can reach: everything it calls is bound when ``install()``
runs (no global or builtin name is looked up when it runs; testcases/support_test.py checks the
bytecode), and it reads only objects of exact built-in types, so no method of a student's object
runs inside it. What it cannot stop is stated in README.md's instructor section: without Landlock,
native code that opens files itself; code that reads or writes the process's own memory; races
between a check and the use (a path object changed by another thread); forged reports on the pipe.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

# Scratch folders of a sandbox (created by the grader, or by the plugin in a direct run): writable.
SCRATCH = ("home", "tmp", "pytest-tmp")
DEVICES_READ = ("/dev/null", "/dev/urandom")
DEVICES_WRITE = ("/dev/null",)
# Built-in modules whose fresh copy would undo what install() disarms, or that reach past the hook.
FORBIDDEN_MODULES = (
    "_posixsubprocess",  # a fresh copy has the real fork_exec
    "_imp",  # a fresh copy has the real create_builtin
    "_xxsubinterpreters",  # subinterpreters run without this hook
    "_xxinterpchannels",
    "_interpreters",
    "_interpchannels",
    "_interpqueues",
    "_testcapi",  # CPython's test internals: raw memory, subinterpreters
    "_testinternalcapi",
    "_testmultiphase",
    "_testsinglephase",
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

ALWAYS_REFUSED = {  # audit event -> what it would do
    "subprocess.Popen": "start a program",
    "os.system": "start a program",
    "os.exec": "start a program",
    "os.posix_spawn": "start a program",
    "os.spawn": "start a program",
    "os.fork": "fork the test process",
    "os.forkpty": "fork the test process",
    "_posixsubprocess.fork_exec": "start a program",
    "os.link": "make a hard link",
    "gc.get_objects": "walk the interpreter's objects",
    "gc.get_referrers": "walk the interpreter's objects",
    "gc.get_referents": "walk the interpreter's objects",
    "cpython.PyInterpreterState_New": "create a subinterpreter (it would run without the sandbox)",
    "sys.settrace": "install a trace function",
    "sys.setprofile": "install a profile function",
    "sys.addaudithook": "add an audit hook",
    "resource.setrlimit": "change the test process's limits",
    "resource.prlimit": "change the test process's limits",
    "socket.connect": "open a network connection",
    "socket.bind": "open a network connection",
    "socket.sendto": "open a network connection",
    "socket.sendmsg": "open a network connection",
    "sqlite3.connect": "open a database",
    "sqlite3.enable_load_extension": "load C code",
    "sqlite3.load_extension": "load C code",
}
READS = ("os.listdir", "os.scandir", "os.listxattr", "os.getxattr")  # (path, ...): read a path
WRITES = (  # (path, ...): change a path
    "os.mkdir",
    "os.rmdir",
    "os.remove",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.chflags",
    "os.utime",
    "os.setxattr",
    "os.removexattr",
)
ADVICE = (
    "A submission may read and write only its own folder (the sandbox) and use Python's own modules; "
    "it may not start programs, call C code through ctypes or read the grader's files."
)


def refusal_message(refused: list[str] | tuple[str, ...]) -> str:
    """What a student reads for a test during which the sandbox refused something: the test does not count."""
    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
    return (
        f"integrity: code run by this test tried to {refused[0]}{more}, which the grading sandbox refused; "
        "this test does not count. Student code may read and write only its own folder, and may not start "
        "programs or call C code through ctypes."
    )


def loading_refused(file: str, what: str) -> str:
    """Why a student file counts as not importable: the sandbox refused something while it loaded."""
    return f"{file} could not be imported: it tried to {what}, which the grading sandbox refused"


def python_roots() -> tuple[str, ...]:
    """The Python installation and the venv as real paths: sys.prefix and kin, and site-packages folders on sys.path."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    candidates += [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    roots = {os.path.realpath(p) for p in candidates}
    return tuple(sorted(r for r in roots if r != "/"))


def make_checker(
    sandbox: str | Path,
    readable: Iterable[str | Path] = (),
    code: Iterable[str | Path] = (),
    protected: Iterable[str | Path] = (),
    scratch: Iterable[str | Path] = (),
    on_refusal: Callable[[str], None] | None = None,
) -> Callable[[str, tuple], str | None]:
    """``check(event, args)``: None if the audit event is allowed, else what it would do ("open /x (outside ...)").

    ``sandbox``: the sandbox folder; ``readable``: further folders (or files) that may be read;
    ``code``: where extension modules may be loaded from (the Python installation); ``protected``:
    paths in the sandbox that may be read but not changed; ``scratch``: folders that may be written
    even where they lie under a protected path. All are resolved now. ``on_refusal``: called with
    what was refused (it raises); with it, ``check`` is the audit hook itself (one call per event).
    """
    # Everything the checker uses is bound here, as a local of this function: when it runs, it looks
    # up no global or builtin name, so rebinding os.lstat, builtins.isinstance or this module's names
    # changes nothing. The objects it reads are first reduced to exact built-in types, and class
    # attributes are looked up in the classes' own dicts, so no student method runs inside it.
    lstat, readlink, getcwd, fspath = os.lstat, os.readlink, os.getcwd, os.fspath
    str_, bytes_, int_, tuple_, type_, len_, issubclass_ = str, bytes, int, tuple, type, len, issubclass
    as_str, as_int, decode = str.__str__, int.__int__, bytes.decode
    mro_of, dict_of = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    direntry, posix_path, pure_posix_path = os.DirEntry, pathlib.PosixPath, pathlib.PurePosixPath
    purepath_fspath, purepath_str = pathlib.PurePath.__fspath__, pathlib.PurePath.__str__
    cached_str = pathlib.PurePath.__dict__["_str"].__get__ if "_str" in pathlib.PurePath.__dict__ else None
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    oserror, attributeerror, typeerror = OSError, AttributeError, TypeError
    always, forbidden = dict(ALWAYS_REFUSED), frozenset(FORBIDDEN_MODULES)
    devices_read, devices_write, write_flags = DEVICES_READ, DEVICES_WRITE, WRITE_FLAGS
    link_mode, type_mask, dir_mode = 0o120000, 0o170000, 0o040000

    def real(text: str) -> str:
        """Where an absolute or relative path leads: symbolic links followed component by component."""
        if not text.startswith("/"):
            text = getcwd() + "/" + text
        todo = text.split("/")
        todo.reverse()
        resolved, links = "", 0
        while todo:
            name = todo.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                resolved = resolved[: resolved.rfind("/")]
                continue
            candidate = resolved + "/" + name
            try:
                mode = lstat(candidate).st_mode
            except oserror:
                resolved = candidate  # does not exist (yet): judged by its name
                continue
            if mode & type_mask != link_mode:
                resolved = candidate
                continue
            links += 1
            if links > 40:
                return "/(a loop of symbolic links)"
            try:
                target = readlink(candidate)
            except oserror:
                resolved = candidate
                continue
            if target.startswith("/"):
                resolved = ""
            parts = target.split("/")  # "pipe:[123]" from /proc/self/fd/N stays a name under /proc
            parts.reverse()
            todo += parts
        return resolved or "/"

    def under(path: str, roots: tuple) -> bool:
        for root in roots:  # noqa: SIM110 (any() would be a builtin looked up at run time)
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def resolved(paths) -> tuple:
        found = [real(as_str(fspath(p))) for p in paths]
        return tuple_(p for p in found if p != "/")

    home = real(as_str(fspath(sandbox)))
    can_load, locked, free = resolved(code), resolved(protected), resolved(scratch)
    can_read = (home, *free, *resolved(readable))

    def writable(path: str) -> bool:
        if path in devices_write or under(path, free):
            return True
        return under(path, (home,)) and not under(path, locked)

    def is_dir(path: str) -> bool:
        try:
            return lstat(path).st_mode & type_mask == dir_mode
        except oserror:
            return False

    def lookup(kind: type, name: str):
        """``kind``'s attribute ``name`` as special-method lookup finds it (the classes' own dicts, in MRO order)."""
        for cls in mro_of(kind):
            found = dict_of(cls).get(name)
            if found is not None:
                return found
        return None

    def text_of(obj) -> str | None:
        """The path an argument names, as an exact str; None for objects that cannot name a path safely."""
        kind = type_(obj)
        if kind is str_:
            return obj
        if kind is bytes_:
            return decode(obj, encoding, errors)
        if kind is direntry:
            path = obj.path  # a read-only member of a built-in type
            return decode(path, encoding, errors) if type_(path) is bytes_ else path
        pathlib_path = (kind is posix_path or kind is pure_posix_path) and cached_str is not None
        if pathlib_path and lookup(kind, "__fspath__") is purepath_fspath and lookup(kind, "__str__") is purepath_str:
            try:
                return as_str(cached_str(obj))  # what its own __fspath__ returned to the os function
            except (attributeerror, typeerror):
                return None
        return None

    def access(op: str, obj, write: bool, opening: bool = False) -> str | None:
        """None if ``op`` may read (or write) the path ``obj`` names; else what was refused."""
        if issubclass_(type_(obj), int_):
            fd = as_int(obj)
            try:
                target = readlink("/proc/self/fd/" + str_(fd))
            except oserror:
                return None  # not an open descriptor (the call fails), or no /proc (macOS)
            if not target.startswith("/"):
                return None  # a pipe or a socket: nothing on disk
            text, shown = target, "file descriptor " + str_(fd)
        else:
            text = text_of(obj)
            if text is None:
                return op + " a path given as another type than str, bytes or pathlib.Path (it could change)"
            shown = text
        if ".." in text.split("/"):
            return op + " " + shown + " (a path with '..')"
        path = real(text)
        if path != shown:
            shown = shown + " (that is " + path + ")"
        if write and not writable(path):
            where = "the grader's files are read-only" if under(path, (home,)) else "outside the sandbox"
            return op + " " + shown + " for writing (" + where + ")"
        if not write and not (path in devices_read or under(path, can_read)):
            return op + " " + shown + " (outside the sandbox)"
        if opening and not writable(path) and is_dir(path):
            return op + " the folder " + shown + " (folders open only in the sandbox's writable part)"
        return None

    def on_open(event: str, args: tuple) -> str | None:
        path, mode, flags = args[0], args[1], args[2] if len_(args) > 2 else 0
        write = type_(flags) is int_ and flags & write_flags != 0
        if type_(mode) is str_:
            for letter in "wax+":
                if letter in mode:
                    write = True
        return access("open", path, write, opening=True)

    def on_read(event: str, args: tuple) -> str | None:
        return access(event, "." if args[0] is None else args[0], False)

    def on_chdir(event: str, args: tuple) -> str | None:
        return access("chdir to", args[0], False)

    def on_write(event: str, args: tuple) -> str | None:
        return access(event, args[0], True)

    def on_rename(event: str, args: tuple) -> str | None:
        return access(event, args[0], True) or access(event, args[1], True)

    def on_glob(event: str, args: tuple) -> str | None:
        pattern = text_of(args[0])
        if pattern is None:
            return None  # glob then fails, or lists through os.scandir, which is checked
        cut = len_(pattern)
        for magic in "*?[":
            at = pattern.find(magic)
            if at != -1 and at < cut:
                cut = at
        folder = pattern[: pattern.rfind("/", 0, cut) + 1] or "."
        if len_(args) > 2 and type_(args[2]) is str_ and not folder.startswith("/"):
            folder = args[2] + "/" + folder
        return access("glob", folder, False)

    def on_symlink(event: str, args: tuple) -> str | None:
        refused = access(event, args[1], True)
        if refused:
            return refused
        target = text_of(args[0])
        if target is None or not target.startswith("/") or ".." in target.split("/") or not writable(real(target)):
            return (
                "make a symbolic link to " + (target or "?") + " (links may lead only into the sandbox's writable part)"
            )
        return None

    def on_import(event: str, args: tuple) -> str | None:
        name = args[0] if type_(args[0]) is str_ else None
        if name is None or name in forbidden:
            return "import a fresh " + (name or "module") + " (a module the sandbox disarms or forbids)"
        # A file name comes with the event only when an extension module is loaded (whatever its suffix)
        if len_(args) > 1 and type_(args[1]) is str_ and args[1] and not under(real(args[1]), can_load):
            return "load C code from " + args[1] + " (extension modules load only from the Python installation)"
        return None

    def refuse(event: str, args: tuple) -> str | None:
        what = always[event]
        if what == "start a program" and len_(args) > 0 and type_(args[0]) is str_:
            return what + " (" + event + ": " + args[0] + ")"
        return what + " (" + event + ")"

    handlers: dict[str, Callable[[str, tuple], str | None]] = {"open": on_open, "os.chdir": on_chdir}
    handlers.update({e: on_read for e in READS})
    handlers.update({e: on_write for e in WRITES})
    handlers.update({e: refuse for e in ALWAYS_REFUSED})
    handlers.update({"os.rename": on_rename, "os.symlink": on_symlink, "import": on_import})
    handlers.update({"glob.glob": on_glob, "glob.glob/2": on_glob})
    find = handlers.get

    def check(event: str, args: tuple) -> str | None:
        handler = find(event)  # the event's name first: most events (builtins.id, ...) stop here
        if handler is not None:
            what = handler(event, args)
        elif event[:7] == "ctypes.":
            what = "call C code through ctypes (" + event + ")"
        else:
            return None
        if what is not None and on_refusal is not None:
            on_refusal(what)
        return what

    return check


def install(
    sandbox: str | Path,
    scratch: Iterable[str | Path],
    readable: Iterable[str | Path] = (),
    report_fd: int | None = None,
) -> tuple[Callable[[], tuple[str, ...]], int | str]:
    """Close the sandbox for the rest of this process: (a function that lists the refusals so far, Landlock's state).

    ``sandbox``: the folder student code may use; what it holds now becomes read-only, except the
    ``scratch`` folders (created here). ``readable``: more folders that may be read (the student
    files' own, in a direct run). ``report_fd``: the grader's report pipe; each refusal is written
    there as the JSON line ``{"event": "refused", "what": ...}`` before the PermissionError.
    Landlock's state: the ABI version the kernel enforces the same folders with, 0 where the kernel
    has no Landlock, or why restricting failed.
    """
    root, scratch = Path(sandbox).resolve(), [Path(s).resolve() for s in scratch]
    for folder in scratch:
        folder.mkdir(parents=True, exist_ok=True)
    protected = [entry for entry in root.iterdir() if entry not in scratch]
    roots, readable = python_roots(), [Path(r).resolve() for r in readable]
    try:
        landlock: int | str = restrict_natively([root, *roots, *readable, *DEVICES_READ], [root, *scratch])
    except OSError as error:
        landlock = f"Landlock refused: {error}"
    log: list[str] = []
    append, write, escape = log.append, os.write, json.encoder.encode_basestring_ascii
    permission_error, os_error, advice = PermissionError, OSError, ADVICE
    sys.dont_write_bytecode = True  # a module imported later must not try to write its .pyc beside it
    _disarm(sys.audit)

    def refuse(what: str) -> None:
        append(what)
        if report_fd is not None:
            try:  # noqa: SIM105 (contextlib.suppress would run code looked up at run time)
                write(report_fd, ('{"event": "refused", "what": ' + escape(what) + "}\n").encode())
            except os_error:
                pass
        raise permission_error("grading sandbox: refused to " + what + ". " + advice)

    sys.addaudithook(make_checker(root, [*roots, *readable], roots, protected, scratch, on_refusal=refuse))
    tuple_ = tuple
    return (lambda: tuple_(log)), landlock


# ---- Landlock: the kernel enforces the same folders for native code (Linux >= 5.13) ------------------

# Syscall numbers from the generic table, the same on every Linux architecture.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE = 1, 2, 4, 8, 16, 32
MAKE_DIR, MAKE_REG, MAKE_SYM, REFER, TRUNCATE = 128, 256, 4096, 1 << 13, 1 << 14
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | (1 << 15)  # the rights a rule on a file may carry
READ = READ_FILE | READ_DIR
WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER | TRUNCATE


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers; 0 where it has none (macOS, older kernels, a seccomp filter)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(int(libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))), 0)
    except (ImportError, OSError, AttributeError):  # a Python without ctypes, a libc without syscall()
        return 0


def restrict_natively(read: Iterable[str | Path], write: Iterable[str | Path]) -> int:
    """Make the kernel refuse this process (and any child) every file access but these; return the ABI used, 0 if none.

    ``read``: paths that may be read (a folder: everything beneath it); ``write``: folders whose
    contents may be read, created, changed and removed, and /dev/null. Nothing may be executed,
    and where the kernel can (ABI 4), no TCP connection made. Irreversible.
    """
    abi = landlock_abi()
    if abi == 0:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    handled = (
        (1 << 13) - 1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)
    )

    class Ruleset(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def check(result: int, what: str) -> int:
        if result < 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
        return result

    ruleset = Ruleset(handled, 0b11 if abi >= 4 else 0)  # ABI 4: TCP bind and connect, with no rule allowing any
    size = ctypes.sizeof(Ruleset) if abi >= 4 else 8
    ruleset_fd = check(libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(ruleset), ctypes.c_size_t(size), 0), "create")
    try:
        rules = [(p, READ) for p in read] + [(p, READ | WRITE) for p in write] + [("/dev/null", READ_FILE | WRITE_FILE)]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent here: nothing to allow
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    rights &= FILE_RIGHTS
                rule = PathBeneath(rights & handled, fd)
                check(libc.syscall(LANDLOCK_ADD_RULE, ruleset_fd, 1, ctypes.byref(rule), 0), f"allow {path}")
            finally:
                os.close(fd)
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: required to restrict oneself
        check(libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset_fd, 0), "restrict")
    finally:
        os.close(ruleset_fd)
    return abi


def calm_hypothesis() -> None:
    """If the tests use Hypothesis: no example database and no explain phase (it calls sys.settrace) from now on.

    Without this, a property-based test that fails would have the sandbox refuse Hypothesis's own
    tracer, and the student would read "this test does not count" instead of the failure. Call it
    before ``install()``; it keeps every other setting of the profile the tests loaded.
    """
    if "hypothesis" not in sys.modules:
        return
    from hypothesis import Phase, settings

    current = settings.default
    phases = tuple(phase for phase in current.phases if phase is not Phase.explain)
    settings.register_profile("grading-sandbox", parent=current, database=None, phases=phases)
    settings.load_profile("grading-sandbox")
    _warm_hypothesis()


def _warm_hypothesis() -> None:
    """Run one trivial property test before the sandbox is installed.

    Hypothesis creates and registers its own random generator on the first derandomized run (the
    default under ``CI=true``), and registering it walks the interpreter's objects
    (``gc.get_referrers``), which the sandbox refuses. Done once here, it is not done again.
    """
    from hypothesis import given, settings, strategies

    @settings(max_examples=1, database=None, derandomize=True)
    @given(strategies.just(None))
    def warm(_):
        """Nothing to check: running is the point."""

    warm()


def _disarm(audit: Callable[..., None]) -> None:
    """Make the ways to start a program that raise no audit event raise one (which the hook refuses)."""
    import _imp
    import _posixsubprocess
    import subprocess

    create_builtin = _imp.create_builtin

    def fork_exec(*args, **kwargs):
        """Stands in for _posixsubprocess.fork_exec under the grading sandbox: it starts nothing."""
        audit("_posixsubprocess.fork_exec")
        raise PermissionError("grading sandbox: refused to start a program")

    def create_builtin_audited(spec):
        """_imp.create_builtin, with the "import" audit event the extension loader raises too."""
        audit("import", spec.name, None, None, None, None)
        return create_builtin(spec)

    _posixsubprocess.fork_exec = fork_exec
    subprocess._fork_exec = fork_exec
    _imp.create_builtin = create_builtin_audited


# Modules whose bindings install() changes; testcases/integrity.py protects them like torch's.
DISARMED_MODULES = ("_posixsubprocess", "subprocess", "_imp")
