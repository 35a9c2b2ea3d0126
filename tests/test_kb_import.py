"""kb import: MMhops-KB / Search-R1 shaped corpora become KB folders, streamed, resumable, with errors naming lines."""
import json

import pytest
from fakes import HashTextEncoder, TinyImageEncoder

from mmhops_lite.data import kb_import
from mmhops_lite.data.kb_import import import_kb
from mmhops_lite.errors import InputError
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tiny_kb, tmp_path):
    """The tiny KB rewritten in the MMhops-KB shape: contents with a quoted title line, integer ids, entity_ids."""
    src = tmp_path / "src"
    src.mkdir()
    rows = [json.loads(x) for x in (tiny_kb / "passages.jsonl").read_text().splitlines()]
    passages = [{"id": i, "contents": f"\"{r['title']}\"\n{r['text']}"} for i, r in enumerate(rows)]
    ims = [json.loads(x) for x in (tiny_kb / "images.jsonl").read_text().splitlines()]
    images = [{"entity_id": f"Q{i}", "title": im["title"], "image_path": im["path"]} for i, im in enumerate(ims)]
    return write_lines(src / "corpus.jsonl", passages), write_lines(src / "images.jsonl", images), tiny_kb, rows


def test_import_then_index_then_search(corpus, tmp_path):
    passages, images, root, rows = corpus
    rep = import_kb(tmp_path / "new-kb", passages, images, image_root=root)
    assert rep["files"]["passages"]["rows"] == len(rows) and rep["files"]["images"]["rows"] == 6
    kb = KnowledgeBase(tmp_path / "new-kb")  # validates every line and image
    assert kb.passages[0].id == "0" and kb.passages[0].title == rows[0]["title"] and kb.passages[0].text == rows[0]["text"]
    assert {im.title for im in kb.images} == {"Freedonia", "Sylvania", "Latveria", "Genovia", "Elbonia", "Wakanda"}
    assert all(not im.path.startswith("/") and (tmp_path / "new-kb" / im.path).is_file() for im in kb.images)
    sync(tmp_path / "idx", kb, HashTextEncoder(), TinyImageEncoder(), progress=False)
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), TinyImageEncoder()) as idx:
        assert idx.search_text("Sylport capital founded", 1)[0].passage.title == "Sylport"
        assert idx.search_image(root / "images" / "genovia.png", 1)[0].title == "Genovia"
    # Running it again with the same inputs is a no-op that returns the same report.
    assert import_kb(tmp_path / "new-kb", passages, images, image_root=root) == rep


def test_malformed_line_is_named_and_skip_bad_lists_it(corpus, tmp_path):
    passages, _, _, rows = corpus
    lines = passages.read_text().splitlines()
    lines[3] = '{"id": 3, "contents": '  # torn JSON on line 4
    lines.insert(6, '{"id": 1, "contents": "\\"Dup\\"\\ntext"}')  # repeats id 1 on line 7
    lines.insert(9, '["not", "an", "object"]')
    lines.insert(11, '{"contents": "\\"No id\\"\\ntext"}')
    write_lines(passages, lines)
    with pytest.raises(InputError) as e:
        import_kb(tmp_path / "new-kb", passages)
    assert f"{passages}:4 is not valid JSON" in str(e.value) and "--skip-bad" in str(e.value)
    rep = import_kb(tmp_path / "new-kb", passages, skip_bad=True)
    listed = rep["files"]["passages"]["skipped_lines"]
    assert rep["files"]["passages"]["skipped"] == 4
    assert [x.split(":")[0] for x in listed] == ["4", "7", "10", "12"]
    assert "repeats id '1'" in listed[1] and "not a JSON object" in listed[2] and "lacks an 'id'" in listed[3]
    assert len(KnowledgeBase(tmp_path / "new-kb").passages) == len(rows) - 1


def test_missing_image_is_named(corpus, tmp_path):
    _, images, root, _ = corpus
    write_lines(images, images.read_text().splitlines() + [json.dumps({"id": "x", "title": "X",
                                                                      "image_path": "images/none.png"})])
    with pytest.raises(InputError, match=r"images.jsonl:7 names image .*none.png, which does not exist"):
        import_kb(tmp_path / "new-kb", images=images, image_root=root)


def test_interrupted_import_resumes_from_its_checkpoint(corpus, tmp_path, monkeypatch):
    passages, _, _, rows = corpus
    whole = import_kb(tmp_path / "whole", passages)
    monkeypatch.setattr(kb_import, "CHECKPOINT_LINES", 10)
    seen = []
    real = kb_import.passage_row

    def dies_at_25(obj):
        seen.append(obj["id"])
        if len(seen) == 25:
            raise KeyboardInterrupt  # as if the process were stopped mid-file
        return real(obj)

    monkeypatch.setattr(kb_import, "passage_row", dies_at_25)
    with pytest.raises(KeyboardInterrupt):
        import_kb(tmp_path / "new-kb", passages)
    assert not (tmp_path / "new-kb" / "passages.jsonl").exists()  # nothing half-written is published
    seen.clear()
    monkeypatch.setattr(kb_import, "passage_row", lambda obj: (seen.append(obj["id"]), real(obj))[1])
    rep = import_kb(tmp_path / "new-kb", passages)
    assert seen[0] == 20 and len(seen) == len(rows) - 20  # resumed at the last checkpoint (line 20)
    assert (tmp_path / "new-kb" / "passages.jsonl").read_bytes() == (tmp_path / "whole" / "passages.jsonl").read_bytes()
    assert rep["files"] == whole["files"]


def test_a_foreign_folder_is_refused_untouched(corpus, tiny_kb):
    passages, *_ = corpus
    before = (tiny_kb / "passages.jsonl").read_bytes()
    with pytest.raises(InputError, match="not written by kb import"):
        import_kb(tiny_kb, passages)
    assert (tiny_kb / "passages.jsonl").read_bytes() == before


@pytest.mark.slow
def test_a_100k_line_corpus_with_malformed_lines_imports_and_indexes(tmp_path):
    words = ["river", "castle", "planet", "bridge", "tower", "comet", "valley", "harbour", "forest", "crater"]
    bad = {1_234: "{broken", 50_001: '{"id": "p500", "contents": "\\"Dup\\"\\nx"}', 99_999: '{"contents": 5}'}
    rows = []
    for n in range(1, 100_004):
        if n in bad:
            rows.append(bad[n])
            continue
        i = len(rows)
        rows.append(json.dumps({"id": f"p{i}", "contents": f"\"Entity {i}\"\nEntity {i} is a {words[i % 10]} "
                                                            f"first recorded in {1000 + i % 900}."}))
    src = write_lines(tmp_path / "corpus.jsonl", rows)
    with pytest.raises(InputError, match=r"corpus.jsonl:1234 is not valid JSON"):
        import_kb(tmp_path / "new-kb", src)
    rep = import_kb(tmp_path / "new-kb", src, skip_bad=True)["files"]["passages"]
    assert rep["rows"] == 100_000 and rep["skipped"] == 3
    assert [x.split(":")[0] for x in rep["skipped_lines"]] == ["1234", "50001", "99999"]
    kb = KnowledgeBase(tmp_path / "new-kb")
    sync(tmp_path / "idx", kb, HashTextEncoder(), None, progress=False)
    with MultimodalIndex(tmp_path / "idx", HashTextEncoder(), None) as idx:
        assert idx.info()["counts"]["passages"] == 100_000
        assert idx.search_text("Entity 77777", 1)[0].passage.id == "p77777"
