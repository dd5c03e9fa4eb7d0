"""Prometheus metrics of one engine, in a registry of its own (several engines, e.g. in tests,
never share series). Counters and histograms are fed by the engine thread as requests finish;
gauges are read from the engine when ``/metrics`` is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("xlaserve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.cached_tokens = Counter("xlaserve_prefix_cache_hit_tokens",
                                     "Prompt tokens served from the prefix cache (not prefilled)",
                                     registry=r)
        self.generation_tokens = Counter("xlaserve_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("xlaserve_requests_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("xlaserve_time_to_first_token_seconds",
                              "From arrival to the first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("xlaserve_time_per_output_token_seconds",
                              "Mean time between a request's generated tokens", buckets=_TOKEN_BUCKETS,
                              registry=r)
        self.e2e = Histogram("xlaserve_e2e_request_latency_seconds", "From arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("xlaserve_requests_running", "Requests holding a decode slot", registry=r)
        self.waiting = Gauge("xlaserve_requests_waiting", "Requests queued for a slot", registry=r)
        self.kv_usage = Gauge("xlaserve_kv_cache_usage_ratio",
                              "Fraction of the KV cache's blocks referenced by requests and sessions "
                              "(of the sliding-window layers' pool instead where that is fuller)",
                              registry=r)
        self.kv_blocks = Gauge("xlaserve_kv_cache_blocks", "KV cache blocks by state (used: referenced; "
                               "window_used, window_total: the sliding-window layers' own pool)",
                               ["state"], registry=r)
        self.preemptions = Gauge("xlaserve_preemptions",
                                 "Running requests whose KV blocks were taken back (recomputed later)",
                                 registry=r)
        self.hit_rate = Gauge("xlaserve_prefix_cache_hit_rate",
                              "Cached prompt tokens / all prompt tokens since start", registry=r)
        self.compiles = Gauge("xlaserve_xla_compilations", "XLA compilations in this process",
                              registry=r)
        # Speculative decoding: tokens proposed, proposed tokens accepted, and verified rows
        # (each a decode row's step: accepted drafts + 1 tokens).
        self.spec_drafted = Counter("xlaserve_spec_draft_tokens", "Draft tokens proposed (speculative decoding)",
                                    registry=r)
        self.spec_accepted = Counter("xlaserve_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.spec_rows = Counter("xlaserve_spec_verified_rows", "Decode rows checked in verify calls", registry=r)
        self.spec_length = Gauge("xlaserve_spec_mean_accepted_length",
                                 "Tokens a verified row advances on average (accepted drafts + 1)", registry=r)
        self.adapters = Gauge("xlaserve_lora_adapters_loaded", "LoRA adapters loaded", registry=r)
        self.images_encoded = Counter("xlaserve_images_encoded", "Images the vision tower encoded (not from its cache)",
                                      registry=r)
        self.adapter_requests = Counter("xlaserve_lora_requests", "Requests submitted per LoRA adapter",
                                        ["adapter"], registry=r)

    def render(self, engine) -> bytes:
        from service.engine.runner import compile_count

        snap = engine.snapshot()
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"])
        usage = snap["kv_tokens"] / snap["kv_capacity"]
        self.kv_blocks.labels("used").set(snap["kv_blocks_used"])
        self.kv_blocks.labels("total").set(snap["kv_blocks"])
        if snap["window_blocks"]:
            usage = max(usage, snap["window_blocks_used"] / snap["window_blocks"])
            self.kv_blocks.labels("window_used").set(snap["window_blocks_used"])
            self.kv_blocks.labels("window_total").set(snap["window_blocks"])
        self.kv_usage.set(usage)
        self.preemptions.set(snap["preemptions"])
        total = snap["prompt_tokens"] + snap["cached_tokens"]
        self.hit_rate.set(snap["cached_tokens"] / total if total else 0.0)
        self.compiles.set(compile_count())
        self.adapters.set(len(engine.adapters.loaded()) if engine.adapters is not None else 0)
        return generate_latest(self.registry)


def snapshot(engine) -> dict[str, float]:
    """An engine's counts for /metrics and /v1/loads (read without locking: each value is a
    plain read)."""
    blocks, size = engine.blocks, engine.blocks.block_size
    return dict(running=len(engine.table.running), waiting=engine.waiting.count,
                kv_tokens=blocks.used_blocks() * size, kv_capacity=blocks.total_blocks() * size,
                kv_blocks_used=blocks.used_blocks(), kv_blocks=blocks.total_blocks(),
                window_blocks_used=sum(g.used() for g in blocks.groups[1:]), window_blocks=blocks.window_blocks * blocks.replicas,
                preemptions=engine.scheduler.preemptions, prompt_tokens=engine.stats.prompt_tokens,
                cached_tokens=engine.stats.cached_tokens)
