"""``reid-search serve``: the HTTP search service (see :mod:`reid_search.app.service`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click

from reid_search.app.cli._common import App, pass_app, precision_option
from reid_search.app.cli._model_options import model_input_options
from reid_search.limits import (
    API_KEY_ENV,
    API_KEY_HEADER,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_BYTES,
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(app: Any, host: str, port: int, access_log: bool, log_level: str) -> None:
    """Serve ``app`` with uvicorn in this process (one worker: batching needs one model)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=log_level, workers=1)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the gallery (set --api-key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar=API_KEY_ENV, show_envvar=True, default=None,
              help=f"Require this key in header {API_KEY_HEADER} on every route, /healthz and /docs included.")
@click.option("--model", "-m", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint (.pt) or ONNX file [default: the model that built the gallery, else the workspace's].")
@model_input_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--flip/--no-flip", default=False, show_default=True,
              help="Average with the flipped image; must match how the gallery was indexed.")
@precision_option
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Queries embedded together; 1 serves one at a time.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0, 1000),
              help="How long the oldest waiting query may wait for others to join its batch.")
@click.option("--max-queue", default=DEFAULT_MAX_QUEUE, show_default=True, type=click.IntRange(1),
              help="Waiting queries beyond this get 503 (retry later).")
@click.option("--max-upload-bytes", default=DEFAULT_MAX_UPLOAD_BYTES, show_default=True, type=click.IntRange(1),
              help="Largest accepted image file.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Largest accepted image, width × height (decompression bombs).")
@click.option("--max-files", default=DEFAULT_MAX_FILES, show_default=True, type=click.IntRange(1),
              help="Most images per POST /gallery.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads of the model [default: torch's, one per core]; fewer when the cores are shared.")
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@pass_app
def serve(app: App, host: str, port: int, api_key: str | None, model: Path | None, device: str, flip: bool,
          max_batch: int, max_wait_ms: float, max_queue: int, max_upload_bytes: int, max_pixels: int,
          max_files: int, threads: int | None, access_log: bool, precision: str = "auto",
          preprocess: dict | None = None) -> None:
    """Serve the workspace's gallery over HTTP/JSON (OpenAPI docs at /docs).

    POST /query (an image in multipart field `file`; top_k, rerank, camid)
    answers like `reid-search query --json`; POST /gallery adds images,
    DELETE /gallery/ID removes one; GET /healthz and GET /stats. Concurrent
    queries are embedded in batches. Stop with Ctrl-C.

    \b
    Example:
      reid-search serve --port 8000
      curl -F file=@query/0001_c1s1_001051_00.jpg -F top_k=5 http://127.0.0.1:8000/query
      curl -F file=@new.jpg -F pid=42 -F camid=3 http://127.0.0.1:8000/gallery
      REID_SEARCH_API_KEY=s3cret reid-search serve --host 0.0.0.0 --model model.onnx
      reid-search serve --precision fp32 --threads 2
    """
    from reid_search.app.service import create_app

    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the key is empty; pass a non-empty key or none", param_hint="--api-key")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not _is_loopback(host) and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach this port can query "
                   "and change the gallery", err=True)
    service = create_app(app.workspace, model=model, device=device, flip=flip, api_key=api_key,
                         max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_files=max_files,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, precision=precision,
                         preprocess=preprocess)
    stats = service.state.core.stats()
    click.echo(f"workspace {app.workspace.root}: {stats['gallery']}; search on {stats['search_device']}; "
               f"model {stats['model']['description']}", err=True)
    click.echo(f"serving on http://{host}:{port} (docs: /docs); batches of up to {max_batch}, "
               f"{max_wait_ms:g} ms window; API key {'required' if api_key else 'off'}", err=True)
    run_server(service, host, port, access_log, "info" if access_log else "warning")
