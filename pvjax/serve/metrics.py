"""The server's counters, read by `GET /metrics` in the Prometheus text format (version 0.0.4).

Counters only grow; gauges (queue length, running requests, occupancy) are read from the
scheduler when the page is asked for. One lock guards every update: the engine thread and the
HTTP workers both write.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# (metric, attribute, help): a number, or a `monitor -> n` dict labelled by monitor.
COUNTERS = (
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of finished requests."),
    ("generation_tokens_total", "generation_tokens", "New tokens of finished requests."),
    ("monitored_total", "monitored", "Answers read by each monitor."),
    ("flagged_total", "flagged", "Answers flagged by each monitor (projection >= threshold)."),
    ("cancelled_total", "cancelled", "Requests whose client left before the end."),
    ("timeouts_total", "timeouts", "Requests stopped by the request timeout."),
)
# (metric, attribute prefix of its `_sum` and `_count`, help)
SUMMARIES = (
    ("request_seconds", "latency", "Time from admission request to the last token."),
    ("time_to_first_token_seconds", "ttft", "Time to the first new token."),
)


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
            for name, attr, help_ in COUNTERS:
                metric(name, "counter", help_, _samples(getattr(self, attr)))
            for name, attr, help_ in SUMMARIES:
                metric(name, "summary", help_, [])
                lines.append(f"pvjax_{name}_sum {getattr(self, attr + '_sum'):g}")
                lines.append(f"pvjax_{name}_count {getattr(self, attr + '_count')}")
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [({}, value)])
        return "\n".join(lines) + "\n"


def _samples(x) -> list:
    """A counter's samples: one unlabelled number, or one per monitor of a `monitor -> n` dict."""
    if isinstance(x, dict):
        return [({"monitor": m}, n) for m, n in sorted(x.items())]
    return [({}, x)]


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
