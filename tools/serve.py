"""A search page and a JSON API over a catalog folder (tools/embed.py's OUT) and its model.

    python tools/serve.py runs/demo/snapshot.pt --index OUT --images IMAGES     # http://127.0.0.1:8000/
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/api/search?k=5'

Routes:

    GET  /                 the search page: tools/static/ (plain HTML, CSS and JavaScript; nothing
                           is fetched from anywhere but this server)
    GET  /api/info         catalog size, the default and the largest k, the model's fingerprint
    POST /api/search?k=K   body: the raw bytes of one JPEG, PNG, GIF or WebP image ->
                           {"results": [{"rank", "path", "item", "score"}, ...]}, best first;
                           score: cosine similarity; item: the image's folder (its class folder,
                           or its In-Shop item id)
    GET  /images/{path}    a catalog image, read from IMAGES and nowhere else

Errors are JSON, {"error": "..."}: 400 an empty body, a bad Content-Length or an image that cannot
be decoded; 413 a body over --max_bytes (the Content-Length header and the bytes actually received
are both checked) or an image whose header claims more than --max_image_pixels; 415 a body that is
not an image (or a multipart form); 422 a k that is not an integer in 1..min(100, catalog size);
403 an image path that leads out of IMAGES (`..`, percent-encoded or not, an absolute path, a
symbolic link to elsewhere: every path is resolved and must stay inside); 404 a path that is not
there. Anything else is a bug: the server logs its traceback and answers a JSON 500 without it.

Concurrency: uvicorn runs one event loop. The search endpoint reads the body there (async, with
the size limit), then decodes and embeds in Starlette's thread pool (anyio worker threads), so a
slow upload or a long search never blocks other requests, and the image and page routes run in
that pool too. There is one model in memory, shared by all requests: its forward pass and the
catalog search run under one lock, in torch.inference_mode, one query at a time (torch already
spreads one image over the cores, and memory stays at one image's activations); decoding and
preprocessing of other queries go on outside the lock, in parallel.

Each request is logged in one line: client, method, path as received, status, milliseconds.
FastAPI and uvicorn are optional extras: pip install fastapi uvicorn.
"""

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from support import runtime
from arcface.imageheader import HeaderError, read_header
from arcface.transforms import MAX_IMAGE_PIXELS, ImageFileError, check_max_pixels, load_image
from support.errors import UserError
from tools.catalog import META_FILE, Catalog, CatalogError, CatalogIndex, open_searcher, read_catalog, search_index
from tools.common import LoadedModel, load_model

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_K = 100
MAX_BYTES = 10 * 2**20  # 10 MiB: far above a photograph, far below what would strain the server
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what /images serves
EXTRAS = "pip install fastapi uvicorn"
INTERNAL_ERROR = "internal server error (the server's log has the details)"
# Sent with every response: the page loads nothing from elsewhere, and no served file is sniffed
# into another type (an image that is really HTML never runs as a page).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", (b"default-src 'self'; img-src 'self' blob:; script-src 'self'; "
                                  b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'")),
    (b"referrer-policy", b"no-referrer"),
]

log = logging.getLogger("serve")
access_log = logging.getLogger("serve.access")


class ServerExtrasMissing(UserError, ImportError):
    """FastAPI or uvicorn, optional extras, are not installed."""


class ApiError(Exception):
    """A request the service refuses: its status and a one-line reason, answered as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def require_server_extras() -> None:
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServerExtrasMissing(f"tools/serve.py needs {' and '.join(missing)} (optional extras): {EXTRAS}")


def item_of(path: str) -> str | None:
    """The folder an image is in: its class folder (IMAGES/<class>/<image>) or its In-Shop item
    id (img/WOMEN/Dresses/id_00000002/02_1_front.jpg -> id_00000002); None for a bare file name."""
    return PurePosixPath(path.replace("\\", "/")).parent.name or None


def decode_upload(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The uploaded bytes -> uint8 (3, H, W), through the project's safe loader (load_image: the
    header's pixel count is checked before anything is decoded). ApiError when refused."""
    if not data:
        raise ApiError(400, "empty body: send the raw bytes of one image (curl --data-binary @photo.jpg)")
    try:
        header = read_header(data)
    except HeaderError as error:
        raise ApiError(415, f"the body is not an image this service reads: {error}") from None
    if header.pixels > max_pixels:
        raise ApiError(413, f"the {header.format} header claims {header.width} x {header.height} = "
                            f"{header.pixels:,} pixels, more than this server's limit of {max_pixels:,}")
    # load_image reads a file: the bytes go through a private temporary file, deleted at once.
    with tempfile.NamedTemporaryFile(prefix="query-", suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return load_image(tmp.name, max_pixels)
        except ImageFileError as error:
            reason = str(error).replace(tmp.name, "the uploaded image")
            raise ApiError(400, reason) from None


@dataclass
class SearchService:
    """One model and one catalog, shared by every request (see the module's notes on concurrency)."""

    model: LoadedModel
    catalog: Catalog
    searcher: Catalog | CatalogIndex
    images: Path | None  # resolved IMAGES folder; None: results without thumbnails
    device: torch.device
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        self.transform = self.model.preprocess.transform()
        self.lock = threading.Lock()
        self.model.module.to(self.device).eval()

    @property
    def max_k(self) -> int:
        return min(MAX_K, self.catalog.count)

    def info(self, default_k: int) -> dict[str, Any]:
        kind = self.searcher.kind if isinstance(self.searcher, CatalogIndex) else "exact"
        return {"count": self.catalog.count, "dim": self.catalog.dim, "k": default_k, "max_k": self.max_k,
                "fingerprint": self.model.fingerprint, "search": kind, "images": self.images is not None,
                "max_image_pixels": self.max_pixels}

    def parse_k(self, text: str | None, default: int) -> int:
        if text is None:
            return default
        try:
            k = int(text.strip())
        except ValueError:
            raise ApiError(422, f"k: expected an integer in 1..{self.max_k}, got {text[:40]!r}") from None
        if not 1 <= k <= self.max_k:
            limit = "the catalog's size" if self.max_k < MAX_K else f"at most {MAX_K}"
            raise ApiError(422, f"k: expected an integer in 1..{self.max_k} ({limit}), got {k}")
        return k

    def search(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """The k catalog images nearest the image in `data`, best first."""
        image = decode_upload(data, self.max_pixels)
        # The model's own preprocessing, outside the lock: it runs alongside other queries.
        batch = self.transform(image).unsqueeze(0)
        with self.lock, torch.inference_mode():
            vector = F.normalize(self.model.module(batch.to(self.device)).float(), dim=1).cpu()
            scores, rows = search_index(self.searcher, vector.numpy(), k)
        paths = self.catalog.paths or []
        results = []
        for score, row in zip(scores[0].tolist(), rows[0].tolist()):
            if row < 0:  # an approximate index found fewer than k rows
                continue
            path = paths[row]
            results.append({"rank": len(results) + 1, "path": path, "item": item_of(path), "score": score})
        return results

    def image_file(self, path: str) -> Path:
        """The file of /images/{path}: inside IMAGES once resolved (links followed), or ApiError."""
        if self.images is None:
            raise ApiError(404, "this server was started without --images: no catalog images to show")
        if "\x00" in path:
            raise ApiError(404, "no such image")
        # An absolute path or `..` is refused before the file system is asked (so the answer
        # never tells whether a file outside exists). A link may still point anywhere: the path
        # is resolved, links followed, and the result must be inside IMAGES.
        parts = PurePosixPath(path).parts
        if PurePosixPath(path).is_absolute() or ".." in parts:
            raise ApiError(403, "outside the images folder")
        try:
            resolved = (self.images / path).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a loop of links
            raise ApiError(404, "no such image") from None
        if not resolved.is_relative_to(self.images):
            raise ApiError(403, "outside the images folder")
        relative = resolved.relative_to(self.images)
        if any(part.startswith(".") for part in relative.parts) or resolved.suffix.lower() not in IMAGE_SUFFIXES \
                or not resolved.is_file():
            raise ApiError(404, "no such image")
        return resolved


def open_service(model_path: str | os.PathLike, out: str | os.PathLike, images: str | os.PathLike | None = None,
                 device: str = "auto", max_pixels: int = MAX_IMAGE_PIXELS) -> SearchService:
    """The model and the catalog it embedded (refused when the fingerprints differ)."""
    model = load_model(model_path)
    catalog = read_catalog(out)
    if catalog.fingerprint != model.fingerprint:
        raise CatalogError(f"{catalog.root / META_FILE}: embeddings of model fingerprint {catalog.fingerprint}, "
                           f"but {model_path} has fingerprint {model.fingerprint} (other weights or preprocessing): "
                           "serve the model the catalog was embedded with, or embed the images again")
    if catalog.paths is None:
        raise CatalogError(f"{catalog.root}: a catalog without paths cannot be served")
    folder = _images_folder(images, catalog)
    try:
        chosen = runtime.pick_device(device)
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    return SearchService(model, catalog, open_searcher(catalog), folder, chosen, max_pixels)


def _images_folder(images: str | os.PathLike | None, catalog: Catalog) -> Path | None:
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder}: no such folder")
        return folder.resolve()
    recorded = catalog.meta.get("images")  # where tools/embed.py found the images, if it says
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded).resolve()
    return None


# ------------------------------------------------------------------------------------------
# The web application


def create_app(service: SearchService, default_k: int = 10, max_bytes: int = MAX_BYTES) -> Any:
    """The FastAPI application over a SearchService."""
    require_server_extras()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    default_k = max(1, min(default_k, service.max_k))
    app = FastAPI(title="catalog search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette answers with this, then re-raises to AccessLog, which logs the traceback.
        return JSONResponse({"error": INTERNAL_ERROR}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info(default_k)

    @app.post("/api/search")
    async def search(request: Request) -> dict[str, Any]:
        k = service.parse_k(request.query_params.get("k"), default_k)
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            raise ApiError(415, "send the image's raw bytes as the body (curl --data-binary @photo.jpg), "
                                "not a multipart form")
        data = await read_body(request, max_bytes)
        return {"results": await run_in_threadpool(service.search, data, k)}

    @app.get("/images/{path:path}")
    def image(path: str) -> FileResponse:
        return FileResponse(service.image_file(path), headers={"cache-control": "private, max-age=3600"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return AccessLog(app)


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as the Content-Length header or the bytes received exceed max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length: expected a number of bytes, got {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise ApiError(413, f"the body is {int(declared):,} bytes, more than this server's limit of "
                                f"{max_bytes:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"the body is more than this server's limit of {max_bytes:,} bytes")
    return bytes(body)


class AccessLog:
    """ASGI middleware: one log line per request, the security headers, and a JSON 500 (with the
    traceback in the server's log only) for an exception no handler answered: a bug."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def state(self) -> Any:  # the wrapped application's state (state.service)
        return self.app.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def send_with_headers(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("%s %s: unhandled error", scope.get("method"), _printable_target(scope))
            if status is None:  # nothing sent yet: answer without the traceback
                from fastapi.responses import JSONResponse

                response = JSONResponse({"error": INTERNAL_ERROR}, status_code=500)
                await response(scope, receive, send_with_headers)
        finally:
            client = scope.get("client")
            access_log.info("%s %s %s %s %.1f ms", client[0] if client else "-", scope.get("method"),
                            _printable_target(scope), status if status is not None else "-",
                            1000 * (time.perf_counter() - start))


def _printable_target(scope: dict) -> str:
    """The path and query as the client sent them, with control characters escaped (one log line)."""
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    target = raw.decode("latin-1") + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string")
                                      else "")
    target = "".join(char if char.isprintable() and char != " " else f"\\x{ord(char):02x}" for char in target)
    return target if len(target) <= 300 else target[:300] + "..."


# ------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="SNAPSHOT",
                        help="the model the catalog was embedded with: a training snapshot or an export of "
                             "tools/export.py")
    parser.add_argument("--index", required=True, metavar="OUT",
                        help="catalog folder of tools/embed.py: embeddings.npy, paths.txt, meta.json (and the "
                             "index.faiss of tools/index.py, used when there)")
    parser.add_argument("--images", default=None, metavar="IMAGES",
                        help="the folder paths.txt is relative to; catalog images are served from it only "
                             "(default: the folder meta.json names, else results come without thumbnails)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
                             "to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--k", type=int, default=10, help=f"results per query by default (1..{MAX_K})")
    parser.add_argument("--max_bytes", type=int, default=MAX_BYTES, metavar="N",
                        help=f"largest request body accepted (default {MAX_BYTES:,} bytes)")
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse, before decoding, a query whose header claims more pixels "
                             f"(default {MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, ...")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        parser.error(f"--k: expected an integer in 1..{MAX_K}, got {args.k}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0..65535, got {args.port}")
    for flag in ("max_bytes", "max_image_pixels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_server_extras()
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    service = open_service(args.model, args.index, args.images, args.device, args.max_image_pixels)
    app = create_app(service, args.k, args.max_bytes)
    kind = service.info(args.k)["search"]
    print(f"catalog {service.catalog.root}: {service.catalog.count} images, {kind} search, model "
          f"{service.model.source} on {service.device}", flush=True)
    if service.images is None:
        print("no images folder (--images, or one named in meta.json): results come without thumbnails", flush=True)
    else:
        first = service.images / service.catalog.paths[0]
        if not first.is_file():
            print(f"warning: {first} not found: is --images the folder the catalog was embedded from?", flush=True)
    print(f"search page: http://{args.host}:{args.port}/  (Ctrl-C stops)", flush=True)
    # uvicorn's own access log is off: AccessLog writes one line per request instead.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_config=None, log_level="info",
                server_header=False)
    return 0


def run(argv: list[str] | None = None) -> int:
    """main, with bad input said in one `error: ...` line and exit status 1 (bad flags: 2, by argparse)."""
    try:
        return main(argv)
    except (UserError, OSError, ValueError, ImportError) as error:
        lines = str(error).strip().splitlines()
        print(f"error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
