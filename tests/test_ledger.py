"""The batch-denoise ledger: key naming, the state index, unreadable records, and OUTPUT's run lease on a
local folder, a moto S3 server and (marked ``stack``) the real SeaweedFS."""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipeline.ledger as ledger
from pipeline.ledger import (
    LEASE,
    STATE,
    LeaseHeld,
    LeaseLost,
    RunLease,
    item_name,
    key_hash,
    limits_tag,
    merge_state,
    read_state_index,
    recipe_tag,
    record_done,
    record_error,
    safe_key,
)
from pipeline.settings import Settings
from pipeline.storage import fsspec_for, join, put_if, read_tagged
from tests.test_storage import moto_settings  # noqa: F401  (the moto server fixture)

SETTINGS = Settings()
# Text as tar and the OS hand it over: any code point but lone surrogates, plus escaped bytes.
KEYS = st.text(st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(["\udcff", "\udc80", "%"])))


@given(KEYS, KEYS)
def test_safe_keys_are_utf8_and_one_to_one(a, b):
    for key in (a, b):
        safe_key(key).encode("utf-8")  # never raises
        assert len(key_hash(key)) == 32
    assert (safe_key(a) == safe_key(b)) == (a == b)


def test_safe_key_escapes_only_what_needs_it():
    assert safe_key("night.tar/sub/a b.png") == "night.tar/sub/a b.png"
    assert safe_key("n.tar/\udcff.png") == "n.tar/%FF.png"
    assert safe_key("n.tar/%FF.png") == "n.tar/%25FF.png" and safe_key("100%.png") == "100%.png"
    with pytest.raises(UnicodeError):
        safe_key("\ud800.png")  # not something a tar or a file name can hold


def test_skip_tags_change_with_model_sampler_steps_and_limits():
    base = {"model_uri": "models:/d/1", "model_version": "1", "sampler": "improved", "steps": 10}
    tags = {recipe_tag(**base)} | {recipe_tag(**{**base, k: v}) for k, v in
                                   (("model_uri", "models:/d/2"), ("model_version", "2"), ("sampler", "origin"),
                                    ("steps", 4), ("self_ensemble", True))}
    assert len(tags) == 6
    assert recipe_tag(**base) == recipe_tag(**base, self_ensemble=False)  # earlier runs' records stay valid
    assert limits_tag(max_megapixels=100, max_image_mb=1024) == limits_tag(max_megapixels=100.0, max_image_mb=1024.0)
    assert limits_tag(max_megapixels=100, max_image_mb=1024) != limits_tag(max_megapixels=200, max_image_mb=1024)


def test_index_and_merge_ignore_temporaries_and_set_aside_an_unreadable_record(tmp_path):
    fs, root = fsspec_for(str(tmp_path), SETTINGS)
    a, b, c, x = (item_name(key, "c") for key in ("a.png", "b.png", "c.png", "x.png"))
    for key, item in (("a.png", a), ("b.png", b)):
        record_done(fs, root, partition="p", item=item, recipe="r1",
                    record={"key": key, "checksum": "c", "finished_at": "2024-01-01T00:00:00", "run_id": "r"})
    record_error(fs, root, partition="p", item=c, limits="L1",
                 record={"key": "c.png", "checksum": "c", "retry": False, "finished_at": "2024-01-01", "run_id": "r"})
    done_dir = tmp_path / STATE / "done" / "p"
    (done_dir / f".tmp-0123-{x}-r1.json").write_text('{"key": "x.png"')  # a killed write
    (done_dir / f"{b}-r1.json").write_text('{"key": "b.png", "chec')  # truncated
    index = read_state_index(str(tmp_path), SETTINGS, recipe="r1", limits="L1")
    assert index.skips(a) and index.skips(c) and not index.skips(x)
    assert not read_state_index(str(tmp_path), SETTINGS, recipe="r2", limits="L2").skips(c)

    lines = []
    manifest, errors = merge_state(output=str(tmp_path), out_root=str(tmp_path), partition="p", settings=SETTINGS,
                                   run_id="r", log=lines.append)
    assert list(manifest["key"]) == ["a.png"] and list(errors["key"]) == ["c.png"]
    [warning] = lines
    assert warning.startswith("warning: unreadable state record") and f"{b}-r1.json" in warning
    assert (done_dir / f".corrupt-{b}-r1.json").exists()
    # Set aside, the record no longer counts: its item is redone, and the next merge is quiet.
    assert not read_state_index(str(tmp_path), SETTINGS, recipe="r1").skips(b)
    merge_state(output=str(tmp_path), out_root=str(tmp_path), partition="p", settings=SETTINGS, run_id="r",
                log=lines.append)
    assert len(lines) == 1


def test_only_a_keys_one_record_in_a_partition_skips_and_a_rerun_removes_the_others_first(tmp_path):
    """Records of two recipes for one key in one partition (an older version wrote v1, v2, then left
    both): the PNG there is one of them, so neither skips; the key's records there are what a redo
    removes before writing the PNG."""
    fs, root = fsspec_for(str(tmp_path), SETTINGS)
    a_old, a_new, b = item_name("a.png", "old"), item_name("a.png", "new"), item_name("b.png", "b")
    for item, recipe, partition in ((a_old, "v1", "p"), (a_new, "v2", "p"), (b, "v1", "p"), (b, "v1", "q")):
        record_done(fs, root, partition=partition, item=item, recipe=recipe, record={"key": "k"})
    index = read_state_index(str(tmp_path), SETTINGS, recipe="v1", partition="p")
    assert not index.skips(a_old) and not index.skips(a_new) and index.skips(b)
    assert sorted(index.records_of("a.png")) == sorted([f"{a_old}-v1", f"{a_new}-v2"])
    assert index.records_of("c.png") == () and not read_state_index(str(tmp_path), SETTINGS).here

    ledger.forget_done(fs, root, partition="p", names=[*index.records_of("a.png"), "gone-already"])
    assert sorted(p.name for p in (tmp_path / STATE / "done" / "p").iterdir()) == [f"{b}-v1.json"]
    assert (tmp_path / STATE / "done" / "q" / f"{b}-v1.json").exists()  # another partition's PNG is not touched


@pytest.fixture(params=["local", "moto", pytest.param("seaweedfs", marks=pytest.mark.stack)])
def lease_output(request, tmp_path):
    """An OUTPUT for each kind of store, with the settings that reach it."""
    if request.param == "local":
        return str(tmp_path / "out"), SETTINGS
    if request.param == "moto":
        settings = request.getfixturevalue("moto_settings")
        return f"s3://unit/lease-{tmp_path.name}", settings
    settings = request.getfixturevalue("settings")
    return request.getfixturevalue("s3_prefix"), settings


def age_lease(output: str, settings, seconds: float) -> None:
    """Make the lease look ``seconds`` old (a local file's mtime; S3 lets nobody backdate an object)."""
    path = join(output, STATE, LEASE)
    if output.startswith("s3://"):
        time.sleep(seconds)
    else:
        past = time.time() - seconds
        os.utime(path, (past, past))


def test_a_live_lease_refuses_a_second_run_and_a_stale_one_is_taken_over(lease_output):
    output, settings = lease_output
    first = RunLease(output, settings, run_id="run-1", ttl_s=2, info={"partition": "2024-05-01"}).acquire()
    holder = json.loads(read_tagged(join(output, STATE, LEASE), settings)[0])
    assert holder["run_id"] == "run-1" and holder["partition"] == "2024-05-01" and holder["ttl_s"] == 2
    with pytest.raises(LeaseHeld, match=r"OUTPUT is in use by run run-1 on .*renewed \d+s ago") as held:
        RunLease(output, settings, run_id="run-2", ttl_s=2).acquire()
    assert "\n" not in str(held.value)
    tag = first.tag
    assert first.renew() and first.tag != tag

    age_lease(output, settings, 3.5)  # run-1 stopped renewing (killed) for longer than it promised
    lines = []
    second = RunLease(output, settings, run_id="run-2", ttl_s=60).acquire(log=lines.append)
    assert lines == [lines[0]] and "took over the stale lease of run run-1" in lines[0]
    assert not first.renew() and "taken" in first.lost  # taken over (or, 3.5s unrenewed, may have been)
    with pytest.raises(LeaseLost):
        first.check()
    first.release()  # must not delete run-2's lease
    assert json.loads(read_tagged(join(output, STATE, LEASE), settings)[0])["run_id"] == "run-2"
    second.release()
    assert read_tagged(join(output, STATE, LEASE), settings) is None
    RunLease(output, settings, run_id="run-3", ttl_s=60).acquire().release()


def test_the_lease_is_renewed_while_the_run_lasts_and_released_on_failure(tmp_path):
    output = str(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with RunLease(output, SETTINGS, run_id="run-1", ttl_s=0.6).acquire() as lease:
            tags = {lease.tag}
            for _ in range(20):
                time.sleep(0.05)
                tags.add(lease.tag)
            raise RuntimeError("boom")
    assert len(tags) >= 3  # renewed every ttl/4
    assert read_tagged(join(output, STATE, LEASE), SETTINGS) is None


def test_a_takeover_the_renewal_thread_has_not_seen_is_caught_by_the_renewal_before_the_merge(lease_output):
    output, settings = lease_output
    uri = join(output, STATE, LEASE)
    first = RunLease(output, settings, run_id="run-1", ttl_s=60).acquire()
    _, tag, _ = read_tagged(uri, settings)
    assert put_if(uri, json.dumps({"run_id": "run-2", "ttl_s": 60}).encode(), settings, tag=tag)  # run-2 took over
    first.check()  # nothing renewed since: the run cannot know yet
    with pytest.raises(LeaseLost, match=r"^the lease .* was taken over by another run; this run stopped before "
                                        r"merging \(its finished items are recorded"):
        first.confirm()
    first.release()
    assert json.loads(read_tagged(uri, settings)[0])["run_id"] == "run-2"


def test_a_run_that_could_not_renew_for_its_ttl_has_lost_its_lease_even_if_nobody_took_it(lease_output,
                                                                                          monkeypatch):
    """An S3 outage longer than the ttl: another run may have taken over meanwhile, so once the
    store is back, the run still stops before merging, and leaves the lease to expire."""
    output, settings = lease_output
    lines = []

    def outage(*args, **kwargs):
        raise ConnectionError("store unreachable")

    with RunLease(output, settings, run_id="run-1", ttl_s=1).acquire(log=lines.append) as lease:
        with monkeypatch.context() as store_down:
            store_down.setattr(ledger, "put_if", outage)
            time.sleep(1.5)  # renewals every 0.25s, all failing
        with pytest.raises(LeaseLost, match=r"^the lease .* was not renewed for \ds, longer than its 1s ttl, so "
                                            r"another run may have taken it over; this run stopped before merging"):
            lease.confirm()
    assert lines[0] == "warning: could not renew the lease (ConnectionError: store unreachable); retrying"
    assert lines[-1].startswith("error: the lease ") and lines[-1].endswith("; this run stops before merging")
    assert json.loads(read_tagged(join(output, STATE, LEASE), settings)[0])["run_id"] == "run-1"  # left to expire
    age_lease(output, settings, 2)  # S3 dates objects to the second
    taken = []
    RunLease(output, settings, run_id="run-2", ttl_s=60).acquire(log=taken.append).release()
    assert "took over the stale lease of run run-1" in taken[0]
