"""Serving benchmark (issue 13): continuous batching against one-at-a-time generation, in the same process.

    python tests/benchmarks/bench_serving.py --model /tmp/run1/export --threads 2 --out bench_serving.json
    python tests/benchmarks/bench_serving.py --model /tmp/run1/export --soak-seconds 600 --soak-clients 8 \\
        --clients "" --out soak.json                                 # the soak alone

1. Sequential: each prompt through ``Aligner.generate`` alone, greedy (the reference tokens and the baseline).
2. For each level of concurrent clients (default 1, 2, 4, 8, 16, 32): closed-loop clients, each submitting its next
   prompt when its last one is done, through the scheduler in-process and/or (``--modes http``) through
   ``aligner-serve``'s endpoint on 127.0.0.1 with httpx, streaming. Throughput (generated tokens/s over the level's
   wall time), p50/p95 latency, p50/p95 time to first token, and how many answers differ from the sequential ones
   (target 0).
3. The sequential baseline again; with ``--rounds N`` steps 2 and 3 repeat, and each level's ratio is taken against
   the mean of the baselines just before and after it, so that a drift of the machine's load cancels.
4. Soak (``--soak-seconds``): ``--soak-clients`` clients for that long; errors (target 0), and the resident set
   sampled every 10 s (target: flat after warm-up).

Prompts: the shipped held-out sets, harmful and harmless interleaved, so batches mix gates. Not run by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[2] / "export" / "aligner_export" / "data" / "prompts"


def load_prompts(count: int) -> list[str]:
    def lines(name):
        return [p for p in (PROMPTS / name).read_text().splitlines() if p.strip() and not p.startswith("#")]

    harmful, harmless = lines("harmful_heldout.txt"), lines("harmless_heldout.txt")
    mixed = [p for pair in zip(harmful, harmless) for p in pair]
    return mixed[:count]


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def sequential(aligner, prompts, new_tokens) -> dict:
    results, latencies, ttfts = [], [], []
    start = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        result = aligner.generate(prompt, max_new_tokens=new_tokens)
        latencies.append(time.perf_counter() - t0)
        ttfts.append(result.prefill_seconds)
        results.append(result)
    wall = time.perf_counter() - start
    tokens = sum(r.new_tokens for r in results)
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "latency_p50": round(percentile(latencies, 50), 3),
            "latency_p95": round(percentile(latencies, 95), 3), "ttft_p50": round(percentile(ttfts, 50), 3),
            "ttft_p95": round(percentile(ttfts, 95), 3), "gates": [r.gate for r in results],
            "_tokens": [r.token_ids for r in results]}


class InProcessClient:
    """Submits through the scheduler directly."""

    def __init__(self, aligner, scheduler, new_tokens):
        from aligner_runtime.generate import SamplingConfig

        self.aligner, self.scheduler = aligner, scheduler
        self.config = SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=aligner.stop_token_ids)
        self.ids = {}

    def ask(self, prompt: str) -> tuple[list[int] | str, float, float]:
        ids = self.ids.get(prompt) or self.ids.setdefault(prompt, self.aligner.tokenizer.encode_prompt(prompt))
        start = time.monotonic()
        handle = self.scheduler.submit(ids, self.config)
        handle.wait()
        if handle.error:
            raise RuntimeError(handle.error)
        return handle.token_ids, handle.finished - start, (handle.first_token or handle.finished) - start


class HttpClient:
    """Asks ``aligner-serve``'s endpoint (chat, streaming, greedy): the text stands in for the tokens."""

    def __init__(self, url, new_tokens):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=600)
        self.new_tokens = new_tokens

    def ask(self, prompt: str):
        start = time.monotonic()
        first, text = None, []
        body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": self.new_tokens,
                "stream": True}
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]}")
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    if first is None:
                        first = time.monotonic()
                    text.append(chunk["choices"][0]["delta"].get("content", ""))
        done = time.monotonic()
        return "".join(text), done - start, (first or done) - start


def closed_loop(make_client, prompts, clients: int, requests: int, deadline: float | None = None,
                on_sample=None) -> dict:
    """``clients`` threads share ``requests`` jobs (or run until ``deadline``), each one request at a time."""
    lock = threading.Lock()
    next_job = [0]
    records, errors = [], []

    def worker():
        client = make_client()
        while True:
            with lock:
                job = next_job[0]
                next_job[0] += 1
            if deadline is None and job >= requests:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            prompt_index = job % len(prompts)
            try:
                output, latency, ttft = client.ask(prompts[prompt_index])
                with lock:
                    records.append((prompt_index, output, latency, ttft))
            except Exception as exc:  # counted: the soak's target is zero
                with lock:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if on_sample:
            on_sample()
    wall = time.perf_counter() - start
    return {"records": records, "errors": errors, "wall": wall}


def summarise(run: dict, tokens_of) -> dict:
    latencies = [r[2] for r in run["records"]]
    ttfts = [r[3] for r in run["records"]]
    tokens = sum(tokens_of(r) for r in run["records"])
    return {"requests": len(run["records"]), "errors": len(run["errors"]), "tokens": tokens,
            "seconds": round(run["wall"], 2), "tokens_per_s": round(tokens / run["wall"], 2),
            "latency_p50": round(percentile(latencies, 50), 3), "latency_p95": round(percentile(latencies, 95), 3),
            "ttft_p50": round(percentile(ttfts, 50), 3), "ttft_p95": round(percentile(ttfts, 95), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/run1/export", help="steered export directory (SmolLM2)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts (harmful/harmless interleaved)")
    p.add_argument("--clients", default="1,2,4,8,16,32", help="concurrency levels, comma-separated ('' = none)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per level: max(this x clients, "
                   "--prompts)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--prefill", default="alone", choices=("alone", "together"))
    p.add_argument("--modes", default="inprocess",
                   help="inprocess (the scheduler directly) and/or http (aligner-serve's endpoint), comma-separated")
    p.add_argument("--http", action="store_true", help="the same as --modes http")
    p.add_argument("--rounds", type=int, default=1, help="rounds of all levels, each followed by a baseline")
    p.add_argument("--soak-seconds", type=float, default=0)
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args()

    from aligner_runtime import Aligner
    from aligner_runtime.serving.scheduler import Scheduler

    aligner = Aligner.load(args.model, threads=args.threads)
    prompts = load_prompts(args.prompts)
    report = {"model": str(args.model), "threads": args.threads, "new_tokens": args.new_tokens,
              "prompts": len(prompts), "max_batch_size": args.max_batch_size, "prefill": args.prefill,
              "modes": args.modes if not args.http else "http", "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    aligner.generate(prompts[0], max_new_tokens=4)  # warm-up
    print(f"sequential baseline over {len(prompts)} prompts ...", file=sys.stderr, flush=True)
    base = sequential(aligner, prompts, args.new_tokens)
    reference = base.pop("_tokens")
    texts = [aligner.tokenizer.decode([t for t in ids if t not in aligner.stop_token_ids]) for ids in reference]
    report["sequential"] = base
    print(json.dumps({"sequential": {k: v for k, v in base.items() if k != "gates"}}), file=sys.stderr, flush=True)

    scheduler = Scheduler.for_aligner(aligner, max_batch_size=args.max_batch_size, max_queue=1024,
                                      prefill=args.prefill)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.http and "http" not in modes:
        modes = ["http"]
    live = None
    if "http" in modes:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from aligner_runtime.serving.http import Server, create_app
        from test_serve_http import LiveServer

        live = LiveServer(create_app(Server(aligner, scheduler, model_name="bench", request_timeout=3600)))
        live.__enter__()
    # Per mode: a client factory, whether a record differs from the sequential answer, its generated tokens.
    clients_of = {
        "inprocess": (lambda: InProcessClient(aligner, scheduler, args.new_tokens),
                      lambda record: record[1] != reference[record[0]], lambda record: len(record[1])),
        "http": (lambda: HttpClient(live.url, args.new_tokens), lambda record: record[1] != texts[record[0]],
                 lambda record: len(aligner.tokenizer.encode(record[1])) if record[1] else 0),
    }

    # Rounds of levels between sequential baselines: a level's ratio is against the mean of the baselines just
    # before and just after it, which cancels most of a drift in the machine's load.
    levels, baselines = [], [base]
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    for round_index in range(args.rounds if counts else 0):
        this_round = []
        for clients in counts:
            for mode in modes:
                make_client, mismatched, tokens_of = clients_of[mode]
                requests = max(args.requests_per_client * clients, len(prompts))
                run = closed_loop(make_client, prompts, clients, requests)
                level = {"round": round_index, "mode": mode, "clients": clients, **summarise(run, tokens_of),
                         "mismatches": sum(mismatched(r) for r in run["records"])}
                level["speedup_vs_before"] = round(level["tokens_per_s"] / baselines[-1]["tokens_per_s"], 2)
                this_round.append(level)
                print(json.dumps(level), file=sys.stderr, flush=True)
        again = sequential(aligner, prompts, args.new_tokens)
        again.pop("_tokens")
        again.pop("gates")
        mean = (baselines[-1]["tokens_per_s"] + again["tokens_per_s"]) / 2
        for level in this_round:
            level["speedup_vs_after"] = round(level["tokens_per_s"] / again["tokens_per_s"], 2)
            level["speedup_vs_mean"] = round(level["tokens_per_s"] / mean, 2)
        baselines.append(again)
        levels += this_round
        print(json.dumps({"sequential_after": again}), file=sys.stderr, flush=True)
    report["levels"] = levels
    report["sequential_baselines"] = [{k: v for k, v in b.items() if k != "gates"} for b in baselines]
    summary = {}
    for level in levels:
        summary.setdefault(f"{level['mode']}/{level['clients']}", []).append(level["speedup_vs_mean"])
    report["speedup_vs_mean_median"] = {key: statistics.median(v) for key, v in summary.items()}
    if summary:
        print(json.dumps({"speedup_vs_mean_median": report["speedup_vs_mean_median"]}), file=sys.stderr, flush=True)

    if args.soak_seconds > 0:
        samples, last = [], [0.0]
        start = time.monotonic()

        def sample():
            now = time.monotonic()
            if now - last[0] >= 10:
                last[0] = now
                samples.append((round(now - start, 1), round(rss_mb(), 1)))

        make_client, mismatched, tokens_of = clients_of[modes[0]]
        run = closed_loop(make_client, prompts, args.soak_clients, 0, deadline=start + args.soak_seconds,
                          on_sample=sample)
        soak = {"clients": args.soak_clients, "seconds_target": args.soak_seconds, **summarise(run, tokens_of),
                "mismatches": sum(mismatched(r) for r in run["records"]), "error_samples": run["errors"][:5]}
        warm = [rss for t, rss in samples if t >= 60] or [rss for _, rss in samples]
        soak["rss_mb_first_minute_end"] = warm[0] if warm else None
        soak["rss_mb_end"] = samples[-1][1] if samples else None
        soak["rss_mb_max_after_warmup"] = max(warm) if warm else None
        soak["rss_samples"] = samples
        report["soak"] = soak
        print(json.dumps({k: v for k, v in soak.items() if k != "rss_samples"}), file=sys.stderr, flush=True)

    if live is not None:
        live.__exit__(None, None, None)
    scheduler.close()
    report["load_average_end"] = os.getloadavg()
    report["scheduler"] = scheduler.stats()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("soak",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
