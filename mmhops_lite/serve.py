"""`mmhops-lite serve INDEX`: the on-disk index behind an HTTP API that MMhops-R1 / Search-R1 retrieval clients
already speak, plus our own `/ask`.

Endpoints (JSON in, JSON out; every bad request gets a 4xx with {"error": message}):

- `POST /retrieve` {"queries": [str], "topk": 3, "return_scores": false}
  -> {"result": [[{"document": {"id", "contents"}, "score"}, ...] per query]}, bare documents when return_scores
  is false. `contents` is the title on the first line, then the passage text.
- `POST /image_search` with exactly one of "image_paths" / "image_base64" (a string: mode "single", or a list:
  mode "batch"; base64 may be a data URL) and "topk" (5)
  -> {"mode", "results": [[title, score], ...], "records": [{"id", "title", "entity_id", "image_path", "score"}]};
  in batch mode `results` and `records` hold one such list per image. Local paths need --allow-local-paths.
- `GET /health` -> {"status", "model", "dimension", "entries", ...}
- `POST /ask` (multipart: `question`, zero or more `images` files, `stream`; or JSON: {"question", "image_base64":
  [...], "stream"}) -> the trace as JSON; with stream=true, one JSON object per line as each step happens
  (`perception`, `hop`..., `answer`, then `trace`).

One index and (on the first /ask) one policy are loaded per server and shared by all requests; index calls are
serialised by a lock (SQLite and hnswlib's query settings are per handle), policy generation by another.
"""

import base64
import binascii
import io
import json
import queue
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, MissingDependency, MmhopsError

# Request bounds: every request is refused (413/422) above them, before any work is done.
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_QUERIES = 256
MAX_QUERY_CHARS = 2_000
MAX_TOPK = 100
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_PENDING_ASKS = 4
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass
class Limits:
    """What one request may ask for; the server refuses more with a 4xx naming the bound."""

    body_bytes: int = MAX_BODY_BYTES
    queries: int = MAX_QUERIES
    query_chars: int = MAX_QUERY_CHARS
    topk: int = MAX_TOPK
    images: int = MAX_IMAGES
    image_bytes: int = MAX_IMAGE_BYTES
    pending_asks: int = MAX_PENDING_ASKS


class Refused(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SerialIndex:
    """An open MultimodalIndex whose searches run one at a time (requests arrive on many threads)."""

    def __init__(self, index):
        self._index, self._lock = index, threading.Lock()
        self.image_encoder, self.text_encoder = index.image_encoder, index.text_encoder

    def search_text(self, query, k=None):
        with self._lock:
            return self._index.search_text(query, k)

    def search_texts(self, queries, k=None):
        with self._lock:
            return self._index.search_texts(queries, k)

    def search_image(self, image, k=None):
        with self._lock:
            return self._index.search_image(image, k)

    def search_images(self, images, k=None):
        with self._lock:
            return self._index.search_images(images, k)

    def counts(self) -> dict:
        with self._lock:
            return {kind: self._index.store.count(kind) for kind in ("passages", "images")}

    @property
    def manifest(self) -> dict:
        return self._index.manifest

    def close(self) -> None:
        with self._lock:
            self._index.close()


class Service:
    """What the HTTP layer calls: the shared index, the policy (loaded on the first ask) and the request bounds."""

    def __init__(self, index, cfg, *, allow_local_paths: bool = False, limits: Limits | None = None,
                 make_generator=None, asker=None):
        self.index = index if isinstance(index, SerialIndex) else SerialIndex(index)
        self.cfg, self.allow_local_paths, self.limits = cfg, allow_local_paths, limits or Limits()
        self._make_generator, self._asker = make_generator, asker
        self._gen = None
        self._gen_lock = threading.Lock()  # one generation at a time: a llama.cpp context is not reentrant
        self._pending = threading.BoundedSemaphore(self.limits.pending_asks)

    # /health ------------------------------------------------------------------------------------------
    def health(self) -> dict:
        enc = self.index.manifest.get("encoders", {})
        counts = self.index.counts()
        text, image = enc.get("passages", {}), enc.get("images", {})
        return {"status": "ok", "model": text.get("id"), "dimension": text.get("dim"),
                "entries": counts["passages"], "image_model": image.get("id"), "image_dimension": image.get("dim"),
                "image_entries": counts["images"], "ask": self._asker is not None or self._make_generator is not None}

    # /retrieve ----------------------------------------------------------------------------------------
    def retrieve(self, body) -> dict:
        body = _object(body)
        queries = body.get("queries")
        if not isinstance(queries, list) or not queries:
            raise Refused(422, "'queries' must be a non-empty list of strings, e.g. {\"queries\": [\"Eiffel Tower\"]}")
        if len(queries) > self.limits.queries:
            raise Refused(413, f"{len(queries)} queries in one request; at most {self.limits.queries}: split the batch")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise Refused(422, f"queries[{i}] must be a non-empty string")
            if len(q) > self.limits.query_chars:
                raise Refused(413, f"queries[{i}] has {len(q)} characters; at most {self.limits.query_chars}")
        k = self._topk(body, 3)
        scores = body.get("return_scores", False)
        if not isinstance(scores, bool):
            raise Refused(422, "'return_scores' must be true or false")
        hits = self.index.search_texts(queries, k)
        result = []
        for row in hits:
            docs = [{"document": {"id": h.passage.id, "contents": f"{h.passage.title}\n{h.passage.text}"},
                     "score": h.score} for h in row]
            result.append(docs if scores else [d["document"] for d in docs])
        return {"result": result}

    # /image_search ------------------------------------------------------------------------------------
    def image_search(self, body) -> dict:
        body = _object(body)
        paths, b64 = body.get("image_paths"), body.get("image_base64")
        if (paths is None) == (b64 is None):
            raise Refused(422, "give exactly one of 'image_paths' and 'image_base64' (a string or a list)")
        given = paths if paths is not None else b64
        mode = "single" if isinstance(given, str) else "batch"
        items = [given] if mode == "single" else given
        field_name = "image_paths" if paths is not None else "image_base64"
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
            raise Refused(422, f"'{field_name}' must be a non-empty string or a non-empty list of strings")
        if len(items) > self.limits.images:
            raise Refused(413, f"{len(items)} images in one request; at most {self.limits.images}")
        k = self._topk(body, 5)
        if paths is not None and not self.allow_local_paths:
            raise Refused(403, "local image paths are refused by this server; send 'image_base64', or start it "
                               "with --allow-local-paths")
        images = [self._path_image(x, i) if paths is not None else self._b64_image(x, i) for i, x in enumerate(items)]
        found = self.index.search_images(images, k)
        results = [[[e.title, e.score] for e in row] for row in found]
        records = [[{"id": e.id, "title": e.title, "entity_id": e.passage_id, "image_path": e.path, "score": e.score}
                    for e in row] for row in found]
        if mode == "single":
            return {"mode": mode, "results": results[0], "records": records[0]}
        return {"mode": mode, "results": results, "records": records}

    def _topk(self, body: dict, default: int) -> int:
        k = body.get("topk", default)
        if k is None:
            return default
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.limits.topk:
            raise Refused(422, f"'topk' must be an integer from 1 to {self.limits.topk}, not {json.dumps(k)[:40]}")
        return k

    def _b64_image(self, text: str, i: int):
        if len(text) > self.limits.image_bytes * 4 // 3 + 100:
            raise Refused(413, f"image_base64[{i}] is over {self.limits.image_bytes // 2**20} MB")
        raw = _DATA_URL.sub("", text.strip(), count=1)
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, f"image_base64[{i}] is not valid base64 (a data URL 'data:image/png;base64,...' "
                               "or the bare base64 text)") from None
        return _decode_image(data, f"image_base64[{i}]")

    def _path_image(self, text: str, i: int):
        p = Path(text)
        if not p.is_file():
            raise Refused(400, f"image_paths[{i}]: {text[:200]} is not a file on the server")
        if p.stat().st_size > self.limits.image_bytes:
            raise Refused(413, f"image_paths[{i}] is over {self.limits.image_bytes // 2**20} MB")
        return _decode_image(p.read_bytes(), f"image_paths[{i}]")

    # /ask ---------------------------------------------------------------------------------------------
    def ask(self, images: list[tuple[str, bytes]], question: str, on_event=None):
        """Answer one question about uploaded images (name, bytes) with the shared index and policy: the Trace."""
        from .grammar import check_question

        if len(images) > self.limits.images:
            raise Refused(413, f"{len(images)} images in one request; at most {self.limits.images}")
        try:
            question = check_question(question)
        except InputError as exc:
            raise Refused(422, str(exc)) from None
        for i, (_, data) in enumerate(images):
            if len(data) > self.limits.image_bytes:
                raise Refused(413, f"images[{i}] is over {self.limits.image_bytes // 2**20} MB")
            _decode_image(data, f"images[{i}]")  # refused before the policy is touched
        if not self._pending.acquire(blocking=False):
            raise Refused(503, f"{self.limits.pending_asks} questions are already waiting; retry shortly")
        try:
            with tempfile.TemporaryDirectory(prefix="mmhops-ask-") as tmp:
                paths = []
                for i, (name, data) in enumerate(images):
                    suffix = Path(name or "").suffix.lower()
                    suffix = suffix if _SUFFIX.fullmatch(suffix) else ""
                    p = Path(tmp) / f"image-{i + 1}{suffix}"
                    p.write_bytes(data)
                    paths.append(p)
                with self._gen_lock:
                    if self._asker is not None:
                        return self._asker(paths, question, self.index, on_event)
                    return self._ask(paths, question, on_event)
        finally:
            self._pending.release()

    def preload(self) -> None:
        """Load the policy now rather than on the first /ask."""
        with self._gen_lock:
            self._policy()

    def _policy(self):
        if self._gen is None:
            if self._make_generator is None:
                raise Refused(501, "this server was started without a policy (--no-ask)")
            gen = self._make_generator()
            if hasattr(gen, "prime"):  # the system prompt's KV cache: loaded once here, reused by every ask
                from .grammar import system_prefix

                gen.prime(system_prefix(gen.render))
            self._gen = gen
        return self._gen

    def _ask(self, paths, question, on_event):
        from .api import ask_with

        self._policy()
        tr = ask_with(paths, question, self.cfg, self.index, self._gen, on_event=on_event)
        from dataclasses import replace

        return replace(tr, images=tuple(p.name for p in paths))

    def close(self) -> None:
        self.index.close()


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise Refused(422, "the request body must be a JSON object")
    return body


def _decode_image(data: bytes, label: str):
    """Bytes -> a decoded RGB PIL image, or Refused(400) naming the field; over-large images never decode."""
    from PIL import UnidentifiedImageError

    from .index.kb import open_image

    try:
        im = open_image(io.BytesIO(data), label)
        im.load()
        return im.convert("RGB")
    except InputError as exc:
        raise Refused(413, str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Refused(400, f"{label} is not a readable image ({type(exc).__name__}); send a JPEG or PNG") from None


# ------------------------------------------------------------------------------------------------ HTTP layer
def make_app(service: Service):
    """The FastAPI app over a Service (tests drive it with fastapi.testclient; `serve` runs it under uvicorn)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError as exc:
        raise MissingDependency("the server needs fastapi and uvicorn", fix="pip install 'mmhops-lite[serve]'") from exc

    app = FastAPI(title="mmhops-lite", description=__doc__, version="1")
    lim = service.limits

    def refuse(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    async def read_json(request: Request):
        raw = await _read_body(request, lim.body_bytes)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"the request body is not valid JSON ({exc})") from None

    async def call(fn, *args):
        try:
            return JSONResponse(await run_in_threadpool(fn, *args))
        except Refused as exc:
            return refuse(exc.status, exc.message)

    @app.exception_handler(Refused)
    async def _refused(request, exc: Refused):
        return refuse(exc.status, exc.message)

    @app.exception_handler(MmhopsError)
    async def _ours(request, exc: MmhopsError):
        return refuse(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # logged by uvicorn; the client gets one line, never a trace
        return refuse(500, f"internal error ({type(exc).__name__}); the server keeps running")

    @app.get("/health")
    async def health():
        return await call(service.health)

    @app.post("/retrieve")
    async def retrieve(request: Request):
        return await call(service.retrieve, await read_json(request))

    @app.post("/image_search")
    async def image_search(request: Request):
        return await call(service.image_search, await read_json(request))

    @app.post("/ask")
    async def ask(request: Request):
        raw = await _read_body(request, lim.body_bytes)  # bounded before any parser sees it
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            images, question, stream = _json_ask(raw, lim)
        elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            images, question, stream = await _form_ask(request, lim)
        else:
            raise Refused(415, "/ask takes a multipart form (question, images files, stream) or JSON "
                               '{"question", "image_base64": [...], "stream"}')
        stream = stream or request.query_params.get("stream", "").lower() in ("1", "true", "yes")
        if not stream:
            trace = await run_in_threadpool(service.ask, images, question)
            return JSONResponse(trace.to_dict())
        return StreamingResponse(_stream(service, images, question), media_type="application/x-ndjson")

    return app


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


def _json_ask(raw: bytes, lim: Limits):
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Refused(400, f"the request body is not valid JSON ({exc})") from None
    body = _object(body)
    question = body.get("question")
    if not isinstance(question, str):
        raise Refused(422, "'question' must be a string")
    given = body.get("image_base64", [])
    given = [given] if isinstance(given, str) else given
    if not isinstance(given, list) or not all(isinstance(x, str) and x for x in given):
        raise Refused(422, "'image_base64' must be a string or a list of strings")
    if len(given) > lim.images:
        raise Refused(413, f"{len(given)} images in one request; at most {lim.images}")
    images = []
    for i, text in enumerate(given):
        try:
            images.append((f"image-{i + 1}", base64.b64decode(_DATA_URL.sub("", text.strip(), count=1),
                                                              validate=True)))
        except (binascii.Error, ValueError):
            raise Refused(400, f"image_base64[{i}] is not valid base64") from None
    return images, question, _truthy(body.get("stream", False))


async def _form_ask(request, lim: Limits):
    try:
        form = await request.form(max_files=lim.images + 1, max_fields=8)
    except Exception as exc:  # noqa: BLE001 -- starlette raises several kinds for a malformed form
        raise Refused(400, f"/ask could not read the multipart form: {exc}") from None
    question = form.get("question")
    if not isinstance(question, str):
        raise Refused(422, "the form needs a 'question' text field")
    given = form.getlist("images")
    uploads = [f for f in given if not isinstance(f, str)]
    if len(given) != len(uploads):
        raise Refused(422, "'images' must be uploaded files (multipart), not text")
    if len(uploads) > lim.images:
        raise Refused(413, f"{len(uploads)} images in one request; at most {lim.images}")
    images = [(f.filename or "", await f.read()) for f in uploads]
    return images, question, _truthy(form.get("stream", False))


async def _read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` (a stated Content-Length is checked first)."""
    stated = request.headers.get("content-length")
    if stated is not None and (not stated.isdigit() or int(stated) > limit):
        raise Refused(413, f"the request body is over {limit // 2**20} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the request body is over {limit // 2**20} MB")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette reads the form from the cached body
    return body


def _event_json(kind: str, payload) -> dict:
    if kind == "perception":
        return {"event": "perception", "images": [{"text": p.text, "labels": [[str(n), float(v)] for n, v in p.labels],
                                                   "ocr": p.ocr} for p in payload]}
    if kind == "hop":
        return {"event": "hop", **payload.to_dict()}
    if kind == "answer":  # the loop's own end: the answer now, the whole trace (with timings) follows
        return {"event": "answer", "answer": payload.answer}
    return {"event": kind}


async def _stream(service: Service, images, question):
    """NDJSON: each event of the ask as it happens (perception, hop..., answer), then the trace (or {"event": "error"})."""
    import anyio

    events: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            tr = service.ask(images, question, on_event=lambda kind, p: events.put(_event_json(kind, p)))
            events.put({"event": "trace", "trace": tr.to_dict()})
        except Refused as exc:
            events.put({"event": "error", "status": exc.status, "error": exc.message})
        except Exception as exc:  # noqa: BLE001 -- the stream reports it and ends cleanly
            events.put({"event": "error", "status": 500, "error": f"{type(exc).__name__}: {exc}"})
        events.put(done)

    threading.Thread(target=work, daemon=True, name="mmhops-ask").start()
    while True:
        item = await anyio.to_thread.run_sync(events.get)
        if item is done:
            return
        yield (json.dumps(item, ensure_ascii=False) + "\n").encode()
