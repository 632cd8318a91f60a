#!/usr/bin/env python3
"""Load test of ``reid-search serve``: queries/s and latency with dynamic batching on and off.

Builds a workspace (a seeded synthetic Market-layout dataset, a freshly
initialised BNNeck checkpoint, the gallery indexed through the indexer), starts
one ``reid-search serve`` subprocess per mode on free 127.0.0.1 ports (batched:
``--max-batch 32``; single: ``--max-batch 1``, one query at a time on the
model), and drives ``POST /query`` with 1, 8 and 32 concurrent clients
(asyncio + httpx, in this process; closed loop: each client sends its next
query when the last is answered), k-NN and re-ranked. Each cell runs
``--repeats`` times per mode, the modes alternating so that load from other
processes on a shared machine hits both alike: ``--warmup`` seconds of load,
then a ``--seconds`` window whose answers are counted (at most
``--max-requests`` requests per run); the whole run stops at ``--deadline``.
Reports queries/s, p50/p99 latency, the mean batch size the server formed, and
errors (anything but a 200 with hits; must be 0 — the exit status is 1
otherwise). ``--precision`` (default ``auto``: bf16 on AVX512_BF16/AMX CPUs) goes
to ``serve``, so the servers run the fast path; the report names what they run,
as their ``/stats`` describes the model. Prints a Markdown table; ``--out`` appends it. Loopback only.

    uv run python scripts/load_test.py --arch resnet50 --threads 1 --warmup 10 --seconds 15 --out BENCHMARKS.md
    uv run python scripts/load_test.py --arch resnet18 --height 128 --width 64 --threads 1   # minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"
# Runs `reid-search serve` whether or not the CLI group registers it yet.
BOOT = (
    "import sys\n"
    "from reid_search.app.cli import main\n"
    "from reid_search.app.cli.serve import serve\n"
    "if 'serve' not in main.commands: main.add_command(serve)\n"
    "main(args=sys.argv[1:], prog_name='reid-search')\n"
)


@dataclass
class Cell:
    """One measurement, summed over its repeats: a server mode, re-ranking on/off, a client count."""

    mode: str
    rerank: bool
    clients: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batches: int = 0
    batched_queries: int = 0

    @property
    def qps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_batch(self) -> float:
        return self.batched_queries / self.batches if self.batches else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return 1000 * xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# --------------------------------------------------------------------------- workspace


def build_workspace(root: Path, arch: str, height: int, width: int, ids: int,
                    images_per_id: int, precision: str = "auto") -> tuple[Path, list[Path], str]:
    """Synthetic data + a fresh checkpoint + the indexed gallery; returns (workspace, query images, summary)."""
    import torch

    from reid_search.app.session import open_workspace_gallery as open_gallery
    from reid_search.checkpoint import save_checkpoint
    from reid_search.extractors import load_extractor
    from reid_search.model import build_model
    from reid_search.synthetic import generate
    from reid_search.transforms import Preprocess
    from reid_search.app.workspace import Workspace

    data = root / "data"
    generate(data, ids=ids, cameras=4, images_per_id=images_per_id, seed=0)
    torch.manual_seed(0)
    ckpt = root / f"{arch}.pt"
    save_checkpoint(ckpt, build_model(arch), Preprocess(height=height, width=width))
    ws = Workspace(root / "ws")
    ws.set_model(ckpt)
    extractor = load_extractor(ckpt, device="cpu", precision=precision)
    with open_gallery(ws) as gallery:
        report = gallery.add_folder(data / "bounding_box_test", extractor)
        if report.skipped:
            raise SystemExit(f"indexing skipped {len(report.skipped)} images: {report.skipped[:3]}")
        summary = gallery.describe()
    queries = sorted((data / "query").glob("*.jpg"))
    return ws.root, queries, summary


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(workspace: Path, max_batch: int, max_wait_ms: float, threads: int | None,
                 log: Path, precision: str = "auto") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", BOOT, "-w", str(workspace), "serve", "--host", HOST, "--port", str(port),
           "--device", "cpu", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--no-access-log",
           "--precision", precision]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "REID_SEARCH_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise SystemExit(f"the server did not answer within 180 s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly (gallery closed)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- clients


async def run_cell(url: str, images: list[tuple[str, bytes]], clients: int, rerank: bool, seconds: float,
                   max_requests: int, top_k: int, warmup: float = 0.0) -> tuple[int, int, float, list[float]]:
    """``clients`` closed-loop coroutines posting queries; steady-state figures of one window.

    Clients run for ``warmup + seconds`` (or until ``max_requests`` are issued);
    only answers that arrive inside the window after the warm-up count towards
    throughput and latency, so neither the ramp-up nor the drain of the last
    in-flight requests distorts them. Errors count over the whole run.
    Returns ``(answers in window, errors, window seconds, their latencies)``.
    """
    done: list[tuple[float, float]] = []  # (finish time, latency) of good answers
    errors = 0
    issued = 0
    t_start = time.perf_counter()
    window_start = t_start + warmup
    stop_at = window_start + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal errors, issued
            i = w
            while time.perf_counter() < stop_at and issued < max_requests:
                issued += 1
                name, data = images[i % len(images)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/query", files={"file": (name, data)},
                                          data={"top_k": str(top_k), "rerank": "true" if rerank else "false"})
                    ok = r.status_code == 200 and len(r.json()["hits"]) > 0
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if ok:
                    done.append((t1, t1 - t0))
                else:
                    errors += 1

        await asyncio.gather(*(worker(w) for w in range(clients)))
    window_end = min(stop_at, max((t for t, _ in done), default=stop_at))
    inside = [lat for t, lat in done if window_start <= t <= window_end]
    return len(inside), errors, max(window_end - window_start, 1e-9), inside


def batching_stats(url: str) -> tuple[int, int]:
    b = httpx.get(url + "/stats", timeout=30).json()["batching"]
    return b["batches"], b["queries"]


def measure(urls: dict[str, str], images: list[tuple[str, bytes]], clients_list: list[int], reranks: list[bool],
            args: argparse.Namespace, deadline: float) -> list[Cell]:
    """Every cell, the modes alternating (order flipped each repeat) so load drift on a shared box hits all alike."""
    cells = []
    for rerank in reranks:
        for url in urls.values():
            # Warm-up: first forward passes; the re-ranking structures get built (lazily) here.
            asyncio.run(run_cell(url, images, 1, rerank, seconds=120, max_requests=3, top_k=args.top_k))
        for clients in clients_list:
            row = {mode: Cell(mode, rerank, clients) for mode in urls}
            for rep in range(args.repeats):
                if time.monotonic() > deadline:
                    print(f"deadline reached: rerank={rerank} clients={clients} has {rep} of {args.repeats} repeats",
                          file=sys.stderr)
                    break
                for mode in (list(urls) if rep % 2 == 0 else list(urls)[::-1]):
                    url, cell = urls[mode], row[mode]
                    b0, q0 = batching_stats(url)
                    n, errors, elapsed, lat = asyncio.run(run_cell(url, images, clients, rerank, args.seconds,
                                                                   args.max_requests, args.top_k, args.warmup))
                    b1, q1 = batching_stats(url)
                    cell.requests += n
                    cell.errors += errors
                    cell.seconds += elapsed
                    cell.latencies += lat
                    cell.batches += b1 - b0
                    cell.batched_queries += q1 - q0
                    print(f"{mode:>8} rerank={'on ' if rerank else 'off'} clients={clients:>2} rep {rep}: "
                          f"{n / elapsed:7.1f} q/s  errors {errors}", file=sys.stderr)
            for cell in row.values():
                if cell.seconds:
                    cells.append(cell)
    return cells


# --------------------------------------------------------------------------- report


def table(cells: list[Cell]) -> str:
    lines = ["| server | re-rank | clients | queries | q/s | p50 ms | p99 ms | mean batch | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(f"| {c.mode} | {'on' if c.rerank else 'off'} | {c.clients} | {c.requests} | {c.qps:.1f} | "
                     f"{c.pct(0.5):.1f} | {c.pct(0.99):.1f} | {c.mean_batch:.1f} | {c.errors} |")
    return "\n".join(lines)


def speedups(cells: list[Cell]) -> str:
    by = {(c.mode, c.rerank, c.clients): c for c in cells}
    out = []
    for (mode, rerank, clients), c in sorted(by.items()):
        if mode != "batched" or ("single", rerank, clients) not in by:
            continue
        s = by[("single", rerank, clients)]
        if s.qps > 0:
            out.append(f"{clients} clients, re-rank {'on' if rerank else 'off'}: ×{c.qps / s.qps:.2f}")
    return "Batched vs one-at-a-time throughput: " + "; ".join(out) if out else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                    help="BNNeck backbone of the fresh checkpoint (resnet18 for a quick run on a small CPU)")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--ids", type=int, default=40, help="synthetic identities (half are test ids)")
    ap.add_argument("--images-per-id", type=int, default=8)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--rerank", choices=["both", "on", "off"], default="both")
    ap.add_argument("--modes", default="batched,single", help="batched (--max-batch N) and/or single (--max-batch 1)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window of each run")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of load before each measured window (queues fill, batches form)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each cell per mode, modes alternating")
    ap.add_argument("--max-requests", type=int, default=2000, help="request budget of each run")
    ap.add_argument("--deadline", type=float, default=1200.0, help="seconds after which remaining cells are skipped")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's model threads (serve --threads) [default: torch's]; 1 on a shared CPU")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="the servers' (and the indexing's) serve --precision; auto = bf16 on AVX512_BF16/AMX CPUs")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the workspace [default: a temp dir]")
    ap.add_argument("--out", type=Path, default=None, help="append the Markdown table here")
    args = ap.parse_args()
    clients_list = [int(c) for c in args.clients.split(",") if c]
    reranks = {"both": [False, True], "on": [True], "off": [False]}[args.rerank]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"batched", "single"} or not modes:
        ap.error("--modes takes batched and/or single")
    deadline = time.monotonic() + args.deadline

    with tempfile.TemporaryDirectory(prefix="reid-load-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ws, queries, summary = build_workspace(root, args.arch, args.height, args.width, args.ids, args.images_per_id,
                                               args.precision)
        print(f"workspace built in {time.perf_counter() - t0:.0f} s: {summary}; {len(queries)} query images",
              file=sys.stderr)
        images = [(p.name, p.read_bytes()) for p in queries]
        log = root / "server.log"
        procs: list[subprocess.Popen] = []
        try:
            urls = {}
            for mode in modes:  # all up at once: an idle server waits on an event and costs no CPU
                max_batch = args.max_batch if mode == "batched" else 1
                proc, urls[mode] = start_server(ws, max_batch, args.max_wait_ms, args.threads, log, args.precision)
                procs.append(proc)
            # What the servers say they run (the description carries the resolved precision).
            served = sorted({httpx.get(u + "/stats", timeout=30).json()["model"]["description"] for u in urls.values()})
            print(f"servers run {'; '.join(served)}", file=sys.stderr)
            cells = measure(urls, images, clients_list, reranks, args, deadline)
        finally:
            for proc in procs:
                stop_server(proc)

    import torch

    from reid_search.precision import cpu_features

    errors = sum(c.errors for c in cells)
    header = (
        f"### `reid-search serve` load test ({args.arch} BNNeck {args.height}×{args.width}, CPU)\n\n"
        f"`{' '.join(shlex.quote(a) for a in ['uv', 'run', 'python', 'scripts/load_test.py', *sys.argv[1:]])}`\n\n"
        f"Gallery: {summary}; {len(images)} distinct query crops (synthetic, seed 0). Servers: one uvicorn "
        f"process per mode, batched = `--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}`, "
        f"single = `--max-batch 1`. Clients: asyncio + httpx in the load-test process on the same machine "
        f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}); "
        f"server model threads: {args.threads or f'torch default ({torch.get_num_threads()})'}; "
        f"`serve --precision {args.precision}`: the servers run {'; '.join(served)} (CPU {cpu_features().summary()}); "
        f"each cell {args.repeats} × a {args.seconds:g} s window after {args.warmup:g} s of warm-up load "
        f"(closed loop, at most {args.max_requests} requests), the two servers alternating; q/s and latency count "
        f"the answers inside the windows (latency: upload to JSON answer). Errors = anything but a 200 with hits, "
        f"over whole runs: {errors} in total.\n"
    )
    text = header + "\n" + table(cells) + "\n"
    extra = speedups(cells)
    if extra:
        text += "\n" + extra + "\n"
    print(text)
    if args.out is not None:
        with args.out.open("a") as fh:
            fh.write("\n" + text)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
