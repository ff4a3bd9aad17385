"""One command at a time in a run directory: a command holds an exclusive lock on
`<out_dir>/.lock` (flock) while it runs, and writes there who it is (pid, host, the command,
since when); it removes the file when it ends. A second command in the same out_dir
refuses, naming that process. The kernel drops the lock when its process ends, however it
ends (kill -9 included), so a file left behind by a dead process never blocks."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from posttrain.config import ConfigError

LOCK = ".lock"


def _holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}                 # being written this instant, or damaged
    return holder if isinstance(holder, dict) else {}


@contextmanager
def out_dir_lock(run_dir: Path, command: str):
    """Hold `<run_dir>/.lock` while the body runs; ConfigError naming the holder if another
    process holds it."""
    path = Path(run_dir) / LOCK
    fd = _acquire(path, run_dir)
    try:
        me = dict(pid=os.getpid(), host=socket.gethostname(), command=command,
                  since=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        yield
    finally:
        path.unlink(missing_ok=True)   # while still held: no one can lock it in between
        os.close(fd)                   # drops the lock


def _acquire(path: Path, run_dir) -> int:
    """An fd of `path` holding its lock. A file removed by its holder between our open and
    our lock is not the lock any more: then try again on the new one."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder(fd)
            os.close(fd)
            who = (f"process {h.get('pid')} on {h.get('host')} (`{h.get('command')}`, since "
                   f"{h.get('since')})" if h else "another process")
            raise ConfigError(f"out_dir={run_dir} is in use by {who}; wait for it to finish "
                              "or choose another out_dir") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def command_line() -> str:
    """How this process was started, as the lock shows it."""
    return "posttrain " + " ".join(sys.argv[1:])
