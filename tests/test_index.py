"""The on-disk index: build, search, add/remove, and every failure mode the foundation promises."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite.errors import IndexCorrupt, IndexLocked, InputError
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, remove, repair, sync, writer_lock
from mmhops_lite.index.store import Store


def build(kb, out, **kw):
    t, i = HashTextEncoder(), TinyImageEncoder()
    rep = sync(out, KnowledgeBase(kb), t, i, progress=False, **kw)
    return rep, t, i


def open_index(out):
    return MultimodalIndex(out, HashTextEncoder(), TinyImageEncoder())


def test_build_writes_manifest_and_searches(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    rep, t, i = build(tiny_kb, out)
    assert rep.added == {"passages": 40, "images": 6}
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"] == {"passages": 40, "images": 6, "triples": 6}
    assert man["encoders"]["passages"] == {"id": "fake-hash-text", "dim": 128}
    assert set(man["files"]) == {"passages", "images"}
    with open_index(out) as idx:
        hits = idx.search_text("Sylport capital founded", k=3)
        assert hits[0].passage.id == "p-sylport"
        ents = idx.search_image(tiny_kb / "images" / "latveria.png", k=2)
        assert ents[0].title == "Latveria" and ents[0].score > 0.99
        assert ents[0].passage_id == "p-latveria" and "Doomstadt" in ents[0].passage_head


def test_bm25_finds_rare_entity_names(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)
    with open_index(out) as idx:
        hits = idx.search_text("Birnin Zana")
        assert hits[0].title == "Birnin Zana" and hits[0].bm25_rank == 1
        # FTS5 syntax in user text is treated as words, never as a query operator.
        assert isinstance(idx.search_text('NEAR("x" AND * OR'), list)


def test_rebuild_reuses_unchanged_and_prunes(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)
    rows = [json.loads(x) for x in (tiny_kb / "passages.jsonl").read_text().splitlines()]
    rows[0]["text"] += " Changed."
    rows = rows[:-1]
    (tiny_kb / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep, t, _ = build(tiny_kb, out)
    assert rep.added["passages"] == 1 and rep.removed["passages"] == 1 and rep.reused["passages"] == 38
    assert t.encoded == 1
    with open_index(out) as idx:
        assert idx.manifest["counts"]["passages"] == 39


def test_add_and_remove(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "passages.jsonl").write_text(json.dumps(
        {"id": "p-new", "title": "Zembla", "text": "Zembla is a distant northern kingdom."}) + "\n")
    sync(out, KnowledgeBase(extra), HashTextEncoder(), None, prune=False, progress=False)
    with open_index(out) as idx:
        assert idx.manifest["counts"]["passages"] == 41
        assert idx.search_text("Zembla kingdom", k=1)[0].passage.id == "p-new"
    counts = remove(out, ["p-new", "flag:genovia"])
    assert counts == {"passages": 1, "images": 1}
    with open_index(out) as idx:
        assert idx.manifest["counts"] == {"passages": 40, "images": 5, "triples": 6}
        assert all(h.passage.id != "p-new" for h in idx.search_text("Zembla kingdom", k=5))
        assert all(e.title != "Genovia" for e in idx.search_image(tiny_kb / "images" / "genovia.png", k=5))


def test_truncated_graph_is_detected_and_repaired(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)
    graph = out / json.loads((out / "manifest.json").read_text())["files"]["passages"]["name"]
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorrupt) as err:
        open_index(out)
    assert graph.name in str(err.value) and "index repair" in str(err.value)
    repair(out)
    with open_index(out) as idx:
        assert idx.search_text("Sylport capital founded", k=1)[0].passage.id == "p-sylport"


def test_flipped_byte_fails_checksum(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)
    graph = out / json.loads((out / "manifest.json").read_text())["files"]["images"]["name"]
    data = bytearray(graph.read_bytes())
    data[-5] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(IndexCorrupt, match="checksum"):
        open_index(out)


def test_mismatched_encoder_is_refused(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)

    class Other(HashTextEncoder):
        id, dim = "other-encoder", 64

    with pytest.raises(IndexCorrupt, match="built with passages encoder fake-hash-text"):
        MultimodalIndex(out, Other(), None)
    with pytest.raises(IndexCorrupt, match="same encoder"):
        sync(out, KnowledgeBase(tiny_kb), Other(), TinyImageEncoder(), progress=False)


def test_a_write_stopped_before_its_store_update_still_opens(tiny_kb, tmp_path):
    """The manifest's rename is the commit point: a kill between it and the store's generation update leaves an
    index that opens and searches, and the next write publishes past both generations."""
    out = tmp_path / "idx"
    build(tiny_kb, out)
    s = Store(out / "store.sqlite")
    s.set_meta("generation", 0)
    s.commit()
    s.close()
    with open_index(out) as idx:
        assert idx.search_text("Paris", 1)
    assert repair(out)["generation"] == 2
    open_index(out).close()


def test_second_writer_is_refused(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mmhops_lite.index import writer_lock\n"
        "from pathlib import Path\n"
        "with writer_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)"), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IndexLocked, match="another process"):
            build(tiny_kb, out)
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock with the dead process: no stale lock file blocks the next writer.
    with writer_lock(out):
        pass


KILL_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
from fakes import HashTextEncoder, TinyImageEncoder
from mmhops_lite.config import IndexConfig
from mmhops_lite.index import KnowledgeBase, sync
sync(sys.argv[2], KnowledgeBase(sys.argv[1]), HashTextEncoder(delay=0.4), TinyImageEncoder(),
     IndexConfig(batch_size=4), progress=False)
"""


def test_kill_during_build_then_resume(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_kb), str(out), str(Path(__file__).parent)])
    store = out / "store.sqlite"
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline:
        if store.exists():
            try:
                s = Store(store, readonly=True)
                committed = s.count("passages")
                s.close()
            except Exception:
                committed = 0
        if committed >= 12:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 12 <= committed < 40, committed
    assert not (out / "manifest.json").exists()
    with pytest.raises(IndexCorrupt, match="resumes if you run it again"):
        open_index(out)
    s = Store(store, readonly=True)
    committed = s.count("passages")
    s.close()
    rep, t, i = build(tiny_kb, out)
    assert t.encoded == 40 - committed  # nothing committed is encoded twice
    assert rep.reused["passages"] == committed
    with open_index(out) as idx:
        assert idx.manifest["counts"]["passages"] == 40
        kb_ids = {json.loads(x)["id"] for x in (tiny_kb / "passages.jsonl").read_text().splitlines()}
        assert {p.id for p in idx.store.passages_by_label(sorted(idx.store.labels("passages"))).values()} == kb_ids
        assert idx.search_text("Wakanda", k=1)[0].passage.id == "p-wakanda"
        assert len(idx.vectors["passages"]) == 40


def test_bad_inputs_name_the_file(tiny_kb, tmp_path):
    (tiny_kb / "passages.jsonl").write_bytes(b'{"id": "a", "title": "A", "text": "caf\xe9"}\n')
    with pytest.raises(InputError) as err:
        KnowledgeBase(tiny_kb)
    assert "passages.jsonl:1" in str(err.value) and "UTF-8" in str(err.value)

    (tiny_kb / "passages.jsonl").write_text('{"id": "a", "title": "A", "text": "x"}\n{"id": "b", "title": "B"\n')
    with pytest.raises(InputError, match=r"passages.jsonl:2 is not valid JSON"):
        KnowledgeBase(tiny_kb)

    (tiny_kb / "passages.jsonl").write_text('{"id": "a", "title": "A"}\n')
    with pytest.raises(InputError, match="lacks the field"):
        KnowledgeBase(tiny_kb)

    (tiny_kb / "passages.jsonl").write_text('{"id": "a", "title": "A", "text": "x"}\n')
    (tiny_kb / "images" / "latveria.png").unlink()
    with pytest.raises(InputError) as err:
        KnowledgeBase(tiny_kb)
    assert "latveria.png" in str(err.value) and "does not exist" in str(err.value)

    (tiny_kb / "images" / "latveria.png").write_bytes(b"this is not a png")
    with pytest.raises(InputError) as err:
        KnowledgeBase(tiny_kb)
    assert "latveria.png" in str(err.value) and "not a readable image" in str(err.value)

    with pytest.raises(InputError, match="does not exist"):
        KnowledgeBase(tmp_path / "nope")


def test_reencode_replaces_only_the_changed_kind(tiny_kb, tmp_path):
    out = tmp_path / "idx"
    build(tiny_kb, out)

    class NewImages(TinyImageEncoder):
        id = "fake-tiny-image-v2"

        def encode_for_index(self, items, batch_size=32):  # index-side embedding may differ from queries'
            self.index_encoded = len(items)
            return self.encode(items)

    t, i = HashTextEncoder(), NewImages()
    rep = sync(out, KnowledgeBase(tiny_kb), t, i, progress=False, reencode=True)
    assert rep.added == {"passages": 0, "images": 6} and t.encoded == 0 and i.index_encoded == 6
    with MultimodalIndex(out, HashTextEncoder(), NewImages()) as idx:
        assert idx.manifest["encoders"]["images"]["id"] == "fake-tiny-image-v2"
        assert idx.search_image(tiny_kb / "images" / "wakanda.png", k=1)[0].title == "Wakanda"
