"""Benchmark the retrieval maths against dense reference forms, side by side.

Sections (one function each, called from ``main``):

* ``bench_evaluate``  - ``reid_search.metrics.evaluate`` vs the per-query Python loop of
  torchreid/fast-reid ``eval_market1501`` (ported below).
* ``bench_rerank``    - ``reid_search.rerank.k_reciprocal`` vs the dense N² algorithm of
  reid-strong-baseline ``re_ranking`` (ported below, float16 ``V`` as there).
* ``bench_query_latency`` - hook for search-engine latency (filled in later).

Every measurement runs in a fresh subprocess that loads its inputs from ``.npy`` files
and reports wall time and peak RSS (``VmHWM``, reset once the inputs are loaded) minus
the RSS at that point, so allocations of earlier runs cannot hide or inflate a peak.
Inputs are synthetic clustered 2048-d features of Market-1501 shape (751 identities,
6 cameras, 1/15 of the gallery distractors with pid 0), fixed seed.

    uv run python scripts/bench_search.py --sizes 0.25,1 --out bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MARKET_QUERY, MARKET_GALLERY, MARKET_IDS = 3368, 15913, 751


# --------------------------------------------------------------------------- data


def make_data(frac: float, seed: int, dim: int = 2048) -> dict[str, np.ndarray]:
    """Clustered features: identity centre + camera shift + noise in a 48-d subspace."""
    rng = np.random.default_rng(seed)
    num_q = max(2, round(MARKET_QUERY * frac))
    num_g = max(2, round(MARKET_GALLERY * frac))
    num_ids = max(2, round(MARKET_IDS * frac))
    latent = 48
    basis = np.linalg.qr(rng.normal(size=(dim, latent)))[0].T
    centres = rng.normal(size=(num_ids + 1, latent))
    cam_shift = 0.5 * rng.normal(size=(6, latent))

    def draw(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        z = centres[pids] + cam_shift[cams] + 0.75 * rng.normal(size=(pids.size, latent))
        f = z @ basis + (0.05 / np.sqrt(dim)) * rng.normal(size=(pids.size, dim))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    g_pids = rng.integers(1, num_ids + 1, num_g)
    g_pids[: num_g // 15] = 0  # distractors
    g_cams = rng.integers(0, 6, num_g)
    q_pids = rng.integers(1, num_ids + 1, num_q)
    q_cams = rng.integers(0, 6, num_q)
    g_feats = draw(g_pids, g_cams)
    noise = rng.normal(size=(num_g // 15, latent)) @ basis
    g_feats[: num_g // 15] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    q_feats = draw(q_pids, q_cams)
    return {
        "q_feats": q_feats,
        "g_feats": g_feats,
        "q_pids": q_pids,
        "g_pids": g_pids,
        "q_camids": q_cams,
        "g_camids": g_cams,
    }


def squared_distances(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    d = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    return np.maximum(d, 0.0, out=d).astype(np.float32)


# ---------------------------------------------------------------- dense references


def dense_eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The per-query loop of torchreid eval_market1501 plus fast-reid's mINP."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = indices[i]
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        raw = matches[i][~removed]
        if not raw.any():
            continue
        cum = raw.cumsum()
        last_hit = np.flatnonzero(raw)[-1]
        all_inp.append(cum[last_hit] / (last_hit + 1.0))
        cmc = np.minimum(cum, 1)
        all_cmc.append(cmc[:max_rank])
        # Precision at every position, element by element as in the references.
        precision = np.asarray([c / (pos + 1.0) for pos, c in enumerate(cum)])
        all_ap.append((precision * raw).sum() / raw.sum())
    if not all_cmc:
        raise ValueError("no valid query")
    cmc = np.asarray(all_cmc, dtype=np.float32).sum(0) / len(all_cmc)
    return {
        "cmc": cmc,
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "num_valid": len(all_cmc),
        "num_query": num_q,
    }


def dense_re_ranking(q_feats, g_feats, k1=20, k2=6, lambda_value=0.3, v_dtype=np.float16):
    """reid-strong-baseline re_ranking: full N × N matrices, float16 V by default."""
    import torch

    num_q = q_feats.shape[0]
    feat = torch.cat([torch.from_numpy(q_feats), torch.from_numpy(g_feats)])
    n = feat.shape[0]
    sq = feat.pow(2).sum(dim=1, keepdim=True)
    dist = (sq.expand(n, n) + sq.expand(n, n).t()).addmm_(feat, feat.t(), beta=1, alpha=-2)
    original = dist.numpy()
    del feat, dist
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original).astype(v_dtype)
    initial_rank = np.argsort(original).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expanded = recip
        for cand in recip:
            c_forward = initial_rank[cand, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expanded = np.append(expanded, c_recip)
        expanded = np.unique(expanded)
        weight = np.exp(-original[i, expanded])
        v[i, expanded] = weight / np.sum(weight)
    original = original[:num_q]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=v_dtype)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    del initial_rank
    inv_index = [np.where(v[:, c] != 0)[0] for c in range(n)]
    jaccard = np.zeros_like(original, dtype=v_dtype)
    for i in range(num_q):
        temp_min = np.zeros((1, n), dtype=v_dtype)
        nonzero = np.where(v[i] != 0)[0]
        for c in nonzero:
            rows = inv_index[c]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(v[i, c], v[rows, c])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:, num_q:]


# ------------------------------------------------------------------ subprocess side


def _status_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Current RSS in MB, after resetting the peak to it where Linux allows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass
    rss = _status_mb("VmRSS")
    # ru_maxrss survives exec (it may hold the parent's peak), so it is only a fallback.
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(task: str, datadir: Path, repeats: int) -> None:
    """Run one task in this (fresh) process and print one JSON line."""
    load = {k: np.load(datadir / f"{k}.npy") for k in ("q_pids", "g_pids", "q_camids", "g_camids")}
    if task.startswith("eval"):
        load["distmat"] = np.load(datadir / "distmat.npy")
    else:
        load["q_feats"] = np.load(datadir / "q_feats.npy")
        load["g_feats"] = np.load(datadir / "g_feats.npy")
    import torch  # noqa: F401  (import cost belongs to the baseline, not the run)

    from reid_search.metrics import evaluate
    from reid_search.rerank import k_reciprocal

    ids = (load["q_pids"], load["g_pids"], load["q_camids"], load["g_camids"])
    base = _reset_peak()
    times, cpu_times, result = [], [], None
    for _ in range(repeats):
        result = None  # the previous repeat's output must not add to this one's peak
        c0 = time.process_time()
        t0 = time.perf_counter()
        if task == "eval-fast":
            result = evaluate(load["distmat"], *ids)
        elif task == "eval-dense":
            result = dense_eval_market1501(load["distmat"], *ids)
        elif task == "rerank-fast":
            result = k_reciprocal(load["q_feats"], load["g_feats"], device="cpu")
        elif task == "rerank-dense":
            result = dense_re_ranking(load["q_feats"], load["g_feats"])
        elif task == "rerank-dense32":
            result = dense_re_ranking(load["q_feats"], load["g_feats"], v_dtype=np.float32)
        else:
            raise SystemExit(f"unknown task {task}")
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _peak_mb() - base
    if task.startswith("eval"):
        np.save(datadir / f"out-{task}.npy", np.append(result["cmc"], [result["mAP"], result["mINP"]]))
    else:
        np.save(datadir / f"out-{task}.npy", np.asarray(result, dtype=np.float32))
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_mb": peak, "base_mb": base}))


def run_worker(task: str, datadir: Path, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", task, str(datadir), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["median"] = statistics.median(info["times"])
    info["cpu_median"] = statistics.median(info["cpu_times"])
    return info


# -------------------------------------------------------------------------- sections


@dataclass
class Row:
    section: str
    size: str
    impl: str
    seconds: float
    cpu_seconds: float
    peak_mb: float
    repeats: int
    speedup: str = ""
    memory: str = ""
    agreement: str = ""


def _row(section: str, size: str, impl: str, info: dict) -> Row:
    return Row(section, size, impl, info["median"], info["cpu_median"], info["peak_mb"], len(info["times"]))


def _size_label(data: dict[str, np.ndarray], frac: float) -> str:
    return f"{frac:g}× ({data['q_feats'].shape[0]}×{data['g_feats'].shape[0]})"


def bench_evaluate(data, datadir: Path, frac: float, args) -> list[Row]:
    label = _size_label(data, frac)
    fast = run_worker("eval-fast", datadir, args.repeats)
    rows = [_row("evaluate", label, "reid_search.metrics.evaluate", fast)]
    if frac > args.skip_dense_above:
        return rows
    dense = run_worker("eval-dense", datadir, 1)
    a = np.load(datadir / "out-eval-fast.npy")
    b = np.load(datadir / "out-eval-dense.npy")
    rows.append(_row("evaluate", label, "dense per-query loop (torchreid form)", dense))
    rows[0].speedup = f"{dense['median'] / fast['median']:.1f}×"
    rows[0].memory = f"{fast['peak_mb'] / max(dense['peak_mb'], 1e-9):.2f}"
    rows[0].agreement = (
        f"max abs diff: CMC {np.abs(a[:-2] - b[:-2]).max():.1e}, mAP {abs(a[-2] - b[-2]):.1e}, "
        f"mINP {abs(a[-1] - b[-1]):.1e}"
    )
    return rows


def _rank_stats(dist: np.ndarray, data) -> tuple[float, float]:
    from reid_search.metrics import evaluate

    res = evaluate(dist, data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    return 100 * float(res["cmc"][0]), 100 * res["mAP"]


def _max_abs_diff(a_path: Path, b_path: Path) -> float:
    a = np.load(a_path, mmap_mode="r")
    b = np.load(b_path, mmap_mode="r")
    worst = 0.0
    for s in range(0, a.shape[0], 512):
        worst = max(worst, float(np.abs(a[s : s + 512] - b[s : s + 512].astype(np.float32)).max()))
    return worst


def bench_rerank(data, datadir: Path, frac: float, args) -> list[Row]:
    label = _size_label(data, frac)
    fast = run_worker("rerank-fast", datadir, args.repeats)
    fast_out = np.load(datadir / "out-rerank-fast.npy")
    r1, mAP = _rank_stats(fast_out, data)
    del fast_out
    plain_r1, plain_map = _rank_stats(np.load(datadir / "distmat.npy"), data)
    row = _row("k_reciprocal", label, "reid_search.rerank.k_reciprocal", fast)
    row.agreement = (
        f"R1 {plain_r1:.1f}→{r1:.1f}, mAP {plain_map:.1f}→{mAP:.1f} (no re-ranking→re-ranked)"
    )
    rows = [row]
    if frac > args.skip_dense_above:
        return rows
    variants = [("rerank-dense", "dense N² (reid-strong-baseline form, float16 V)")]
    if args.dense_fp32:
        variants.append(("rerank-dense32", "dense N², float32 V"))
    for task, name in variants:
        dense = run_worker(task, datadir, 1)
        dense_out = np.load(datadir / f"out-{task}.npy")
        d_r1, d_map = _rank_stats(dense_out, data)
        del dense_out
        diff = _max_abs_diff(datadir / "out-rerank-fast.npy", datadir / f"out-{task}.npy")
        rows.append(_row("k_reciprocal", label, name, dense))
        rows[-1].agreement = (
            f"vs fast: max abs diff of distances {diff:.1e}; R1 diff {abs(r1 - d_r1):.2f}, "
            f"mAP diff {abs(mAP - d_map):.2f} points"
        )
        if task == "rerank-dense":
            row.speedup = f"{dense['median'] / fast['median']:.1f}×"
            row.memory = f"{fast['peak_mb'] / max(dense['peak_mb'], 1e-9):.3f}"
    return rows


def bench_query_latency(data, datadir: Path, frac: float, args) -> list[Row]:
    """Per-query latency of a warm engine core: FAISS flat k-NN + camera filter vs online re-ranking.

    Feature extraction is excluded (it is the same for both and measured by
    bench_extract.py). The re-ranking structures are built once, as indexing does.
    """
    import faiss

    from reid_search.online_rerank import GalleryRerank

    g = np.ascontiguousarray(data["g_feats"], dtype=np.float32)
    q = np.ascontiguousarray(data["q_feats"], dtype=np.float32)
    g_cams, q_cams = data["g_camids"], data["q_camids"]
    size = f"{frac:g}× (1 query × {len(g)})"
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    t0 = time.perf_counter()
    rr = GalleryRerank.build(g)
    build_s = time.perf_counter() - t0
    nq = min(len(q), args.latency_queries)

    def knn(i: int) -> None:
        want = 40
        while True:
            _, ids = index.search(q[i : i + 1], want)
            keep = ids[0][g_cams[ids[0]] != q_cams[i]]
            if len(keep) >= 10 or want >= len(g):
                return
            want *= 4

    def rerank(i: int) -> None:
        d = rr.distances(q[i])
        d = np.where(g_cams == q_cams[i], np.inf, d)
        np.argpartition(d, 10)[:10]

    rows = []
    for name, fn in (("k-NN (FAISS flat) + camera filter", knn), ("online k-reciprocal re-ranking", rerank)):
        fn(0)  # warm
        times = []
        for i in range(nq):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        ms = np.array(times) * 1000
        rows.append(Row("query latency", size, name, float(np.median(ms)) / 1000, float("nan"), float("nan"), nq,
                        agreement=f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms"
                        + (f"; gallery structures built once in {build_s:.1f} s" if fn is rerank else "")))
    return rows


SECTIONS = (bench_evaluate, bench_rerank, bench_query_latency)


# ------------------------------------------------------------------------------ main


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def to_markdown(rows: list[Row], args, elapsed: float, load_before: str) -> str:
    lines = [
        f"Command: `uv run python scripts/bench_search.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, load average (1/5/15 min) {load_before} at the start "
        f"and {_load()} at the end (other work on the machine inflates wall times; CPU s "
        f"less so); torch threads {args.torch_threads}; seed {args.seed}; "
        f"fast rows are the median of {args.repeats} runs, dense rows one run; CPU s = process CPU "
        "time (user + system, all threads); peak extra = peak RSS "
        "(VmHWM) of a fresh process minus its RSS once inputs are loaded. Total bench time "
        f"{elapsed:.0f} s.",
        "",
        "| section | size (q×g) | implementation | wall s | CPU s | peak extra MB | speed-up (wall) "
        "| mem ratio | agreement / quality |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.section} | {r.size} | {r.impl} | {r.seconds:.2f} | {r.cpu_seconds:.2f} | {r.peak_mb:.0f} | "
            f"{r.speedup} | {r.memory} | {r.agreement} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        worker(argv[1], Path(argv[2]), int(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.25,0.5,1", help="fractions of Market-1501 size, comma-separated")
    p.add_argument("--skip-dense-above", type=float, default=float("inf"),
                   help="skip the dense reference forms for sizes above this fraction")
    p.add_argument("--dense-fp32", action="store_true",
                   help="also run the dense re-ranking with float32 V (isolates float16 rounding)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the fast forms (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-queries", type=int, default=200, help="queries timed for the latency section")
    p.add_argument("--sections", default="evaluate,rerank,latency", help="which sections to run")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = p.parse_args(argv)
    import torch

    args.torch_threads = torch.get_num_threads()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    rows: list[Row] = []
    load_before = _load()
    t0 = time.perf_counter()
    for frac in sizes:
        data = make_data(frac, args.seed)
        with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
            datadir = Path(tmp)
            for key, arr in data.items():
                np.save(datadir / f"{key}.npy", arr)
            np.save(datadir / "distmat.npy", squared_distances(data["q_feats"], data["g_feats"]))
            chosen = {x.strip() for x in args.sections.split(",")}
            for section in SECTIONS:
                if section.__name__.removeprefix("bench_").replace("query_", "") not in chosen:
                    continue
                new = section(data, datadir, frac, args)
                for r in new:
                    print(
                        f"{r.section:12s} {r.size:22s} {r.impl:50s} {r.seconds:8.2f}s "
                        f"{r.cpu_seconds:8.2f}s CPU {r.peak_mb:8.0f}MB  {r.agreement}",
                        file=sys.stderr,
                        flush=True,
                    )
                rows.extend(new)
    table = to_markdown(rows, args, time.perf_counter() - t0, load_before)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
