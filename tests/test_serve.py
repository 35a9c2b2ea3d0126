"""The HTTP server: MMhops-R1 / Search-R1 request and response shapes field by field, /ask (whole and streamed),
bad requests (each a 4xx with a message), and a concurrent load over loopback against in-process search."""
import base64
import io
import json
import threading

import pytest
from fakes import HashTextEncoder, ScriptedGenerator, TinyImageEncoder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mmhops_lite.config import Config  # noqa: E402
from mmhops_lite.index import KnowledgeBase, MultimodalIndex, sync  # noqa: E402
from mmhops_lite.serve import Limits, Service, make_app  # noqa: E402

CFG = Config.resolve({"encoders.ocr": False}, env={})


@pytest.fixture
def index_dir(tiny_kb, tmp_path):
    sync(tmp_path / "idx", KnowledgeBase(tiny_kb), HashTextEncoder(), TinyImageEncoder(), progress=False)
    return tmp_path / "idx"


def _service(index_dir, replies=None, **kw):
    idx = MultimodalIndex(index_dir, HashTextEncoder(), TinyImageEncoder(), shared=True)
    make = (lambda: ScriptedGenerator(list(replies))) if replies is not None else None
    return Service(idx, CFG, make_generator=make, **kw)


@pytest.fixture
def client(index_dir):
    svc = _service(index_dir, replies=["<image_search>1</image_search>", "<text_search>Latveria capital</text_search>",
                                       "<answer>Doomstadt</answer>"])
    with TestClient(make_app(svc)) as c:
        yield c
    svc.close()


def b64(path, data_url=False) -> str:
    text = base64.b64encode(path.read_bytes()).decode()
    return "data:image/png;base64," + text if data_url else text


def test_retrieve_shapes_match_the_retrieval_api(client, index_dir):
    r = client.post("/retrieve", json={"queries": ["Sylport capital founded", "Latveria population"], "topk": 2,
                                       "return_scores": True})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    with MultimodalIndex(index_dir, HashTextEncoder(), TinyImageEncoder()) as idx:
        want = idx.search_texts(["Sylport capital founded", "Latveria population"], 2)
    for got_row, want_row in zip(body["result"], want):
        assert len(got_row) == 2
        for got, hit in zip(got_row, want_row):
            assert set(got) == {"document", "score"} and set(got["document"]) == {"id", "contents"}
            assert got["document"]["id"] == hit.passage.id
            title, text = got["document"]["contents"].split("\n", 1)
            assert (title, text) == (hit.passage.title, hit.passage.text)
            assert got["score"] == pytest.approx(hit.score)
    assert body["result"][0][0]["document"]["id"] == "p-sylport"
    # Without scores: bare documents; topk defaults to 3.
    bare = client.post("/retrieve", json={"queries": ["Sylport capital founded"]}).json()["result"][0]
    assert len(bare) == 3 and set(bare[0]) == {"id", "contents"} and bare[0]["id"] == "p-sylport"
    # A null topk (Search-R1's client default) means the default.
    assert len(client.post("/retrieve", json={"queries": ["Mudton"], "topk": None}).json()["result"][0]) == 3


def test_image_search_single_and_batch(client, tiny_kb):
    one = client.post("/image_search", json={"image_base64": b64(tiny_kb / "images" / "latveria.png"), "topk": 2})
    assert one.status_code == 200
    body = one.json()
    assert body["mode"] == "single" and set(body) == {"mode", "results", "records"}
    assert body["results"][0][0] == "Latveria" and body["results"][0][1] > 0.99 and len(body["results"]) == 2
    rec = body["records"][0]
    assert set(rec) == {"id", "title", "entity_id", "image_path", "score"}
    assert rec == {"id": "flag:latveria", "title": "Latveria", "entity_id": "p-latveria",
                   "image_path": "images/latveria.png", "score": body["results"][0][1]}
    batch = client.post("/image_search", json={"image_base64": [b64(tiny_kb / "images" / "genovia.png", True),
                                                                b64(tiny_kb / "images" / "wakanda.png")]}).json()
    assert batch["mode"] == "batch" and len(batch["results"]) == 2 and len(batch["records"]) == 2
    assert [row[0][0] for row in batch["results"]] == ["Genovia", "Wakanda"]
    assert len(batch["results"][0]) == 5  # topk defaults to 5
    assert batch["records"][1][0]["id"] == "flag:wakanda"


def test_local_paths_only_when_allowed(index_dir, tiny_kb):
    path = str(tiny_kb / "images" / "elbonia.png")
    svc = _service(index_dir)
    with TestClient(make_app(svc)) as c:
        r = c.post("/image_search", json={"image_paths": path})
        assert r.status_code == 403 and "--allow-local-paths" in r.json()["error"]
    svc.close()
    svc = _service(index_dir, allow_local_paths=True)
    with TestClient(make_app(svc)) as c:
        r = c.post("/image_search", json={"image_paths": [path], "topk": 1})
        assert r.status_code == 200 and r.json()["results"] == [[["Elbonia", pytest.approx(1.0, abs=1e-3)]]]
        assert c.post("/image_search", json={"image_paths": str(tiny_kb / "nope.png")}).status_code == 400
    svc.close()


def test_health(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "fake-hash-text" and h["dimension"] == 128
    assert h["entries"] == 40 and h["image_entries"] == 6 and h["image_model"] == "fake-tiny-image"


def test_ask_whole_and_streamed(index_dir, tiny_kb):
    replies = ["<image_search>1</image_search>", "<text_search>Latveria capital</text_search>",
               "<answer>Doomstadt</answer>"]
    svc = _service(index_dir, replies=replies * 2)
    with TestClient(make_app(svc)) as c:
        files = [("images", ("flag.png", (tiny_kb / "images" / "latveria.png").read_bytes(), "image/png"))]
        r = c.post("/ask", data={"question": "What is the capital of this country?"}, files=files)
        assert r.status_code == 200, r.text
        tr = r.json()
        assert tr["answer"] == "Doomstadt" and [h["action"] for h in tr["hops"]] == ["image_search", "text_search",
                                                                                    "answer"]
        assert tr["hops"][0]["results"][0]["title"] == "Latveria" and tr["images"] == ["image-1.png"]
        # Streamed: perception, then each hop as it happens, the answer, then the trace.
        with c.stream("POST", "/ask", data={"question": "What is the capital of this country?", "stream": "true"},
                      files=files) as s:
            assert s.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(x) for x in s.iter_lines() if x]
        assert [x["event"] for x in lines] == ["perception", "hop", "hop", "hop", "answer", "trace"]
        assert lines[1]["action"] == "image_search" and lines[-1]["trace"]["answer"] == "Doomstadt"
        assert lines[-2]["answer"] == "Doomstadt" and lines[0]["images"][0]["labels"] == [["flag", 0.9]]
    svc.close()


def test_ask_without_a_policy_is_501(index_dir):
    svc = _service(index_dir)
    with TestClient(make_app(svc)) as c:
        r = c.post("/ask", data={"question": "Which country is this?"})
        assert r.status_code == 501 and "--no-ask" in r.json()["error"]
    svc.close()


def _png_bytes(w, h) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_b64() -> str:
    """A valid PNG header that claims 20000x20000 pixels (400 MP): must be refused without decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


MALFORMED = [  # (method, path, kwargs, expected status)
    ("post", "/retrieve", {"content": b"{not json"}, 400),
    ("post", "/retrieve", {"content": b"\xff\xfe\x00"}, 400),
    ("post", "/retrieve", {"json": []}, 422),
    ("post", "/retrieve", {"json": {}}, 422),
    ("post", "/retrieve", {"json": {"queries": []}}, 422),
    ("post", "/retrieve", {"json": {"queries": "Paris"}}, 422),
    ("post", "/retrieve", {"json": {"queries": [""]}}, 422),
    ("post", "/retrieve", {"json": {"queries": [3]}}, 422),
    ("post", "/retrieve", {"json": {"queries": [None]}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "topk": 0}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "topk": 101}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "topk": "3"}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "topk": 2.5}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "topk": True}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["a"], "return_scores": "yes"}}, 422),
    ("post", "/retrieve", {"json": {"queries": ["x" * 2001]}}, 413),
    ("post", "/retrieve", {"json": {"queries": ["q"] * 257}}, 413),
    ("post", "/image_search", {"json": {}}, 422),
    ("post", "/image_search", {"json": {"image_base64": "AAAA", "image_paths": "/etc/passwd"}}, 422),
    ("post", "/image_search", {"json": {"image_base64": []}}, 422),
    ("post", "/image_search", {"json": {"image_base64": [1, 2]}}, 422),
    ("post", "/image_search", {"json": {"image_base64": "not base64 at all!"}}, 400),
    ("post", "/image_search", {"json": {"image_base64": base64.b64encode(b"hello, not an image").decode()}}, 400),
    ("post", "/image_search", {"json": {"image_base64": "data:image/png;base64," + _bomb_b64()}}, 413),
    ("post", "/image_search", {"json": {"image_base64": ["AAAA"] * 17}}, 413),
    ("post", "/image_search", {"json": {"image_paths": "/etc/passwd"}}, 403),
    ("post", "/image_search", {"json": {"image_base64": "AAAA", "topk": -1}}, 422),
    ("post", "/ask", {"data": {"question": ""}}, 422),
    ("post", "/ask", {"data": {"question": "x" * 5000}}, 422),
    ("post", "/ask", {"data": {}}, 415),
    ("post", "/ask", {"data": {"stream": "true"}, "files": [("images", ("a.png", b"x", "image/png"))]}, 422),
    ("post", "/ask", {"json": {"question": "hi", "image_base64": "@@@"}}, 400),
    ("post", "/ask", {"json": {"question": 5}}, 422),
    ("post", "/ask", {"content": b"question=hi", "headers": {"content-type": "text/plain"}}, 415),
    ("post", "/ask", {"data": {"question": "Which?"}, "files": [("images", ("a.png", b"GIF89a broken", "image/png"))]},
     400),
    ("post", "/ask", {"data": {"question": "Which?", "images": "not a file"}}, 422),
    ("post", "/retrieve", {"content": b"x" * 100, "headers": {"content-length": "99999999999"}}, 413),
    ("get", "/retrieve", {}, 405),
    ("post", "/nowhere", {"json": {}}, 404),
]


def test_every_malformed_request_gets_a_4xx_with_a_message(client):
    assert len(MALFORMED) >= 20
    for method, path, kw, status in MALFORMED:
        r = getattr(client, method)(path, **kw)
        assert r.status_code == status, (path, kw, r.status_code, r.text[:300])
        body = r.json()
        msg = body.get("error") or body.get("detail")
        assert isinstance(msg, str) and len(msg) > 5, (path, body)
    # ... and the server still answers.
    assert client.get("/health").status_code == 200


def test_body_over_the_limit_is_refused_while_streaming(index_dir):
    svc = _service(index_dir, limits=Limits(body_bytes=1000))
    with TestClient(make_app(svc)) as c:
        def chunks():
            for _ in range(10):
                yield b"x" * 500
        r = c.post("/retrieve", content=chunks())  # no Content-Length: counted as it arrives
        assert r.status_code == 413 and "over" in r.json()["error"]
    svc.close()


def test_pending_asks_are_bounded(index_dir):
    started, release = threading.Event(), threading.Event()

    def slow_asker(paths, question, index, on_event):
        started.set()
        release.wait(10)
        raise RuntimeError("stopped")

    svc = Service(MultimodalIndex(index_dir, HashTextEncoder(), TinyImageEncoder(), shared=True), CFG,
                  asker=slow_asker, limits=Limits(pending_asks=1))
    outcome = []

    def first():
        try:
            svc.ask([], "Which country is this?")
        except RuntimeError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(10)
    with TestClient(make_app(svc)) as c:
        r = c.post("/ask", data={"question": "And this one?"})
        assert r.status_code == 503 and "waiting" in r.json()["error"]
    release.set()
    t.join()
    assert outcome == ["stopped"]
    svc.close()


@pytest.mark.slow
def test_load_over_loopback_matches_in_process_search(index_dir):
    """8 clients x 500 requests against a real uvicorn server: no errors, every result equal to in-process search."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "bench" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    with MultimodalIndex(index_dir, HashTextEncoder(), TinyImageEncoder()) as idx:
        queries = [f"{w} capital population" for w in ("Sylport", "Latveria", "Mudton", "Genovia", "Topic 3")]
        want = {q: [h.passage.id for h in idx.search_text(q, 3)] for q in queries}
    svc = _service(index_dir)
    report = bench.load_test(make_app(svc), queries, want, clients=8, requests=500)
    svc.close()
    assert report["requests"] == 4000 and report["errors"] == 0 and report["mismatches"] == 0
    assert report["p99_ms"] >= report["p50_ms"] > 0
