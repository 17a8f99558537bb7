"""One live run per output folder: the run's hold on `<output_dir>/.hold`, taken by global rank 0.

A second run into a folder that a live run holds is refused at once (a UserError naming the holder and the fix); a
hold whose process is gone (kill -9, a lost node) is taken over with one warning. Not flock/fcntl: on NFS and Lustre
those may be off, node-local or stuck on a lost node. Not filelock's soft locks: they break a stale lock with
renameat2(RENAME_EXCHANGE), which NFS and Lustre refuse, and its lease makes a newcomer watch a whole lease however
long ago the heartbeat stopped. So the hold is a JSON record link(2)ed from a unique temp file (atomic on NFS and
Lustre); a thread touches its mtime every HEARTBEAT_S while it carries our token. It is stale when, on this machine
(host, boot id, pid namespace), its pid is gone or another process (/proc start time); elsewhere when its mtime is
STALE_AFTER_S older than our temp file's (same file server clock: client skew does not matter). Of the newcomers that
find one stale hold, the one that links the first free claim renames its record over it: never a folder without one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from recipes.errors import UserError, write_failed

log = logging.getLogger(__name__)

HOLD_FILE = ".hold"  # in the output folder; outputs.check_output_dir ignores it (and its .hold.* helpers)
HEARTBEAT_S = 30.0  # one open, read and SETATTR per 30 s: nothing for a file server, yet 10 beats per STALE_AFTER_S
STALE_AFTER_S = 300.0  # 10 missed beats (NFS stalls, attribute caching, clock skew); how long a lost node blocks
CLAIM_STALE_S = 60.0  # a takeover takes milliseconds; a claim this old belongs to a newcomer that died in it
ATTEMPTS = 3  # a retry happens only when the folder changed under us (a holder released, a racer took over)


def is_hold_file(name: str) -> bool:
    """True for the hold and its helper files (`.hold.new-*`, `.hold.takeover-*`)."""
    return name == HOLD_FILE or name.startswith(HOLD_FILE + ".")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _machine() -> dict:
    """What makes a pid meaningful: the host, its current boot and the pid namespace (containers share hostnames)."""
    here = {"host": socket.gethostname(), "boot_id": None, "pid_ns": None}
    with contextlib.suppress(OSError):
        here["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        here["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return here


def _read(path: Path, touch_if: str | None = None) -> tuple[dict | None, float, str] | None:
    """(record or None where unreadable, mtime, key naming this very hold) of a hold file; None where there is none.
    Opened before its stat: on NFS the open revalidates the cached attributes, so the mtime is the server's. With
    `touch_if`, a hold carrying that token gets its mtime set to "now" through the same descriptor: the file read,
    never one renamed over it meanwhile."""
    try:
        with open(path, "rb") as f:
            data, st = f.read(), os.fstat(f.fileno())
            try:
                record = json.loads(data)
            except ValueError:
                record = None
            valid = isinstance(record, dict) and isinstance(record.get("token"), str)
            if not (valid and isinstance(record.get("pid"), int) and record["pid"] > 0):
                record = None
            if touch_if is not None and record is not None and record["token"] == touch_if:
                os.utime(f.fileno())  # "now", on NFS the server's clock
    except FileNotFoundError:
        return None
    return record, st.st_mtime, record["token"] if record else f"inode-{st.st_ino}-{st.st_size}"


def _describe(seen: tuple[dict | None, float, str] | None) -> str:
    """Who holds a hold file as `_read` read it."""
    if seen is None or seen[0] is None:
        return "nobody" if seen is None else "an unreadable hold file"
    record = seen[0]
    slurm = f", SLURM job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"host {record.get('host')}, pid {record.get('pid')}{slurm}, since {record.get('started')}"


def _stale(record: dict | None, age: float, stale_after_s: float) -> tuple[bool, str]:
    """(stale, why) for a hold whose mtime is `age` s old; a live process on this machine holds however old it is."""
    if record is not None and all(record.get(key) == value for key, value in _machine().items()):
        pid = record["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, f"pid {pid} is no longer running"
        except PermissionError:
            pass  # it exists, as another user's process
        stat = _proc_stat(pid)
        if stat is not None and stat[0] in "ZX":
            return True, f"pid {pid} has exited"
        if stat is not None and isinstance(record.get("proc_start"), int) and stat[1] != record["proc_start"]:
            return True, f"pid {pid} is now another process (started at another time)"
        return False, "its process is running on this machine"
    if age > stale_after_s:
        return True, f"its last heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)"
    what = "last heartbeat" if record is not None else "written"
    return False, f"{what} {age:.0f} s ago; it counts as stale {stale_after_s:.0f} s after its last heartbeat"


def _take(output_dir: Path, record: dict, stale_after_s: float) -> str | None:
    """Makes `record` the hold of `output_dir`: None once held, else why not and what to do."""
    hold, tmp = output_dir / HOLD_FILE, output_dir / f"{HOLD_FILE}.new-{record['token']}"
    try:
        with open(tmp, "wb") as f:  # fsynced: after a crash the hold is complete, not an empty file
            f.write((json.dumps(record) + "\n").encode())
            os.fsync(f.fileno())
        now = tmp.stat().st_mtime  # "now" on the clock that stamps the hold's mtime
        for _ in range(ATTEMPTS):
            with contextlib.suppress(FileExistsError):
                os.link(tmp, hold)
                return None
            if (seen := _read(hold)) is None:
                continue  # released meanwhile
            holder, mtime, key = seen
            if key == record["token"]:  # our link worked, its reply was lost (an NFS retransmit answers EEXIST)
                return None
            stale, why = _stale(holder, max(0.0, now - mtime), stale_after_s)
            who = _describe(seen)
            if not stale:
                return f"is held by a live run ({who}; {why}); wait for it to end, stop it"
            # Of the newcomers that found this very hold, the one that links the first free claim takes it over.
            prefix, n = f"{output_dir / HOLD_FILE}.takeover-{hashlib.sha256(key.encode()).hexdigest()[:16]}-", 1
            while (claimed := _read(Path(f"{prefix}{n}"))) is not None and now - claimed[1] > CLAIM_STALE_S:
                n += 1  # the claim of a newcomer that died in its takeover
            if claimed is not None:  # a claim holds its claimant's record
                return f"is being taken over by another run ({_describe(claimed)}); rerun to see which run holds it"
            try:
                os.link(tmp, f"{prefix}{n}")
            except FileExistsError:
                continue  # another newcomer claimed it first: look again
            try:
                if (current := _read(hold)) is not None and current[2] == key:  # still the hold we judged stale
                    os.rename(tmp, hold)  # atomic: the folder is never without a hold, so no one slips in
                    log.warning("job.output_dir: took over %s from a stale hold (%s): %s", output_dir, who, why)
                    return None
            finally:
                for claim in range(1, n + 1):  # ours, and those of newcomers that died
                    Path(f"{prefix}{claim}").unlink(missing_ok=True)
        return f"is contended: other runs took and released it {ATTEMPTS} times while this one tried; wait for them"
    finally:
        tmp.unlink(missing_ok=True)


class RunHold(contextlib.AbstractContextManager):
    """The hold of one run on its output folder; a context manager that releases it. `.held`: True on the process
    that holds it; `.files`: the names in the folder that are the hold's, for outputs.check_output_dir(ignore=...)."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.path = Path(output_dir), Path(output_dir) / HOLD_FILE
        self.token, self.held, self._stop = None, False, threading.Event()

    @classmethod
    def take(cls, output_dir: Path, *, heartbeat_s=HEARTBEAT_S, stale_after_s=STALE_AFTER_S) -> RunHold:
        """Holds `output_dir` (made if missing) for this process, or raises UserError naming the live holder."""
        hold = cls(output_dir)
        hold._created, hold._anchor = [], hold.output_dir  # the folders it creates (deepest first); the one it found
        while not hold._anchor.exists():
            hold._created.append(hold._anchor)
            hold._anchor = hold._anchor.parent
        if not hold._anchor.is_dir():
            raise UserError(f"job.output_dir: {hold._anchor} is a file, not a folder; choose another job.output_dir")
        st = os.stat(hold._anchor)
        hold._names, hold._times = sorted(os.listdir(hold._anchor)), (st.st_atime_ns, st.st_mtime_ns)
        record = {
            **_machine(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
            "proc_start": (_proc_stat(os.getpid()) or (None, None))[1],
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        try:
            hold.output_dir.mkdir(parents=True, exist_ok=True)  # exist_ok: another newcomer may make it meanwhile
            refusal = _take(hold.output_dir, record, stale_after_s)
        except OSError as error:
            hold._undo()
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # a full or failing disk, not a bad path
                raise write_failed(hold.path, error) from None
            raise UserError(
                f"job.output_dir: cannot write the hold {hold.path} ({error.strerror}); choose another job.output_dir"
            ) from None
        if refusal is not None:
            hold._undo()
            raise UserError(f"job.output_dir: {hold.output_dir} {refusal}, or choose another job.output_dir")
        hold.token, hold.held = record["token"], True
        hold._held_mtime = os.stat(hold._anchor).st_mtime_ns  # what the run changes when it writes there
        hold._thread = threading.Thread(target=hold._beat, args=(heartbeat_s,), name=f"hold {output_dir}", daemon=True)
        hold._thread.start()
        return hold

    @classmethod
    def for_run(cls, output_dir: Path, is_main: bool, **take_args) -> RunHold:
        """The hold of a whole run: `is_main` (global rank 0) takes it and tells the other ranks (which get a RunHold
        holding nothing), so that on a refusal every rank raises the same UserError and none waits for the others."""
        import torch.distributed as dist  # here: a single process taking a hold needs no torch

        hold = failure = message = None
        if is_main:
            try:
                hold = cls.take(output_dir, **take_args)
            except Exception as error:  # noqa: BLE001 - any failure must reach the other ranks
                failure = error
                message = str(error) if isinstance(error, UserError) else f"rank 0 could not take the hold ({error!r})"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [message]
            try:
                dist.broadcast_object_list(box, src=0)
            except BaseException:
                if hold is not None:
                    hold.release()
                raise
            message = box[0]
        if failure is not None:
            raise failure
        if message is not None:
            raise UserError(message)
        return hold if hold is not None else cls(output_dir)

    @property
    def files(self) -> tuple[str, ...]:
        """The names in the output folder that belong to holds (ours, a racer's helper, a dead newcomer's)."""
        names: list[str] = []
        with contextlib.suppress(OSError):  # a rank whose view of the folder lacks it yet
            names = os.listdir(self.output_dir)
        return tuple(sorted({HOLD_FILE, *filter(is_hold_file, names)}))

    def _beat(self, heartbeat_s: float) -> None:
        warned = None  # the trouble warned about last: one warning per trouble, not one per beat
        while not self._stop.wait(heartbeat_s):
            try:
                seen = _read(self.path, touch_if=self.token)
                if seen is not None and seen[2] == self.token:
                    trouble = None
                else:
                    trouble = f"lost, now held by {_describe(seen)}; another run may write to {self.output_dir}"
            except OSError as error:
                trouble = f"heartbeat failed ({error.strerror}); retrying every {heartbeat_s:.0f} s"
            if trouble is not None and trouble != warned:
                log.warning("hold %s: %s", self.path, trouble)
            warned = trouble

    def release(self) -> None:
        """Stops the heartbeat, removes the hold if it still carries our token, undoes the folder if nothing was
        written into it. A no-op on a RunHold that holds nothing (any more)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        self._thread.join(timeout=10)  # so that it touches no hold after ours is gone
        with contextlib.suppress(OSError):
            if os.stat(self._anchor).st_mtime_ns != self._held_mtime:
                self._names = None  # the run (or another process) changed the folder's entries: its times stay
        seen = _read(self.path)
        if seen is not None and seen[2] == self.token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("hold %s: not ours any more at release (held by %s); left as it is", self.path, _describe(seen))
        self._undo()

    def _undo(self) -> None:
        """Removes the folders the hold made (if empty), and restores the times of the one it found if unchanged."""
        for folder in filter(Path.exists, self._created):
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it
                return
        with contextlib.suppress(OSError):
            if sorted(os.listdir(self._anchor)) == self._names:
                os.utime(self._anchor, ns=self._times)

    def __exit__(self, *exc_info) -> None:
        self.release()
