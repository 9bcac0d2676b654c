"""The sandbox's launcher (see :mod:`mixq.sandbox`): a standalone, stdlib-only script that the
harness runs as ``python -I -S -c <this source> MODE CPU MEMORY OUTPUT DISK PROCESSES UID
STATUS_FD``; the payload (a marshalled ``(program, tests, nonce)``) arrives on stdin.

Linux processes: the launcher L forks [mode ``namespaces``: an init I, PID 1 of fresh PID, mount,
network, IPC and UTS namespaces (plus a user namespace when not root), which builds a private
root file system and forks] the runner R. R reads the payload, closes stdin, sets rlimits, drops
privileges (root: a run's own uid; user namespace: all capabilities), installs a seccomp filter
and runs the program, then the tests, and prints the nonce only after both returned. L waits
(SIGTERM from the harness, or the harness's death, means: time is up), kills every descendant
(the PID namespace dies with I; mode ``weak``: L is a child subreaper and kills what was
reparented to it) and writes one marshalled status dict to STATUS_FD, which neither I nor R
inherits.
macOS (mode ``seatbelt``, under ``sandbox-exec``; or ``weak``): this process is R itself.
"""

import ctypes
import marshal
import os
import resource
import _signal as signal  # the C module: "signal" imports enum (~5 ms)
import sys

MODE = sys.argv[1]
CPU, MEMORY, OUTPUT, DISK, PROCESSES, UID, STATUS_FD = map(int, sys.argv[2:9])
LINUX = sys.platform.startswith("linux")
LIBC = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    1024, 2048, 4096, 16384, 1 << 18, 1 << 21)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 1, 22, 24, 36
PR_SET_NO_NEW_PRIVS = 38

# Syscalls R may not make (EPERM): exec (no shell or other binary), socket (no network; socketpair
# stays), peeking at processes, rearranging mounts/namespaces, io_uring (bypasses the above) and
# rarely needed kernel attack surface. audit arch, x32 bit (0 = none), {name: number}.
DENIED = ("execve execveat socket ptrace process_vm_readv process_vm_writev unshare setns mount "
          "umount2 pivot_root chroot open_tree move_mount fsopen fsconfig fsmount fspick "
          "mount_setattr io_uring_setup bpf perf_event_open userfaultfd keyctl add_key "
          "request_key").split()
SYSCALLS = {
    "x86_64": (0xC000003E, 0x40000000, dict(zip(DENIED, (
        59, 322, 41, 101, 310, 311, 272, 308, 165, 166, 155, 161, 428, 429, 430, 431, 432, 433,
        442, 425, 321, 298, 323, 250, 248, 249)))),
    "aarch64": (0xC00000B7, 0, dict(zip(DENIED, (
        221, 281, 198, 117, 270, 271, 97, 268, 40, 39, 41, 51, 428, 429, 430, 431, 432, 433,
        442, 425, 280, 241, 282, 219, 217, 218)))),
}


def libc_call(name, *args):
    if getattr(LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def prctl(option, value, arg3=0):
    """prctl(2) with every argument a full unsigned long (it is variadic)."""
    libc_call("prctl", option, *map(ctypes.c_ulong, (value, arg3, 0, 0)))


def path_arg(path):
    return None if path is None else os.fsencode(path)


def mount(source, target, fstype, flags, data=None):
    libc_call("mount", path_arg(source), path_arg(target), path_arg(fstype),
              ctypes.c_ulong(flags), path_arg(data))


# --- init I: a private root file system ---------------------------------------------------------

LIBRARY_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64",
                "/usr/libx32", "/usr/local/lib")
DEVICES = ("null", "zero", "random", "urandom")


def kept_flags(path):
    """The mount flags of ``path``'s mount that a remount must keep (they are locked in a user
    namespace), as MS_* bits."""
    flags = os.statvfs(path).f_flag
    pairs = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
             (os.ST_RELATIME, MS_RELATIME))
    return sum(ms for st, ms in pairs if flags & st)


def bind(source, root, writable=False):
    """Bind ``source`` (a directory or a file) at the same path under ``root``, read-only unless
    ``writable``."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    mount(source, target, None, MS_BIND)
    if not writable:
        mount(None, target, None,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept_flags(source))


def build_root(root):
    """Make ``root`` (a tmpfs) this mount namespace's ``/``: the interpreter's library
    directories and shared libraries read-only, four devices, and ``/sandbox``, a private tmpfs
    of DISK bytes owned by the runner; nothing else (no /etc, /home, /proc, /tmp, shells)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    bound = []
    for path in LIBRARY_DIRS:
        if os.path.islink(path):
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            bind(path, root)
            bound.append(os.path.realpath(path) + "/")
    for path in sys.path:
        real = os.path.realpath(path) + "/"
        if os.path.exists(path) and not any(real.startswith(b) for b in bound):
            bind(path, root)
            bound.append(real)
    if os.path.exists("/etc/ld.so.cache"):
        bind("/etc/ld.so.cache", root)
    for device in DEVICES:
        bind(f"/dev/{device}", root, writable=True)
    os.mkdir(root + "/sandbox")
    owner = max(UID, 0)  # in a user namespace: its root
    mount("tmpfs", root + "/sandbox", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={DISK},mode=0700,uid={owner},gid={owner}")
    os.chdir(root)
    libc_call("syscall", ctypes.c_long(SYSCALLS[os.uname().machine][2]["pivot_root"]), b".", b".")
    libc_call("umount2", b".", MNT_DETACH)  # the old root, stacked on the new one
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def init(root, report):
    """PID 1 of the new namespaces: build the root, fork R, reap until R exits, send R's wait
    status on ``report``, exit (the kernel then kills whatever is left in the namespace)."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.umask(0o022)
        libc_call("unshare", CLONE_NEWNS)
        build_root(root)
        runner = os.fork()
    except BaseException as error:  # noqa: BLE001 (reported to L, which reports it)
        os.write(report, f"setup failed: {error}".encode())
        os._exit(125)
    if runner == 0:
        run("/sandbox")
    while True:
        pid, status = os.wait()
        if pid == runner:
            os.write(report, str(status).encode())
            os._exit(0)


# --- runner R -----------------------------------------------------------------------------------


def seccomp():
    """Install the filter denying :data:`DENIED` (EPERM) and every syscall of another ABI."""
    arch, x32, numbers = SYSCALLS[os.uname().machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    checks = ([(jge, x32)] if x32 else []) + [(jeq, n) for n in numbers.values()]
    program = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    program += [(op, len(checks) - i, 0, k) for i, (op, k) in enumerate(checks)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*program)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    libc_call("prctl", PR_SET_SECCOMP, ctypes.c_ulong(2),  # SECCOMP_MODE_FILTER
              ctypes.byref(Program(len(program), filters)), ctypes.c_ulong(0), ctypes.c_ulong(0))


def drop_privileges():
    """Root: become UID (a uid of this run only) with no groups, hence no capabilities. In a
    user namespace (its root maps to the caller): drop every capability."""
    if UID >= 0:
        os.setgroups([])
        os.setresgid(UID, UID, UID)
        os.setresuid(UID, UID, UID)
    elif os.getuid() == 0 and LINUX:
        for cap in range(64):
            if LIBC.prctl(PR_CAPBSET_DROP, *map(ctypes.c_ulong, (cap, 0, 0, 0))) != 0:
                break
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this pid
        libc_call("capset", header, (ctypes.c_uint32 * 6)())


def set_limits():
    limits = [(resource.RLIMIT_CPU, CPU, CPU + 1), (resource.RLIMIT_FSIZE, OUTPUT, OUTPUT),
              (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 64, 64)]
    if LINUX:  # macOS does not enforce these
        limits.append((resource.RLIMIT_AS, MEMORY, MEMORY))
        if UID >= 0 or MODE == "namespaces":  # else the caller's other processes count too
            limits.append((resource.RLIMIT_NPROC, PROCESSES, PROCESSES))
    for limit, soft, hard in limits:
        resource.setrlimit(limit, (soft, hard))


def read_payload():
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return marshal.loads(b"".join(chunks))


def run(workdir):
    """Be R: never returns. Exit status: the program's (0 after the nonce was printed)."""
    status = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, 1 << 16)
        program, tests, nonce = read_payload()
        set_limits()
        if LINUX:
            drop_privileges()
            seccomp()
        os.chdir(workdir)
        sys.stdout.reconfigure(line_buffering=True)  # its output survives a timeout
        os.environ.clear()
        os.environ.update(HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8", PATH="/usr/bin:/bin")
        namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
        del sys.argv[1:]
        exec(compile(program, "program.py", "exec"), namespace)  # noqa: S102 (sandboxed)
        exec(compile(tests, "tests.py", "exec"), namespace)  # noqa: S102
        sys.stdout.flush()
        os.write(1, f"\n{nonce}\n".encode())
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    except BaseException as error:  # noqa: BLE001 (the program's error is its result)
        try:
            import traceback

            traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # not run()
        except BaseException:  # noqa: BLE001 (e.g. the standard library is out of reach)
            os.write(2, f"{type(error).__name__}: {error}\n".encode())
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001, S110
                pass
        os._exit(status)


# --- launcher L ---------------------------------------------------------------------------------


class TimeUp(Exception):
    pass


def time_up(signum, frame):
    raise TimeUp


def children():
    """PIDs of this process's children (zombies included)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:  # no CONFIG_PROC_CHILDREN: scan
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == os.getpid():
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found


def quietly(call, *args):
    """``call(*args)``, ignoring a process that is gone already."""
    try:
        call(*args)
    except (ProcessLookupError, ChildProcessError):
        pass


def kill_children():
    """Kill and reap every process that is or becomes this subreaper's child."""
    while pids := children():
        for pid in pids:
            quietly(os.kill, pid, signal.SIGKILL)
        for pid in pids:
            quietly(os.waitpid, pid, 0)


def start_namespaces(root):
    """Enter fresh PID/net/IPC/UTS (+user) namespaces, fork I; returns (I's pid, read end)."""
    user = os.getuid() != 0
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    libc_call("unshare", flags | (CLONE_NEWUSER if user else 0))
    if user:  # be the namespace's root, mapped to the caller
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                           ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(STATUS_FD)
        init(root, write_end)
    os.close(write_end)
    return pid, read_end


def launch():
    """Be L: start the run, wait for it or for SIGTERM, kill everything, report."""
    report = {"timeout": False}
    harness = os.getppid()
    workdir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mixq-sandbox-{os.urandom(6).hex()}")
    os.mkdir(workdir, 0o700)
    try:
        if MODE == "namespaces":
            child, pipe = start_namespaces(workdir)
        else:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
            if UID >= 0:
                os.chown(workdir, UID, UID)
            child = os.fork()
            if child == 0:
                run(workdir)
        signal.signal(signal.SIGTERM, time_up)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the harness died: end the run as on a timeout
        message = b""
        try:
            if os.getppid() != harness:
                raise TimeUp
            if MODE == "namespaces":
                while chunk := os.read(pipe, 4096):
                    message += chunk
            else:
                report["status"] = os.waitpid(child, 0)[1]
        except TimeUp:
            report["timeout"] = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if report["timeout"] or MODE == "namespaces":  # I's death ends its PID namespace
            quietly(os.kill, child, signal.SIGKILL)
            quietly(os.waitpid, child, 0)
        if message.startswith(b"setup failed"):
            report["error"] = message.decode()
        elif message and not report["timeout"]:
            report["status"] = int(message)
        if MODE != "namespaces":
            kill_children()
    except OSError as error:
        report["error"] = f"setup failed: {error}"
    finally:
        if MODE != "namespaces":
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            os.rmdir(workdir)
    if "status" in report:  # R's exit code, or minus the signal that killed it
        report["exit"] = os.waitstatus_to_exitcode(report.pop("status"))
    os.write(STATUS_FD, marshal.dumps(report))


if __name__ == "__main__":
    if MODE == "namespaces" or (MODE == "weak" and LINUX):
        launch()
    else:  # macOS: sandbox-exec (or nothing) around this process, which cannot fork
        run(os.getcwd())
