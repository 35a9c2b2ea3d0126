"""The fault suite: `kill -9` at every numbered point of index build, add, remove, publish and checkpoint save
(a subprocess per kill, see tests/fault_worker.py); a full disk on a graph, the store, the manifest and a
checkpoint; a reader querying while a writer adds and removes. After every fault: nothing committed is lost, the
next run resumes, and a reader gets a consistent index or a clear error, never a traceback.

Counts are printed at the end of each test (run with -s to see them) for the issue's report."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite import faults
from mmhops_lite.config import IndexConfig
from mmhops_lite.errors import IndexCorrupt, MmhopsError, WriteFailed
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, remove, repair, sync

pytestmark = pytest.mark.faults
WORKER = Path(__file__).parent / "fault_worker.py"
CFG = IndexConfig(batch_size=2)
MAX_KILLS = 40


def worker(*args, kill: str | None = None, trace: Path | None = None, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMHOPS_FAULT_")}
    if kill:
        env["MMHOPS_FAULT_KILL"] = kill
    if trace:
        env["MMHOPS_FAULT_TRACE"] = str(trace)
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def points_of(tmp_path: Path, scope: str, setup, *args) -> list[str]:
    """The names of an operation's kill points within a scope, from one traced run on a fresh copy."""
    trace = tmp_path / f"trace-{scope or 'all'}-{args[0]}.txt"
    setup()
    res = worker(*args, trace=trace)
    assert res.returncode == 0, res.stderr
    return [x for x in trace.read_text().splitlines() if x.startswith(scope)]


def kill_points(n: int) -> list[int]:
    """Every point when there are few, else MAX_KILLS spread evenly over them (always the first and last)."""
    if n <= MAX_KILLS:
        return list(range(1, n + 1))
    return sorted({round(1 + i * (n - 1) / (MAX_KILLS - 1)) for i in range(MAX_KILLS)})


def snapshot(index: Path) -> dict:
    """What a reader sees: record ids per kind and the top hits of fixed queries."""
    with MultimodalIndex(index, HashTextEncoder(), TinyImageEncoder()) as idx:
        out = {k: sorted(r[0] for r in idx.store.db.execute(f"SELECT id FROM {k}")) for k in ("passages", "images")}
        out["top"] = [[h.passage.id for h in idx.search_text(q, 3)] for q in ("Sylport capital", "filler 7", "item 3")]
        out["graph"] = {k: len(v) for k, v in idx.vectors.items()}
    return out


def reader_check(index: Path, must_open: bool, keep: set) -> str:
    """Open the index as a reader right after a kill: a consistent index, or a clear error."""
    try:
        with MultimodalIndex(index, HashTextEncoder(), TinyImageEncoder()) as idx:
            ids = {r[0] for r in idx.store.db.execute("SELECT id FROM passages")}
            missing = keep - ids
            assert not missing, f"committed passages lost: {sorted(missing)[:5]}"
            for h in idx.search_text("capital city", 5):  # every hit resolves to a live record
                assert idx.store.passage(h.passage.id) is not None
            return "opened"
    except MmhopsError as exc:
        assert not must_open, f"a reader could not open the index after the kill: {exc}"
        assert "\n" not in str(exc) and "Fix:" in str(exc)
        return "clear error"


@pytest.fixture
def kbs(tiny_kb, tmp_path):
    """The tiny KB, and a second KB of 24 new passages for `add`."""
    more = tmp_path / "more-kb"
    more.mkdir()
    rows = [{"id": f"item-{i}", "title": f"Item {i}", "text": f"Item {i} is number {i} in the added list."}
            for i in range(24)]
    (more / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_kb, more


def _ids(kb: Path) -> set:
    return {json.loads(x)["id"] for x in (kb / "passages.jsonl").read_text().splitlines() if x.strip()}


def _kill_each(tmp_path, name, scope, prepare, args, index, must_open, keep, resume, expected):
    """Kill the operation at each point; after each kill check the reader, resume, and compare with a clean run."""
    pts = points_of(tmp_path, scope, prepare, *args)
    chosen = kill_points(len(pts))
    outcomes = {}
    for k in chosen:
        prepare()
        res = worker(*args, kill=f"{scope}:{k}")
        assert res.returncode == -9, f"{name}: point {k} ({pts[k - 1]}) did not kill: {res.stderr[-500:]}"
        outcomes[pts[k - 1]] = reader_check(index, must_open, keep)
        resume()
        assert snapshot(expected[0]) == expected[1], f"{name}: resuming after point {k} ({pts[k - 1]}) differs"
    print(f"\n[faults] {name}: {len(pts)} points, {len(chosen)} killed, readers after kill: "
          f"{sorted(set(outcomes.values()))}, lost: nothing")
    return pts, chosen


def test_kill_anywhere_in_build_add_remove_and_publish(kbs, tmp_path):
    kb, more = kbs
    idx = tmp_path / "idx"
    clean = tmp_path / "clean"
    report = {}

    # build from nothing ------------------------------------------------------------------------------------
    sync(clean, KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), CFG, progress=False)
    want_built = snapshot(clean)

    def fresh():
        shutil.rmtree(idx, ignore_errors=True)

    def resume_build():
        sync(idx, KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), CFG, progress=False)

    report["build"] = _kill_each(tmp_path, "build", "", fresh, ("build", kb, idx), idx, False, set(), resume_build,
                                 (idx, want_built))

    # add to a built index ----------------------------------------------------------------------------------
    base = tmp_path / "base"
    shutil.copytree(clean, base)
    sync(clean, KnowledgeBase(more), HashTextEncoder(), TinyImageEncoder(), CFG, prune=False, progress=False)
    want_added = snapshot(clean)

    def from_base():
        shutil.rmtree(idx, ignore_errors=True)
        shutil.copytree(base, idx)

    def resume_add():
        sync(idx, KnowledgeBase(more), HashTextEncoder(), TinyImageEncoder(), CFG, prune=False, progress=False)

    report["add"] = _kill_each(tmp_path, "add", "", from_base, ("add", more, idx), idx, True, _ids(kb), resume_add,
                               (idx, want_added))

    # remove from a built index -----------------------------------------------------------------------------
    gone = sorted(_ids(kb))[:25]
    clean2 = tmp_path / "clean2"
    shutil.copytree(base, clean2)
    remove(clean2, gone, CFG)
    want_removed = snapshot(clean2)

    def resume_remove():
        remove(idx, gone, CFG)

    report["remove"] = _kill_each(tmp_path, "remove", "", from_base, ("remove", idx, *gone), idx, True,
                                  _ids(kb) - set(gone), resume_remove, (idx, want_removed))

    # publish, inside repair, add and remove ----------------------------------------------------------------
    pub = 0
    for name, args, resume, want in (("publish-repair", ("repair", idx), lambda: repair(idx, CFG), want_built),
                                     ("publish-add", ("add", more, idx), resume_add, want_added),
                                     ("publish-remove", ("remove", idx, *gone), resume_remove, want_removed)):
        keep = _ids(kb) - set(gone) if name == "publish-remove" else _ids(kb)
        pts, chosen = _kill_each(tmp_path, name, "publish", from_base, args, idx, True, keep, resume, (idx, want))
        pub += len(chosen)
    report["publish"] = (None, range(pub))
    for op in ("build", "add", "remove", "publish"):
        assert len(report[op][1]) >= 20, f"{op}: only {len(report[op][1])} kill points"


def test_kill_anywhere_in_checkpoint_save_resumes_from_the_last_checkpoint(tmp_path):
    run, steps = tmp_path / "run", 4
    clean = tmp_path / "clean"
    assert worker("train", clean, steps).returncode == 0
    want = [json.loads(x) for x in (clean / "log.jsonl").read_text().splitlines()]
    pts = points_of(tmp_path, "checkpoint", lambda: shutil.rmtree(run, ignore_errors=True), "train", run, steps)
    chosen = kill_points(len(pts))
    for k in chosen:
        shutil.rmtree(run, ignore_errors=True)
        res = worker("train", run, steps, kill=f"checkpoint:{k}")
        assert res.returncode == -9, res.stderr[-500:]
        done_saves = sum(1 for p in pts[:k - 1] if p.endswith("/swapped"))  # saves that reached their swap
        before = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        res = worker("train", run, steps)  # resume
        assert res.returncode == 0, res.stderr[-800:]
        after = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        assert after == want, f"point {k} ({pts[k - 1]}): the resumed run differs from an uninterrupted one"
        assert before[:done_saves] == want[:done_saves], "logged steps before the kill were lost"
        state = json.loads((run / "checkpoint" / "state.json").read_text())
        assert state["state"]["step"] == steps
    print(f"\n[faults] checkpoint save: {len(pts)} points, {len(chosen)} killed, resumed exactly each time")
    assert len(chosen) >= 20


# ------------------------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("target", ["passages-", "images-", "store.sqlite", "manifest.json"])
def test_disk_full_keeps_the_previous_index_in_use(kbs, tmp_path, monkeypatch, target):
    kb, more = kbs
    idx = tmp_path / "idx"
    sync(idx, KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), CFG, progress=False)
    before = snapshot(idx)
    files_before = sorted(p.name for p in idx.iterdir())
    monkeypatch.setattr(faults, "_ENOSPC", target)
    with pytest.raises(WriteFailed) as err:  # a publish writes every graph, the manifest and the store
        sync(idx, KnowledgeBase(more), HashTextEncoder(), TinyImageEncoder(), CFG, prune=False, progress=False)
    assert str(idx) in str(err.value) and "\n" not in str(err.value)
    after = snapshot(idx)
    assert after["graph"] == before["graph"]  # the previous generation's graphs are still what readers search
    assert set(before["passages"]) <= set(after["passages"])
    assert after["top"][:2] == before["top"][:2]
    assert not [p for p in idx.iterdir() if ".tmp-" in p.name], "a temporary file was left behind"
    assert set(files_before) <= {p.name for p in idx.iterdir()}
    monkeypatch.setattr(faults, "_ENOSPC", "")
    sync(idx, KnowledgeBase(more), HashTextEncoder(), TinyImageEncoder(), CFG, prune=False, progress=False)
    assert "item-3" in snapshot(idx)["passages"]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from mmhops_lite.train.checkpoint import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "checkpoint", net, opt, {"step": 1}, {})
    monkeypatch.setattr(faults, "_ENOSPC", "checkpoint")
    with pytest.raises(WriteFailed, match="checkpoint") as err:
        save_checkpoint(tmp_path / "checkpoint", net, opt, {"step": 2}, {})
    assert str(tmp_path) in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoint", net, opt) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_real_full_disk(kbs, tmp_path):
    """A 1 MB tmpfs (needs root and mount; skipped elsewhere): builds until the disk is full, then keeps serving."""
    kb, _ = kbs
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        idx = mnt / "idx"
        sync(idx, KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), CFG, progress=False)
        before = snapshot(idx)
        big = tmp_path / "big-kb"
        big.mkdir()
        rows = [{"id": f"big-{i}", "title": f"Big {i}", "text": "word " * 200 + str(i)} for i in range(3000)]
        (big / "passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(WriteFailed) as err:
            sync(idx, KnowledgeBase(big), HashTextEncoder(), TinyImageEncoder(), IndexConfig(batch_size=64),
                 prune=False, progress=False)
        assert str(idx) in str(err.value)
        after = snapshot(idx)
        assert after["graph"] == before["graph"] and after["top"][:2] == before["top"][:2]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------ readers beside a writer
def test_a_reader_querying_while_a_writer_adds_and_removes(kbs, tmp_path):
    kb, _ = kbs
    idx = tmp_path / "idx"
    sync(idx, KnowledgeBase(kb), HashTextEncoder(), TinyImageEncoder(), IndexConfig(), progress=False)
    rounds, per = 12, 90
    universe = _ids(kb) | {f"w{r}-{i}" for r in range(rounds) for i in range(per)}
    (tmp_path / "universe.json").write_text(json.dumps(sorted(universe)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMHOPS_FAULT_")}
    reader = subprocess.Popen([sys.executable, str(WORKER), "read", str(idx), "25", str(tmp_path / "universe.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    changed = 0
    try:
        for r in range(rounds):
            add = tmp_path / f"add-{r}"
            add.mkdir()
            rows = [{"id": f"w{r}-{i}", "title": f"Item {r} {i}", "text": f"Item {i} of round {r}, number {i % 9}."}
                    for i in range(per)]
            (add / "passages.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
            sync(idx, KnowledgeBase(add), HashTextEncoder(), TinyImageEncoder(), IndexConfig(), prune=False,
                 progress=False)
            changed += per
            if r:
                remove(idx, [f"w{r - 1}-{i}" for i in range(per)], IndexConfig())
                changed += per
            if reader.poll() is not None:
                break
    finally:
        out, errs = reader.communicate(timeout=120)
    assert reader.returncode == 0, errs[-800:]
    rep = json.loads(out)
    print(f"\n[faults] reader beside writer: {changed} items added or removed, {rep['opens']} opens, "
          f"{rep['queries']} hits checked, errors {len(rep['errors'])}")
    assert changed >= 1000
    assert rep["opens"] >= 10 and rep["queries"] > 0
    assert rep["errors"] == [] and rep["unknown_hits"] == 0


def test_a_crafted_store_path_is_refused(tiny_kb, tmp_path):
    idx = tmp_path / "idx"
    sync(idx, KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), CFG, progress=False)
    real = tmp_path / "elsewhere.sqlite"
    (idx / "store.sqlite").rename(real)
    (idx / "store.sqlite").symlink_to(real)
    with pytest.raises(IndexCorrupt, match="symbolic link"):
        MultimodalIndex(idx, HashTextEncoder(), TinyImageEncoder())
