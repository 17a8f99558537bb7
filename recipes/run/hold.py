"""One live run per output folder: the run's hold on `<output_dir>/.hold`.

A second run into a folder a live run holds is refused at once (a UserError naming the holder and the fix); a
hold whose process is gone (kill -9, a lost node) is taken over, with one warning naming the old holder. One hold
per run: global rank 0 takes it, and `RunHold.for_run` tells the other ranks the outcome (they hold nothing).

Why a file and not flock/fcntl: output folders live on NFS and Lustre, where those locks may be absent (NFS
`nolock`, Lustre `noflock`: ENOSYS), node-local only (Lustre `localflock`: silently wrong across nodes) or
stuck on a lost node until a lease or lock daemon gives up. Why not filelock (4.3.1, installed with torch), whose
soft locks do serve NFS: its SoftFileLease lets a newcomer take another machine's claim only after watching it
unchanged for the whole lease on the newcomer's own clock, so a rerun after a lost node would wait STALE_AFTER_S
however long ago the heartbeat stopped; and the record naming the holder (SLURM job, start) and the folder left as
it was would stay ours. The hold is a plain file, made with operations that are atomic on those filesystems:

- Taking: the record (JSON: host, pid, started (ISO), token (uuid4), plus boot_id, pid_ns, proc_start and
  slurm_job) is written and fsynced to a unique `.hold.new-<token>`, then `os.link`ed to `.hold`. link(2) is
  atomic on every NFS version and on Lustre (O_CREAT|O_EXCL only from NFSv3 on), and the hold appears complete,
  never half-written. A link whose reply was lost (NFS retransmit: EEXIST although it worked) is recognised by
  the name carrying our token. Filesystems without hard links fall back to O_EXCL.
- Heartbeat: a daemon thread sets the hold's mtime to "now" every HEARTBEAT_S, first checking that it still
  carries our token. On NFS "now" is the server's clock; staleness is judged against the mtime of the
  newcomer's fresh temp file, stamped by the same clock, so clock skew between nodes does not matter.
- Stale: on this machine (same hostname, boot id and pid namespace, so containers and a rebooted node are not
  mistaken for it) when the pid is gone (os.kill(pid, 0)), a zombie, or another process started at another time
  (/proc/<pid>/stat starttime: a reused pid is not the holder); on another machine when the heartbeat is older
  than STALE_AFTER_S. A live process on this machine holds, however old its heartbeat (stopped, or stuck on I/O).
- Takeover, race-free between newcomers that found the same stale hold: each tries to create the claim
  `.hold.takeover-<hash of that hold>-<generation>` (link: exactly one wins; a loser waits TAKEOVER_WAIT_S and
  looks again, finding the winner's hold, and is refused). The winner re-reads `.hold` and, if it is still the
  hold judged stale, renames its own record over it: rename is atomic and the folder is never without a hold,
  so no run finding it free can slip in. A claim left by a newcomer killed mid-takeover (milliseconds of work)
  is superseded by the next generation after CLAIM_STALE_S. What remains is a stale holder that was alive after
  all (5 min without a heartbeat, yet running) releasing in the microseconds between the re-read and the rename.
- Release (context manager exit, normal or exception): the hold is removed only if it still carries our token.
  A run that wrote nothing (it stopped on a bad input) leaves the folder as it found it: folders the hold
  created are removed again, and the folder's mtime is put back if nothing else changed it meanwhile.

SLURM: slurm/train.sbatch requeues only after srun has returned, so the old hold is gone. A job submitted twice,
or requeued while its old instance still runs (a node cut off from slurmctld but not from the filesystem), is
simply refused while the old instance holds: nothing of the folder is touched. An instance killed with SIGKILL on
another node holds until its heartbeat is STALE_AFTER_S old.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from recipes.errors import UserError, write_failed

log = logging.getLogger(__name__)

HOLD_FILE = ".hold"  # in the output folder; outputs.check_output_dir ignores it (and its .hold.* helpers)
HEARTBEAT_S = 30.0  # one open, read and SETATTR per 30 s: nothing for a file server, yet 10 beats per STALE_AFTER_S
STALE_AFTER_S = 300.0  # a holder on another machine is dead after 5 min without a heartbeat: 10 missed beats
#   tolerate NFS stalls, attribute caching (actimeo is at most 60 s by default) and skew between clients' clocks
#   (Lustre stamps with the client's); this is how long a lost node blocks its folder
CLAIM_STALE_S = 60.0  # a takeover takes milliseconds; a claim this old belongs to a newcomer that died in it
ATTEMPTS = 3  # a retry happens only when the folder changed under us (a holder released, a racer took over)
TAKEOVER_WAIT_S = 0.1  # while another newcomer takes over, wait this long before looking again, to name the winner


def is_hold_file(name: str) -> bool:
    """True for the hold and its helper files (`.hold.new-*`, `.hold.takeover-*`)."""
    return name == HOLD_FILE or name.startswith(HOLD_FILE + ".")


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _machine() -> dict:
    """What makes a pid meaningful: the host, its current boot and the pid namespace."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class _Seen:
    """A hold file as read: its record (None if unreadable), mtime, and the key naming this very hold."""

    record: dict | None
    mtime: float
    key: str

    def describe(self) -> str:
        if self.record is None:
            return "an unreadable hold file"
        r = self.record
        slurm = f", SLURM job {r['slurm_job']}" if r.get("slurm_job") else ""
        return f"host {r.get('host')}, pid {r.get('pid')}{slurm}, since {r.get('started')}"


def _read_hold(path: Path) -> _Seen | None:
    """The hold file at `path`, or None where there is none. Opened before its stat: on NFS the open revalidates
    the cached attributes (close-to-open), so the mtime is the server's current one."""
    try:
        with open(path, "rb") as f:
            data, st = f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
        if not (
            isinstance(record, dict)
            and isinstance(record.get("token"), str)
            and isinstance(record.get("pid"), int)
            and record["pid"] > 0
        ):
            record = None
    except ValueError:
        record = None
    key = record["token"] if record else f"inode-{st.st_ino}-{st.st_size}"
    return _Seen(record, st.st_mtime, key)


def _judge(seen: _Seen, now: float, stale_after_s: float) -> tuple[bool, str]:
    """(stale, why) for a hold file, `now` on the clock that stamped its mtime."""
    age = max(0.0, now - seen.mtime)
    r = seen.record
    here = _machine()
    if r is not None and all(r.get(k) == here[k] for k in here):
        pid = r["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, f"pid {pid} is no longer running"
        except PermissionError:
            pass  # it exists, as another user's process
        stat = _read_proc_stat(pid)
        if stat is not None:
            if stat[0] in "ZX":
                return True, f"pid {pid} has exited"
            if isinstance(r.get("proc_start"), int) and stat[1] != r["proc_start"]:
                return True, f"pid {pid} is now another process (started at another time)"
        return False, "its process is running on this machine"
    if age > stale_after_s:
        return True, f"its last heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)"
    what = "last heartbeat" if r is not None else "written"
    return False, f"{what} {age:.0f} s ago; it counts as stale {stale_after_s:.0f} s after its last heartbeat"


class _Folder:
    """The output folder as the hold found it, so that a run that wrote nothing leaves no trace: the folders it
    created, and the mtime of the first folder that existed (changes of other processes are detected and kept)."""

    def __init__(self, output_dir: Path):
        missing, existing = [], output_dir
        while not existing.exists():
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"job.output_dir: {existing} is a file, not a folder; choose another job.output_dir")
        self.anchor = existing
        st = os.stat(existing)
        self.before = (st.st_atime_ns, st.st_mtime_ns)
        self.mark = st.st_mtime_ns
        self.foreign = False  # another process changed the anchor's entries while we worked
        self.created: list[Path] = []
        for folder in reversed(missing):
            try:
                self.change(folder.mkdir)
                self.created.append(folder)
            except FileExistsError:  # another newcomer made it a moment ago
                if not folder.is_dir():
                    raise UserError(
                        f"job.output_dir: {folder} is a file, not a folder; choose another job.output_dir"
                    ) from None
            except OSError as error:
                self.undo()
                raise UserError(
                    f"job.output_dir: cannot create {folder} ({error.strerror}); choose another job.output_dir"
                ) from None

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.anchor).st_mtime_ns
        except OSError:
            return None

    def change(self, operation):
        """Runs an operation of ours on the folder's entries, noting whether someone else changed them before."""
        if self._mtime() != self.mark:
            self.foreign = True
        try:
            return operation()
        finally:
            self.mark = self._mtime()

    def undo(self) -> None:
        """Removes the folders we created (if empty) and restores the anchor's times if only we changed it."""
        untouched = not self.foreign and self._mtime() == self.mark
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # the run wrote into it
                return
        if untouched:
            try:
                os.utime(self.anchor, ns=self.before)
            except OSError:
                pass


class RunHold:
    """The hold of one run on its output folder; a context manager that releases it.

    `RunHold.take(output_dir)` (one process) or `RunHold.for_run(output_dir, is_main)` (every rank; rank 0
    takes) -> a RunHold; `.release()`; `.files`: the names in the folder that are the hold's, for
    outputs.check_output_dir(ignore=...); `.held`: True on the process that holds it.
    """

    def __init__(
        self,
        output_dir: Path,
        token: str | None = None,
        folder: _Folder | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / HOLD_FILE
        self.token = token
        self.held = token is not None
        self._folder = folder
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking ---------------------------------------------------------------------------------------------------

    @classmethod
    def take(
        cls,
        output_dir: Path,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        claim_stale_s: float = CLAIM_STALE_S,
    ) -> RunHold:
        """Holds `output_dir` (created with its parents if missing) for this process, or raises UserError naming
        the live holder. A stale hold is taken over with one warning. Starts the heartbeat."""
        output_dir = Path(output_dir)
        folder = _Folder(output_dir)
        token = uuid.uuid4().hex
        record = {
            **_machine(),
            "pid": os.getpid(),
            "started": _now_iso(),
            "token": token,
            "proc_start": (_read_proc_stat(os.getpid()) or (None, None))[1],
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        refusal = None
        try:
            for _ in range(ATTEMPTS):
                outcome = _Attempt(output_dir, folder, record, stale_after_s, claim_stale_s).run()
                if outcome is True:
                    refusal = None
                    break
                if isinstance(outcome, str):
                    refusal = outcome
                    break
                if isinstance(outcome, _Busy):
                    refusal = outcome.message
                    time.sleep(TAKEOVER_WAIT_S)
                else:
                    refusal = (
                        f"job.output_dir: {output_dir} is contended: other runs took and released it "
                        f"{ATTEMPTS} times while this one tried; wait for them, or choose another "
                        "job.output_dir"
                    )
        except OSError as error:
            folder.undo()
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):  # a full or failing disk, not a bad path
                raise write_failed(output_dir / HOLD_FILE, error) from None
            raise UserError(
                f"job.output_dir: cannot write the hold {output_dir / HOLD_FILE} ({error.strerror}); "
                "choose another job.output_dir"
            ) from None
        if refusal is not None:
            folder.undo()
            raise UserError(refusal)
        hold = cls(output_dir, token, folder, heartbeat_s)
        hold._thread = threading.Thread(target=hold._beat, name=f"hold-heartbeat {output_dir}", daemon=True)
        hold._thread.start()
        return hold

    @classmethod
    def for_run(cls, output_dir: Path, is_main: bool, **take_args) -> RunHold:
        """The hold for a whole run: `is_main` (global rank 0) takes it, then broadcasts the outcome over the
        initialised process group, so that on a refusal every rank raises the same UserError (only rank 0 prints
        it) and none waits for the others. The other ranks get a RunHold that holds nothing. Without a process
        group of more than one rank this is `take` (or nothing, for `is_main=False`)."""
        hold, error, message = None, None, None
        if is_main:
            try:
                hold = cls.take(output_dir, **take_args)
            except Exception as failure:  # noqa: BLE001 - any failure must reach the other ranks
                error = failure
                message = (
                    str(failure)
                    if isinstance(failure, UserError)
                    else (f"job.output_dir: rank 0 could not take the hold on {output_dir} ({failure!r})")
                )
        try:
            message = _broadcast_from_main(message)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        if error is not None:
            raise error
        if message is not None:
            raise UserError(message)
        return hold if hold is not None else cls(output_dir)

    # -- holding --------------------------------------------------------------------------------------------------

    @property
    def files(self) -> tuple[str, ...]:
        """The names in the output folder that belong to holds (ours, a racer's helper, a dead newcomer's)."""
        try:
            names = [entry.name for entry in os.scandir(self.output_dir) if is_hold_file(entry.name)]
        except OSError:
            names = []
        return tuple(sorted({HOLD_FILE, *names}))

    def _beat(self) -> None:
        failing = lost = False  # warn once per failure, and once when the hold is lost
        while not self._stop.wait(self._heartbeat_s):
            try:
                with open(self.path, "rb") as f:
                    seen = json.loads(f.read())
                    ours = isinstance(seen, dict) and seen.get("token") == self.token
                    if ours:
                        os.utime(f.fileno())  # "now", on NFS the server's clock
            except FileNotFoundError:
                ours, seen = False, None
            except (OSError, ValueError) as error:
                if not failing:
                    log.warning(
                        "hold %s: heartbeat failed (%s); retrying every %.0f s", self.path, error, self._heartbeat_s
                    )
                failing = True
                continue
            failing = False
            if not ours and not lost:
                holder = _Seen(seen, 0, "").describe() if isinstance(seen, dict) and "token" in seen else "nobody"
                log.warning(
                    "hold %s: lost, now held by %s; another run may write to %s", self.path, holder, self.output_dir
                )
            lost = not ours

    def release(self) -> None:
        """Stops the heartbeat and removes the hold if it still carries our token; a run that wrote nothing leaves
        the folder as it found it. Idempotent; a no-op on a RunHold that holds nothing."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        seen = _read_hold(self.path)
        if seen is not None and seen.record is not None and seen.record["token"] == self.token:
            self._folder.change(lambda: self.path.unlink(missing_ok=True))
        else:
            log.warning(
                "hold %s: not ours any more at release (%s); left as it is",
                self.path,
                seen.describe() if seen else "removed",
            )
        self._folder.undo()

    def __enter__(self) -> RunHold:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunHold({str(self.output_dir)!r}, held={self.held})"


def _broadcast_from_main(message: str | None) -> str | None:
    """Rank 0's message on every rank, where a process group of several ranks is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:
        return message
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class _Busy:
    """Another newcomer is taking over the stale hold (milliseconds): look again shortly, else refuse."""

    message: str


class _Attempt:
    """One try at taking the hold: True (held), a refusal message, _Busy, or None (the folder changed: again)."""

    def __init__(self, output_dir: Path, folder: _Folder, record: dict, stale_after_s: float, claim_stale_s: float):
        self.dir, self.folder, self.record = output_dir, folder, record
        self.hold = output_dir / HOLD_FILE
        self.tmp = output_dir / f"{HOLD_FILE}.new-{record['token']}"
        self.stale_after_s, self.claim_stale_s = stale_after_s, claim_stale_s

    def run(self) -> bool | str | _Busy | None:
        self.now = self.folder.change(self._write_tmp)  # its mtime: "now" on the clock that stamps the hold's
        try:
            if self._link(self.hold):
                return True
            seen = _read_hold(self.hold)
            if seen is None:
                return None  # released meanwhile
            stale, why = _judge(seen, self.now, self.stale_after_s)
            if not stale:
                return (
                    f"job.output_dir: {self.dir} is held by a live run ({seen.describe()}; {why}); wait for "
                    "it to end, stop it, or choose another job.output_dir"
                )
            return self._take_over(seen, why)
        finally:
            self.folder.change(lambda: self.tmp.unlink(missing_ok=True))

    def _write_tmp(self) -> float:
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, (json.dumps(self.record) + "\n").encode())
            os.fsync(fd)
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)

    def _link(self, target: Path) -> bool:
        """Links our record to `target`, atomically; False where the name exists."""
        try:
            self.folder.change(lambda: os.link(self.tmp, target))
            return True
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            return self._create_exclusive(target)  # a filesystem without hard links
        return self._ours(target)  # a lost NFS reply: EEXIST although our link was made (the name carries our token)

    def _ours(self, target: Path) -> bool:
        seen = _read_hold(target)
        return seen is not None and seen.key == self.record["token"]

    def _create_exclusive(self, target: Path) -> bool:
        try:
            fd = self.folder.change(lambda: os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self.record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, stale: _Seen, why: str) -> bool | str | _Busy | None:
        key = hashlib.sha256(stale.key.encode()).hexdigest()[:16]
        prefix = f"{HOLD_FILE}.takeover-{key}-"
        claims = sorted(
            (int(entry.name[len(prefix) :]), entry.name)
            for entry in os.scandir(self.dir)
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit()
        )
        if claims:
            last = _read_hold(self.dir / claims[-1][1])
            if last is not None and self.now - last.mtime <= self.claim_stale_s:
                return _Busy(
                    f"job.output_dir: {self.dir} is being taken over by another run ({last.describe()}) "
                    f"from a stale hold ({stale.describe()}); rerun to see which run holds it, or choose "
                    "another job.output_dir"
                )
        claim = self.dir / f"{prefix}{claims[-1][0] + 1 if claims else 1}"
        if not self._link(claim):
            return None  # another newcomer claimed it first: look again
        try:
            current = _read_hold(self.hold)
            if current is None or current.key != stale.key:
                return None  # it changed since we judged it
            try:  # replaces the stale hold atomically: the folder is never without a hold, so no one slips in
                self.folder.change(lambda: os.rename(self.tmp, self.hold))
            except FileNotFoundError:  # a lost NFS reply to a rename that worked
                if not self._ours(self.hold):
                    raise
            log.warning("job.output_dir: took over %s from a stale hold (%s): %s", self.dir, stale.describe(), why)
            return True
        finally:
            for path in (*(self.dir / name for _, name in claims), claim):
                self.folder.change(lambda path=path: path.unlink(missing_ok=True))
