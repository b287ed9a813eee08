"""The server's counters, read by `GET /metrics` in the Prometheus text format (version 0.0.4).

Counters only grow; gauges (queue length, running requests, occupancy) are read from the
scheduler when the page is asked for. One lock guards every update: the engine thread and the
HTTP workers both write.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.flagged = defaultdict(int)  # monitor -> answers flagged
        self.monitored = defaultdict(int)  # monitor -> answers read
        self.cancelled = 0
        self.timeouts = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def finished(self, n_prompt: int, n_new: int, latency: float, ttft: float | None) -> None:
        with self._lock:
            self.prompt_tokens += n_prompt
            self.generation_tokens += n_new
            self.latency_sum += latency
            self.latency_count += 1
            if ttft is not None:
                self.ttft_sum += ttft
                self.ttft_count += 1

    def monitor(self, name: str, flagged: bool) -> None:
        with self._lock:
            self.monitored[name] += 1
            self.flagged[name] += int(flagged)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The page: every counter, then `gauges` (`name -> (help, value)`)."""
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP pvjax_{name} {help_}")
            lines.append(f"# TYPE pvjax_{name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(
                    f"pvjax_{name}{{{lab}}} {value:g}" if lab else f"pvjax_{name} {value:g}"
                )

        with self._lock:
            metric(
                "requests_total",
                "counter",
                "Requests answered, by endpoint and HTTP status.",
                [
                    ({"endpoint": e, "status": str(s)}, n)
                    for (e, s), n in sorted(self.requests.items())
                ],
            )
            metric(
                "prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                [({}, self.prompt_tokens)],
            )
            metric(
                "generation_tokens_total",
                "counter",
                "New tokens of finished requests.",
                [({}, self.generation_tokens)],
            )
            metric(
                "monitored_total",
                "counter",
                "Answers read by each monitor.",
                [({"monitor": m}, n) for m, n in sorted(self.monitored.items())],
            )
            metric(
                "flagged_total",
                "counter",
                "Answers flagged by each monitor (projection >= threshold).",
                [({"monitor": m}, n) for m, n in sorted(self.flagged.items())],
            )
            metric(
                "cancelled_total",
                "counter",
                "Requests whose client left before the end.",
                [({}, self.cancelled)],
            )
            metric(
                "timeouts_total",
                "counter",
                "Requests stopped by the request timeout.",
                [({}, self.timeouts)],
            )
            metric(
                "request_seconds", "summary", "Time from admission request to the last token.", []
            )
            lines.append(f"pvjax_request_seconds_sum {self.latency_sum:g}")
            lines.append(f"pvjax_request_seconds_count {self.latency_count}")
            metric("time_to_first_token_seconds", "summary", "Time to the first new token.", [])
            lines.append(f"pvjax_time_to_first_token_seconds_sum {self.ttft_sum:g}")
            lines.append(f"pvjax_time_to_first_token_seconds_count {self.ttft_count}")
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [({}, value)])
        return "\n".join(lines) + "\n"


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
