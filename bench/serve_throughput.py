"""Serving throughput: `lmsmith serve` against llama.cpp's own server, same model, same requests.

Builds a randomly initialised model of --preset (default small) with a tokenizer trained on
Python's pydoc text, saves it as an HF directory (served by lmsmith) and as an f16 GGUF
(served by llama-server). Both servers run with 32 slots, measured in turn level by level
over --rounds rounds (an idle server takes no CPU); for each client count C,
C concurrent streaming clients send a fixed mix of requests (prompts of 32-256 tokens,
32-128 new tokens, greedy, ignore_eos so both generate exactly max_tokens) through
/v1/completions. Printed per server and C: total generated tokens/s, time to first token
p50/p95, per-token latency p50/p95; the speed-up over one client (requests one at a time);
lmsmith / llama.cpp (the median of the rounds' ratios); and each server's peak resident memory.

    python bench/serve_throughput.py --llama-server PATH/TO/llama-server [--clients 1,4,16,32] [--scheme q8_0]
                                     [--rounds 3] [--dtype auto]

--scheme q8_0 (or q4_k_m, ...): both servers run the same GGUF file of that scheme, lmsmith with
--packed (its packed-matmul kernels); the default f16 serves lmsmith's float HF directory against
llama-server's f16 file.

llama-server: build it from the llama.cpp sources in llama-cpp-python's sdist:
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF && \\
        cmake --build build --target llama-server -j 2      # ~10 min on 2 cores
Without --llama-server only lmsmith is measured.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX512-BF16 (which figures depend on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({'AVX512-BF16' if 'avx512_bf16' in info else 'no AVX512-BF16'})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(preset: str, out: Path, scheme: str = "f16") -> tuple[Path, Path, str]:
    """(HF dir, GGUF of `scheme`, corpus text) for a random model of `preset`."""
    import pydoc_data.topics

    import torch

    from lmsmith import checkpoint
    from lmsmith.config import preset as get_preset
    from lmsmith.model import build_model
    from lmsmith.quant.gguf import export_gguf
    from lmsmith.tokenizer import Tokenizer

    topics = pydoc_data.topics.topics
    text = "\n".join(topics[k] for k in sorted(topics))
    cfg = get_preset(preset)
    tok = Tokenizer.train([text], vocab_size=cfg.vocab_size, show_progress=False)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)  # a peaked distribution, like a trained model's
    checkpoint.save(model, tok, out / "hf")
    export_gguf(model, tok, out / f"model-{scheme}.gguf", scheme, progress=False)
    return out / "hf", out / f"model-{scheme}.gguf", text


def make_requests(text: str, n: int, seed: int = 0) -> list[dict]:
    """n completions requests of mixed prompt lengths (32-256 tokens, ~4 characters each) and outputs."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        chars = 4 * rng.choice([32, 64, 128, 256])
        start = rng.randrange(0, len(text) - chars)
        reqs.append({"prompt": text[start:start + chars], "max_tokens": rng.choice([32, 64, 128]),
                     "temperature": 0, "ignore_eos": True, "stream": True})
    return reqs


class Proc:
    def __init__(self, cmd: list[str], port: int, env=None):
        self.port = port
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {self.p.stderr.read()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{cmd[0]} did not start")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def one_request(port: int, body: dict) -> dict:
    """Stream one completion; return its arrival times of generated pieces."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]}")
    times = []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if obj.get("choices") and obj["choices"][0].get("finish_reason") is None:
            times.append(time.perf_counter())
    conn.close()
    return {"start": t0, "times": times, "tokens": body["max_tokens"]}


def run_level(port: int, model: str, reqs: list[dict], clients: int) -> dict:
    todo = list(reqs)
    lock = threading.Lock()
    results = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                body = {**todo.pop(0), "model": model}
            res = one_request(port, body)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    tpot = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"clients": clients, "tok_s": sum(r["tokens"] for r in results) / wall, "wall": wall,
            "ttft": pct(ttft), "tpot": pct(tpot)}


def pct(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.95 * len(xs)))]


def measure(name: str, proc: Proc, model: str, text: str, clients: int, round_: int = 0) -> dict:
    """One level: C clients through `proc` (new prompts each round: no prompt-cache hits); printed as it ends."""
    row = run_level(proc.port, model, make_requests(text, max(16, 2 * clients), seed=1000 * round_ + clients), clients)
    row["server"] = name
    print(f"  {name:9s} {clients:3d} clients: {row['tok_s']:7.1f} tok/s   TTFT p50 {row['ttft'][0] * 1e3:7.0f} ms "
          f"p95 {row['ttft'][1] * 1e3:7.0f} ms   per token p50 {row['tpot'][0] * 1e3:6.1f} ms "
          f"p95 {row['tpot'][1] * 1e3:6.1f} ms", flush=True)
    return row


def start_servers(args, hf: Path, gguf: Path, context: int) -> dict[str, Proc]:
    """lmsmith's server, and llama-server if given: both up at once (an idle one takes no CPU)."""
    procs = {}
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    served = [str(hf)] if args.scheme == "f16" else [str(gguf), "--packed"]
    procs["lmsmith"] = Proc([sys.executable, "-m", "lmsmith", "serve", *served, "--port", str(port), "--model-name",
                             "m", "--max-batch", str(args.slots), "--max-queue", "1000", "--dtype", args.dtype],
                            port, env)
    if args.llama_server:
        port = free_port()
        try:
            procs["llama.cpp"] = Proc([args.llama_server, "-m", str(gguf), "--port", str(port), "-np",
                                       str(args.slots),
                                       "-c", str(args.slots * context), "-t", str(args.threads),
                                       "--cont-batching", "--no-webui"], port)
        except RuntimeError:
            procs["lmsmith"].stop()
            raise
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--slots", type=int, default=32, help="slots of both servers (default 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server binary")
    ap.add_argument("--scheme", default="f16", help="f16 (lmsmith float vs llama.cpp f16), or a GGUF scheme both "
                                                    "servers run from the same file (lmsmith --packed)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all levels, both servers interleaved "
                                                           "(default 3; the table shows medians)")
    ap.add_argument("--dtype", default="auto", help="lmsmith serve --dtype (default auto: bf16 where native)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    import torch

    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        hf, gguf, text = make_model(args.preset, Path(tmp), args.scheme)
        context = json.loads((hf / "config.json").read_text())["max_position_embeddings"]
        results: dict[str, dict[int, list[float]]] = {}
        rss: dict[str, float] = {}
        # Level by level and round by round, the servers in turn: a noisy minute on a shared VM then
        # slows both alike. Fresh servers each round: llama-server stalled in a second sweep (0.3.36).
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            procs = start_servers(args, hf, gguf, context)
            try:
                for proc in procs.values():
                    run_level(proc.port, "m", make_requests(text, 2, seed=99), 2)  # warm-up
                for c in levels:
                    for name, proc in procs.items():
                        results.setdefault(name, {}).setdefault(c, []).append(
                            measure(name, proc, "m", text, c, r)["tok_s"])
            finally:
                for name, proc in procs.items():
                    rss[name] = max(rss.get(name, 0.0), proc.peak_rss_mb())
                    proc.stop()
    print()
    print(f"{args.preset} preset ({args.scheme}; lmsmith --dtype {args.dtype}), {args.slots} slots, greedy, mixed "
          f"prompts 32-256 / outputs 32-128 tokens; median of {args.rounds} rounds (range)")
    ours = {c: statistics.median(v) for c, v in results["lmsmith"].items()}
    head = "clients  lmsmith tok/s          vs 1 client"
    if "llama.cpp" in results:
        head += "  llama.cpp tok/s        lmsmith/llama.cpp (per round)"
    print(head)
    for c in levels:
        line = f"{c:7d}  {ours[c]:7.1f} ({_span(results['lmsmith'][c])})  {ours[c] / ours[levels[0]]:10.2f}x"
        if "llama.cpp" in results:
            theirs = results["llama.cpp"][c]
            ratios = [a / b for a, b in zip(results["lmsmith"][c], theirs)]
            line += (f"  {statistics.median(theirs):7.1f} ({_span(theirs)})  {statistics.median(ratios):6.2f}x "
                     f"({', '.join(f'{x:.2f}' for x in ratios)})")
        print(line)
    print("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()))


def _span(xs: list[float]) -> str:
    return f"{min(xs):.0f}-{max(xs):.0f}"


if __name__ == "__main__":
    main()
