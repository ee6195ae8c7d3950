"""The benchmark's temporary folders, and the removal of those that a killed benchmark left.

The benchmark keeps the weights every run loads, and the training program its run folder, in
temporary folders of hundreds of MB each. It removes them as it ends, on an error or Ctrl-C
too; killed outright (SIGKILL, the out-of-memory killer) it cannot, and the next benchmark
does. A folder is removed only when nothing can still be using it: its name holds the id of
the process that made it, and that process holds a lock on the folder while it lives (the
kernel releases the lock however the process ends). So a folder whose process lives, or is
gone but shares its lock with a live one (another PID namespace sharing the temporary folder,
whose ids this one cannot see), is left alone, as is anything named otherwise. Torch-free.
"""

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIXES = ("alexnet-bench-", "alexnet-program-")


@contextlib.contextmanager
def temporary_folder(prefix: str):
    """``tempfile.TemporaryDirectory(prefix=prefix)``'s folder, named ``{prefix}{pid}-XXXXXXXX``
    and locked while in use, so that ``remove_stale_folders`` knows when it is left over."""
    assert prefix in PREFIXES, prefix
    folder = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_stale_folders() -> list:
    """Removes this user's folders of ``temporary_folder`` in the temporary folder whose process
    has ended without removing them; returns their paths."""
    removed = []
    for path in sorted(Path(tempfile.gettempdir()).iterdir()):
        made_by = next((re.fullmatch(r"(\d+)-[a-z0-9_]+", path.name[len(p):]) for p in PREFIXES
                        if path.name.startswith(p)), None)
        if made_by is None or _alive(int(made_by.group(1))):
            continue
        try:
            lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, not a folder, or not ours to read
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its maker lives
            if os.fstat(lock).st_uid != os.getuid():
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(lock)
    return removed
