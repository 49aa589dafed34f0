"""tools/serve.py: the JSON API, the image route, its refusals, concurrency and the request log.

One smoke model (1 epoch) and a catalog of its synthetic images are built once per session
(tests/test_browser.py uses them too). API tests run in process through FastAPI's TestClient;
path traversal, concurrency and the log are tested against tools/serve.py started as a real
server on 127.0.0.1 (http.client sends request targets exactly as written, `..` included).
All traffic goes to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import single_gpu
from support.config import parse_config
from datautils import synthetic_root
from tools import serve
from tools.api import load_retriever
from tools.catalog import read_catalog, search_index

ROOT = Path(__file__).resolve().parents[1]
SERVER_EXTRAS = [name for name in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(name) is None]
needs_server = pytest.mark.skipif(bool(SERVER_EXTRAS), reason=f"{', '.join(SERVER_EXTRAS)} not installed "
                                                               "(pip install fastapi uvicorn httpx)")
SECRET = b"\xff\xd8\xff secret bytes outside the images folder"
ACCESS_LINE = re.compile(r"serve\.access (\S+) (\S+) (\S+) (\S+) (\d+\.\d) ms$")


# ------------------------------------------------------------------------------------------
# Shared with tests/test_browser.py: the catalog and a server process


def build_catalog(base: Path) -> SimpleNamespace:
    """A smoke snapshot and a catalog folder OUT of all its synthetic images, built once under `base`.

    OUT is what tools/embed.py writes: embeddings.npy (L2-normalised float32 rows of
    tools.api's embed), paths.txt (relative to IMAGES) and meta.json. Beside IMAGES lies a file
    that must never be served, and inside it links to that file and to its folder.
    """
    ready = base / "catalog.json"
    if ready.is_file():
        return SimpleNamespace(**{key: Path(value) for key, value in json.loads(ready.read_text()).items()})
    base.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(["1", "1", "--config", str(ROOT / "configs" / "smoke.toml"), "--out_dir", str(base / "run"),
                        "--synthetic_dir", str(base / "synthetic"), "--synthetic_size", "64"])
    assert single_gpu.main(cfg) == 0
    snapshot = base / "run" / "snapshot.pt"
    images = synthetic_root(cfg) / "Img"
    files = sorted(images.rglob("*.jpg"))
    retriever = load_retriever(snapshot, device="cpu")
    vectors = retriever.embed([str(file) for file in files]).numpy().astype(np.float32)
    out = base / "catalog"
    out.mkdir()
    np.save(out / "embeddings.npy", vectors)
    (out / "paths.txt").write_text("".join(f"{file.relative_to(images).as_posix()}\n" for file in files))
    (out / "meta.json").write_text(json.dumps({
        "fingerprint": retriever.fingerprint, "dim": int(vectors.shape[1]), "count": len(files),
        "dtype": "float32", "preprocess": retriever.model.preprocess.as_dict(), "images": str(images)}))
    outside = images.parent / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(SECRET)
    (images.parent / "secret.jpg").write_bytes(SECRET)
    (images / "linked").symlink_to(outside, target_is_directory=True)
    (images / "img" / "evil.jpg").symlink_to(outside / "secret.jpg")
    (images / "alias.jpg").symlink_to(files[0])  # a link that stays inside IMAGES is served
    paths = {"snapshot": snapshot, "out": out, "images": images, "query": files[0], "outside": outside}
    ready.write_text(json.dumps({key: str(value) for key, value in paths.items()}))
    return SimpleNamespace(**paths)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    """One request to 127.0.0.1:port with the target sent verbatim; (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


class Server:
    """tools/serve.py in a subprocess on 127.0.0.1 and a free port, its output in a log file."""

    def __init__(self, catalog: SimpleNamespace, log_path: Path, *flags: str, startup_s: float = 120) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tools" / "serve.py"), str(catalog.snapshot), "--index", str(catalog.out),
                 "--images", str(catalog.images), "--port", str(self.port), "--device", "cpu", *flags],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + startup_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"tools/serve.py exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if fetch(self.port, "GET", "/api/info", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"tools/serve.py did not answer within {startup_s} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[tuple[str, ...]]:
        return [match.groups() for line in self.log().splitlines() if (match := ACCESS_LINE.search(line))]

    def wait_for_access_lines(self, count: int, timeout: float = 10) -> list[tuple[str, ...]]:
        """The access lines once there are at least `count` (each is written as its response ends)."""
        deadline = time.monotonic() + timeout
        while len(lines := self.access_lines()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> SimpleNamespace:
    return build_catalog(tmp_path_factory.getbasetemp() / "serve_catalog")


@pytest.fixture(scope="module")
def service(catalog):
    return serve.open_service(catalog.snapshot, catalog.out, catalog.images, device="cpu")


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(serve.create_app(service, default_k=5), client=("127.0.0.1", 50000)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server(catalog, tmp_path_factory):
    running = Server(catalog, tmp_path_factory.mktemp("server") / "serve.log", "--k", "5")
    yield running
    running.stop()


def catalog_paths(catalog: SimpleNamespace) -> list[str]:
    return (catalog.out / "paths.txt").read_text().splitlines()


def is_json_error(response) -> bool:
    body = response.json()
    return set(body) == {"error"} and isinstance(body["error"], str) and "Traceback" not in response.text


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height, and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


# ------------------------------------------------------------------------------------------
# Without the server extras


def test_missing_extras_stop_with_the_pip_command(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "from tools import serve; sys.exit(serve.run(['model.pt', '--index', 'OUT']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: tools/serve.py needs fastapi and uvicorn (optional extras): pip install fastapi uvicorn"]


def test_items_are_the_folder_of_the_image():
    assert serve.item_of("img/WOMEN/Dresses/id_00000002/02_1_front.jpg") == "id_00000002"
    assert serve.item_of("cats/tabby.jpg") == "cats"
    assert serve.item_of("lonely.jpg") is None


def test_binds_this_machine_only_unless_told():
    args = serve.parse_args(["model.pt", "--index", "OUT"])
    assert (args.host, args.port, args.k, args.max_bytes) == ("127.0.0.1", 8000, 10, 10 * 2**20)
    with pytest.raises(SystemExit):
        serve.parse_args(["model.pt", "--index", "OUT", "--k", "101"])


# ------------------------------------------------------------------------------------------
# The API, in process


@needs_server
def test_the_query_image_finds_itself_first(client, catalog):
    paths = catalog_paths(catalog)
    query = catalog.query.relative_to(catalog.images).as_posix()
    response = client.post("/api/search?k=7", content=catalog.query.read_bytes(),
                           headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["rank"] for result in results] == list(range(1, 8))
    assert set(results[0]) == {"rank", "path", "item", "score"}
    assert results[0]["path"] == query and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["item"] == catalog.query.parent.name
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert all(result["path"] in paths and result["item"] == Path(result["path"]).parent.name for result in results)
    # the same ranking as the catalog searched with tools.api's embedding of the file
    vector = load_retriever(catalog.snapshot, device="cpu").embed(str(catalog.query))
    expected_scores, rows = search_index(read_catalog(catalog.out), vector, 7)
    assert [result["path"] for result in results] == [paths[row] for row in rows[0]]
    np.testing.assert_allclose(scores, expected_scores[0], atol=1e-4)


@needs_server
def test_info_and_the_default_k(client, catalog):
    info = client.get("/api/info").json()
    count = len(catalog_paths(catalog))
    assert info["count"] == count and info["max_k"] == min(100, count) and info["k"] == 5
    assert info["search"] == "exact" and info["images"] is True
    response = client.post("/api/search", content=catalog.query.read_bytes())  # no k: the server's --k
    assert response.status_code == 200 and len(response.json()["results"]) == 5


@needs_server
def test_the_page_and_its_files_are_served_with_safe_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file"' in page.text and "http" not in page.text.replace("http-equiv", "")  # nothing external
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in page.headers["content-security-policy"]


@needs_server
@pytest.mark.parametrize("body, status", [
    (b"", 400),  # empty
    (b"hello, not an image", 415),
    (b"<html><script>alert(1)</script></html>", 415),
])
def test_a_body_that_is_not_an_image_is_refused(client, body, status):
    response = client.post("/api/search?k=3", content=body)
    assert response.status_code == status and is_json_error(response)


@needs_server
def test_a_corrupt_image_and_a_form_are_refused(client, catalog):
    truncated = catalog.query.read_bytes()[:300]  # a JPEG header, then nothing
    response = client.post("/api/search", content=truncated)
    assert response.status_code == 400 and is_json_error(response)
    assert "uploaded image" in response.json()["error"] and "/tmp" not in response.json()["error"]
    form = client.post("/api/search", files={"image": ("q.jpg", catalog.query.read_bytes(), "image/jpeg")})
    assert form.status_code == 415 and "raw bytes" in form.json()["error"]


@needs_server
def test_too_large_bodies_and_images_are_refused(client):
    too_big = b"\xff\xd8\xff" + bytes(10 * 2**20)  # 10 MiB + 3 bytes, with Content-Length
    response = client.post("/api/search", content=too_big)
    assert response.status_code == 413 and is_json_error(response)

    def chunks():  # no Content-Length: the bytes received are counted
        for _ in range(11):
            yield bytes(2**20)

    response = client.post("/api/search", content=chunks())
    assert response.status_code == 413 and "limit" in response.json()["error"]
    bomb = png_header(100_000, 100_000)  # 57 bytes claiming 10^10 pixels
    response = client.post("/api/search", content=bomb)
    assert response.status_code == 413 and "pixels" in response.json()["error"]


@needs_server
@pytest.mark.parametrize("k", ["0", "-1", "101", "abc", "1.5", ""])
def test_k_out_of_range_is_refused(client, catalog, k):
    response = client.post(f"/api/search?k={k}", content=catalog.query.read_bytes())
    assert response.status_code == 422 and is_json_error(response)


@needs_server
def test_k_above_the_catalog_size_is_refused(catalog):
    from fastapi.testclient import TestClient

    small = serve.open_service(catalog.snapshot, catalog.out, catalog.images, device="cpu")
    small.catalog.embeddings = small.catalog.embeddings[:4]  # a 4-image catalog: k in 1..4
    with TestClient(serve.create_app(small, default_k=10)) as test_client:
        assert test_client.get("/api/info").json()["max_k"] == 4
        ok = test_client.post("/api/search?k=4", content=catalog.query.read_bytes())
        assert ok.status_code == 200 and len(ok.json()["results"]) == 4
        refused = test_client.post("/api/search?k=5", content=catalog.query.read_bytes())
        assert refused.status_code == 422 and "1..4" in refused.json()["error"]


@needs_server
def test_a_bug_answers_a_json_500_and_logs_its_traceback(service, catalog, caplog, monkeypatch):
    from fastapi.testclient import TestClient

    def broken(data, k):
        raise RuntimeError("an internal detail the client must not see")

    monkeypatch.setattr(service, "search", broken)
    with TestClient(serve.create_app(service), client=("127.0.0.1", 50000)) as test_client, caplog.at_level(logging.INFO, logger="serve"):
        response = test_client.post("/api/search?k=3", content=catalog.query.read_bytes())
    assert response.status_code == 500 and is_json_error(response)
    assert "internal detail" not in response.text
    assert "an internal detail the client must not see" in caplog.text and "Traceback" in caplog.text
    logged = [record.getMessage() for record in caplog.records if record.name == "serve.access"]
    assert len(logged) == 1 and re.fullmatch(r"127\.0\.0\.1 POST /api/search\?k=3 500 \d+\.\d ms", logged[0])


@needs_server
def test_catalog_images_are_served_from_images_only(client, catalog):
    path = catalog.query.relative_to(catalog.images).as_posix()
    response = client.get(f"/images/{path}")
    assert response.status_code == 200 and response.content == catalog.query.read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    alias = client.get("/images/alias.jpg")  # a link that stays inside IMAGES
    assert alias.status_code == 200 and alias.content == catalog.query.read_bytes()
    assert client.get("/images/img/nope.jpg").status_code == 404
    assert client.get("/images/img").status_code == 404  # a folder
    assert client.get(f"/images/{catalog.out / 'paths.txt'}").status_code in (403, 404)


@needs_server
def test_a_catalog_of_another_model_is_refused(catalog, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(catalog.out, out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0123456789abcdef"}))
    assert serve.run([str(catalog.snapshot), "--index", str(out), "--port", str(free_port())]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "fingerprint 0123456789abcdef" in error[0] and "embed the images again" in error[0]


# ------------------------------------------------------------------------------------------
# A real server: paths sent verbatim, concurrency, the log


TRAVERSALS = [
    "/images/../secret.jpg",
    "/images/%2e%2e/secret.jpg",
    "/images/%2E%2E%2Fsecret.jpg",
    "/images/img/..%2f..%2fsecret.jpg",
    "/images/linked/secret.jpg",  # a link inside IMAGES to a folder outside
    "/images/img/evil.jpg",  # a link inside IMAGES to a file outside
    "/images/../../../../../../etc/passwd",
    "/images//etc/passwd",  # absolute
    "/images/%2Fetc%2Fpasswd",
]


@needs_server
def test_paths_out_of_images_are_refused(server, catalog):
    assert fetch(server.port, "GET", "/images/alias.jpg")[0] == 200
    secret = (catalog.outside / "secret.jpg").read_bytes()
    for target in TRAVERSALS + [f"/images/{catalog.outside / 'secret.jpg'}"]:
        status, _, body = fetch(server.port, "GET", target)
        assert status in (403, 404), (target, status)
        assert secret not in body and b"root:" not in body, target
        assert set(json.loads(body)) == {"error"}, target


@needs_server
def test_concurrent_requests_all_succeed_with_the_same_results(server, catalog):
    query = catalog.query.read_bytes()
    status, _, body = fetch(server.port, "POST", "/api/search?k=5", query)
    assert status == 200
    expected = json.loads(body)
    before = len(server.wait_for_access_lines(1))

    def three_searches(_):
        return [fetch(server.port, "POST", "/api/search?k=5", query, {"Content-Type": "image/jpeg"})
                for _ in range(3)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = [answer for batch in pool.map(three_searches, range(8), timeout=300) for answer in batch]
    seconds = time.perf_counter() - started
    assert [status for status, _, _ in answers] == [200] * 24
    assert all(json.loads(body) == expected for _, _, body in answers)
    lines = server.wait_for_access_lines(before + 24)
    new = lines[before:]
    assert len(new) == 24, server.log()[-2000:]  # one line per request
    assert all(line[0] == "127.0.0.1" and line[1:4] == ("POST", "/api/search?k=5", "200") for line in new)
    print(f"24 searches from 8 threads in {seconds:.2f} s")


@needs_server
def test_every_request_is_logged_once(server, catalog):
    before = len(server.wait_for_access_lines(1))
    requests = [("GET", "/api/info", None, "200"), ("POST", "/api/search?k=0", b"x", "422"),
                ("POST", "/api/search?k=2", b"not an image", "415"), ("GET", "/images/../secret.jpg", None, "403"),
                ("GET", "/nowhere", None, "404")]
    for method, target, body, _ in requests:
        fetch(server.port, method, target, body)
    lines = server.wait_for_access_lines(before + len(requests))[before:]
    assert [(line[1], line[2], line[3]) for line in lines] == [(m, t, s) for m, t, _, s in requests]
    assert "Traceback" not in server.log()


@needs_server
def test_an_index_beside_the_catalog_is_used(catalog, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (an optional extra)")
    from fastapi.testclient import TestClient

    from tools.catalog import build_index, save_index

    out = tmp_path / "indexed"
    shutil.copytree(catalog.out, out)
    save_index(build_index(read_catalog(out), "hnsw", sample=0))
    indexed = serve.open_service(catalog.snapshot, out, catalog.images, device="cpu")
    with TestClient(serve.create_app(indexed, default_k=3)) as test_client:
        assert test_client.get("/api/info").json()["search"] == "hnsw"
        results = test_client.post("/api/search", content=catalog.query.read_bytes()).json()["results"]
    assert results[0]["path"] == catalog.query.relative_to(catalog.images).as_posix() and len(results) == 3
