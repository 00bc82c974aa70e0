"""The batch-denoise job's ledger under ``OUTPUT/_state``: what is done, what failed, which run owns OUTPUT.

    OUTPUT/_state/lease.json                                     the run that owns OUTPUT now
    OUTPUT/_state/done/<partition>/<item>-<recipe>.json          an item done: its manifest row
    OUTPUT/_state/errors/<partition>/<item>.json                 a failure that is retried next run
    OUTPUT/_state/errors/<partition>/<item>-<limits>.final.json  a failure kept while bytes and limits stay

``<item>`` is ``sha256(key)[:32]-sha256(bytes)[:16]``; ``<recipe>`` hashes the model version,
sampler and steps, so a new model or another K redoes an item; ``<limits>`` hashes the size
limits a final error was judged under, so raising them retries it. The task that finishes an
item writes its record whole (write-then-rename), after removing the key's other done records
in its partition (before its PNG is rewritten), so a key's one record there describes the PNG
there; the driver lists the records once before a run (what to skip, in any partition) and
merges the partition's records into
``manifest.parquet`` and ``errors.parquet`` at the end. Names starting with ``.`` (a killed
write's ``.tmp-*``, a record set aside as unreadable) are never read, and an unreadable
record is set aside with a warning instead of failing the merge.

The lease keeps two drivers off one OUTPUT at a time: created only if absent, renewed with
compare-and-swap while the run lasts and once more, synchronously, right before the merge,
taken over only once its holder stopped renewing it for longer than it promised, deleted at
the end. A run that could not renew it for that long counts it as lost, taken over or not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline.errors import PipelineError, TransientError, first_line
from pipeline.settings import Settings
from pipeline.storage import delete_if, fsspec_for, join, put_if, read_tagged, write_atomic

STATE = "_state"
LEASE = "lease.json"

MANIFEST_COLUMNS = ["key", "input_uri", "output_uri", "status", "height", "width", "bits", "seconds",
                    "psnr_in", "psnr_out", "ssim_in", "ssim_out", "sigma_in", "sigma_out", "reference_uri", "note",
                    "model_uri", "model_version", "sampler", "steps", "node", "checksum", "run_id", "finished_at",
                    "partition"]
ERROR_COLUMNS = ["key", "reason", "stage", "retry", "input_uri", "checksum", "max_megapixels", "max_image_mb",
                 "run_id", "finished_at", "partition"]


class LeaseHeld(PipelineError):
    """Another live run owns OUTPUT."""


class LeaseLost(TransientError):
    """This run's lease was taken over, or went unrenewed long enough that it may have been."""


# -- naming ------------------------------------------------------------------------


def key_hash(key: str) -> str:
    """Any key, surrogate-escaped bytes from a tar or a local file name included."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


_ESCAPED = re.compile("%(?=[0-9A-Fa-f]{2})|[\udc80-\udcff]")


def safe_key(key: str) -> str:
    """The key as valid UTF-8 (an S3 key, a Parquet string), one-to-one.

    Bytes that are not UTF-8 (which tar and the OS hand over as surrogate escapes) become
    ``%XX``, and a ``%`` that could be read as such an escape becomes ``%25``, so two keys
    never map to one. Other keys come back unchanged.
    """
    key.encode("utf-8", "surrogateescape")  # any other lone surrogate: UnicodeEncodeError
    return _ESCAPED.sub(lambda m: "%25" if m.group() == "%" else f"%{ord(m.group()) - 0xDC00:02X}", key)


def printable(text: str) -> str:
    """Free text (a reason, a URI) that survives UTF-8 whatever bytes it quotes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def item_name(key: str, checksum: str | None) -> str:
    return f"{key_hash(key)}-{(checksum or 'none')[:16]}"


def _tag(*parts) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:12]


def recipe_tag(*, model_uri: str, model_version: str, sampler: str, steps: int, self_ensemble: bool = False) -> str:
    """What a done item depends on besides its bytes: the model and how it was sampled.
    (``self_ensemble`` enters only when on, so the tags of earlier runs stay valid; its token names the
    per-call ensemble, so outputs of the earlier mean of whole sampler runs are redone.)"""
    return _tag(model_uri, model_version, sampler, steps, *(["self-ensemble-each-call"] if self_ensemble else []))


def limits_tag(*, max_megapixels: float, max_image_mb: float) -> str:
    """The limits a deterministic failure (too large, undecodable) was judged under."""
    return _tag(float(max_megapixels), float(max_image_mb))


def marker_path(output_root: str, kind: str, partition: str, name: str) -> str:
    return join(output_root, STATE, kind, partition, name)


# -- writing records (in the tasks) ---------------------------------------------------


def record_done(fs, output_root: str, *, partition: str, item: str, recipe: str, record: dict) -> None:
    write_atomic(fs, marker_path(output_root, "done", partition, f"{item}-{recipe}.json"),
                 json.dumps({c: record.get(c) for c in MANIFEST_COLUMNS}).encode())


def record_error(fs, output_root: str, *, partition: str, item: str, record: dict, limits: str | None) -> None:
    """``limits`` given: a final failure, kept (and skipped) while the bytes and the limits stay."""
    name = f"{item}-{limits}.final.json" if limits else f"{item}.json"
    write_atomic(fs, marker_path(output_root, "errors", partition, name),
                 json.dumps({c: record.get(c) for c in ERROR_COLUMNS}).encode())


def forget_done(fs, output_root: str, *, partition: str, names) -> None:
    """Remove done records before their key's PNG is rewritten.

    Interrupted after this, the key has no record and is redone; it never keeps a record of
    a PNG that was since replaced (model v1, then v2, then v1 again).
    """
    for name in names:
        try:
            fs.rm(marker_path(output_root, "done", partition, f"{name}.json"))
        except FileNotFoundError:
            pass


# -- reading records (in the driver) ---------------------------------------------------


@dataclass(frozen=True)
class StateIndex:
    """Record names already in OUTPUT/_state (every partition), and the tags this run judges by.

    ``done`` holds a done record only where it is its key's one record in its partition, the
    one that describes the PNG there; ``here`` maps key hashes to their done records in this
    run's partition (removed before the key's PNG is written again).
    """

    done: frozenset[str] = frozenset()
    final: frozenset[str] = frozenset()
    recipe: str = ""
    limits: str = ""
    here: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def skips(self, item: str) -> bool:
        """Done with this model/sampler/K, or failed for good under these limits."""
        return f"{item}-{self.recipe}" in self.done or f"{item}-{self.limits}" in self.final

    def records_of(self, key: str) -> tuple[str, ...]:
        return self.here.get(key_hash(key), ())


def _record_files(fs, base: str) -> list[str]:
    if not fs.isdir(base):
        return []
    return [p for p in fs.find(base) if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")]


def read_state_index(output: str, settings: Settings, *, recipe: str = "", limits: str = "",
                     partition: str | None = None) -> StateIndex:
    fs, root = fsspec_for(join(output, STATE), settings)
    by_key: dict[tuple[str, str], list[str]] = {}  # (partition, key hash) -> done record names
    for path in _record_files(fs, join(root, "done")):
        where, name = path.rsplit("/", 2)[-2:]
        by_key.setdefault((where, name.split("-", 1)[0]), []).append(name[: -len(".json")])
    # Several records of one key in a partition (left by an older version): which one the PNG
    # is cannot be told, so none of them skips.
    done = {names[0] for names in by_key.values() if len(names) == 1}
    here = {key: tuple(names) for (where, key), names in by_key.items() if where == partition}
    errors = [p.rsplit("/", 1)[-1] for p in _record_files(fs, join(root, "errors"))]
    final = {n[: -len(".final.json")] for n in errors if n.endswith(".final.json")}
    return StateIndex(frozenset(done), frozenset(final), recipe=recipe, limits=limits, here=here)


def read_records(fs, base: str, *, log: Callable[[str], None] = print) -> list[dict]:
    """Every record under ``base``; an unreadable one is set aside as ``.corrupt-<name>`` with a warning.

    Set aside, it is no longer in the index, so its item is redone by the next run.
    """
    paths = _record_files(fs, base)
    records = []
    for path, data in (fs.cat(paths, on_error="return") if paths else {}).items():
        try:
            if isinstance(data, FileNotFoundError):
                continue  # removed since the listing
            if isinstance(data, Exception):
                raise data
            record = json.loads(data)
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise ValueError("not a record object")
            records.append(record)
        except Exception as exc:  # truncated or foreign: one bad record must not stop every later merge
            parent, name = path.rsplit("/", 1)
            try:
                fs.mv(path, f"{parent}/.corrupt-{name}")
                where = f"set aside as .corrupt-{name}; its item is redone next run"
            except Exception as move_exc:
                where = f"could not set it aside ({type(move_exc).__name__})"
            log(f"warning: unreadable state record {path} ({first_line(exc)}); {where}")
    return records


def merge_state(*, output: str, out_root: str, partition: str, settings: Settings, run_id: str,
                log: Callable[[str], None] = print):
    """Rewrite ``out_root``/manifest.parquet and errors.parquet from the partition's records."""
    import pandas as pd

    fs, root = fsspec_for(output, settings)
    done = read_records(fs, join(root, STATE, "done", partition), log=log)
    manifest = pd.DataFrame(done, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values("finished_at").drop_duplicates("key", keep="last").sort_values("key")
    done_pairs = set(zip(manifest["key"], manifest["checksum"]))
    # Failures that are retried every run (no checksum, or transient) count only from this
    # run; a deterministic failure of the same bytes stays listed until the input changes.
    errors = [e for e in read_records(fs, join(root, STATE, "errors", partition), log=log)
              if (e.get("key"), e.get("checksum")) not in done_pairs
              and (e.get("run_id") == run_id or (e.get("checksum") and not e.get("retry")))]
    errors = pd.DataFrame(errors, columns=ERROR_COLUMNS)
    errors = errors.sort_values("finished_at").drop_duplicates(["key", "checksum"], keep="last").sort_values("key")
    _, out_path = fsspec_for(out_root, settings)
    for name, table in (("manifest.parquet", manifest), ("errors.parquet", errors)):
        buffer = io.BytesIO()
        table.reset_index(drop=True).to_parquet(buffer, index=False)
        write_atomic(fs, join(out_path, name), buffer.getvalue())
    return manifest.reset_index(drop=True), errors.reset_index(drop=True)


# -- the run lease ----------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunLease:
    """``OUTPUT/_state/lease.json``: held by one run, renewed while it runs, released at the end.

    Expiry is judged by the store's clock (the lease object's age), never by comparing two
    hosts' clocks: a lease whose holder has not renewed it for its ``ttl_s`` is stale and is
    taken over with a compare-and-swap, so of two runs that find it stale only one wins.
    """

    def __init__(self, output: str, settings: Settings, *, run_id: str, ttl_s: float, info: dict | None = None):
        self.uri, self.settings, self.run_id, self.ttl_s = join(output, STATE, LEASE), settings, run_id, ttl_s
        self.info = info or {}
        self.log: Callable[[str], None] = print
        self.tag: str | None = None
        self.lost: str | None = None
        self.renewed = time.monotonic()  # when the last successful write was sent
        self.started = _now()
        self.writes = 0  # makes every write's content (and so a local file's tag) differ
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the renewal thread and confirm() must not both swap one tag
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        renewed = dt.datetime.now(dt.timezone.utc)
        self.writes += 1
        return json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": self.started,
            "renewed_at": renewed.isoformat(timespec="seconds"), "ttl_s": self.ttl_s, "writes": self.writes,
            "expires_at": (renewed + dt.timedelta(seconds=self.ttl_s)).isoformat(timespec="seconds"), **self.info,
        }).encode()

    def acquire(self, *, log: Callable[[str], None] = print) -> "RunLease":
        """Create the lease, or take over a stale one; LeaseHeld when a live run holds it."""
        self.log = log
        self.renewed = time.monotonic()  # before any write, so never later than the store's date of it
        for _ in range(3):
            self.tag = put_if(self.uri, self._record(), self.settings, tag=None)
            if self.tag:
                return self
            current = read_tagged(self.uri, self.settings)
            if current is None:
                continue  # released in between: try to create it again
            data, tag, age = current
            try:
                holder = json.loads(data)
                ttl = float(holder["ttl_s"])
            except Exception:  # a lease nobody can read is judged by its age alone
                holder, ttl = {}, self.ttl_s
            if age <= ttl:
                raise LeaseHeld(
                    f"OUTPUT is in use by run {holder.get('run_id', '?')} on {holder.get('host', '?')} "
                    f"(pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}, renewed {age:.0f}s ago, "
                    f"stale after {ttl:.0f}s): {self.uri}; wait for it, or delete that object if the run is gone")
            self.tag = put_if(self.uri, self._record(), self.settings, tag=tag)
            if self.tag:
                log(f"lease: took over the stale lease of run {holder.get('run_id', '?')} "
                    f"(not renewed for {age:.0f}s)")
                return self
        raise LeaseHeld(f"OUTPUT's lease {self.uri} keeps changing hands; another run is starting there")

    def _overdue(self) -> bool:
        """Whether the lease is lost; it is once no renewal succeeded for ``ttl_s`` (by this host's clock).

        From then on another run may have found it stale and taken it over, even if the store
        cannot be asked (an outage), so this run no longer counts on it.
        """
        elapsed = time.monotonic() - self.renewed
        if not self.lost and self.tag is not None and elapsed > self.ttl_s:
            self.lost = (f"the lease {self.uri} was not renewed for {elapsed:.0f}s, longer than its "
                         f"{self.ttl_s:.0f}s ttl, so another run may have taken it over")
        return self.lost is not None

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost`` set) once another run holds it or it went unrenewed too long."""
        with self._lock:
            if self.tag is None or self._overdue():
                return False
            sent = time.monotonic()
            tag = put_if(self.uri, self._record(), self.settings, tag=self.tag)
            if tag is None:
                self.lost = f"the lease {self.uri} was taken over by another run"
                return False
            self.tag, self.renewed = tag, sent
            return True

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    break
            except Exception as exc:  # a store hiccup: try again at the next interval, while the ttl lasts
                if self._overdue():
                    break
                self.log(f"warning: could not renew the lease ({first_line(exc)}); retrying")
        if self.lost:
            self.log(f"error: {self.lost}; this run stops before merging")

    def check(self) -> None:
        """LeaseLost once the lease is lost: the run must stop before merging."""
        if self._overdue():
            raise LeaseLost(f"{self.lost}; this run stopped before merging (its finished items are recorded, "
                            f"and the next run skips them)")

    def confirm(self) -> None:
        """Renew now and wait for the answer, right before the merge; LeaseLost if the lease is not this run's.

        The renewal thread may be a whole outage behind: only a compare-and-swap that succeeds
        now shows that no other run took OUTPUT over meanwhile. Store errors are retried while
        the ttl lasts.
        """
        while True:
            try:
                self.renew()
                break
            except Exception as exc:
                if self._overdue():
                    break
                self.log(f"warning: could not renew the lease before merging ({first_line(exc)}); retrying")
                time.sleep(min(5.0, self.ttl_s / 8))
        self.check()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.tag and not self.lost:
            try:
                delete_if(self.uri, self.settings, tag=self.tag)
            except Exception as exc:  # it goes stale after ttl_s and is taken over then
                self.log(f"warning: could not release the lease {self.uri} ({first_line(exc)}); "
                         f"the next run may take it over once it is {self.ttl_s:.0f}s old")
        self.tag = None

    def __enter__(self) -> "RunLease":
        if self.tag is None:
            self.acquire()
        self._thread = threading.Thread(target=self._keep_renewing, daemon=True, name="lease")
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

