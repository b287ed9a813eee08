"""The settings shared by the methods, typed: what a study or command unpacks its config into once,
at the boundary, so that no function below it reads a config.

Each type groups parameters that travel together through the library (the clusters that used to
grow every signature one keyword at a time):

- `Sampling`: how answers are drawn (`max_new_tokens`, `temperature`, `top_p`) and from which seed;
  `SamplingParams(**sampling.engine_fields())` is the engine's (settings sit below the engine, so
  the methods, which use both, build it).
- `Judging`: which judge scores answers and how it is reached (a config's `judge` section).
- `Workspace`: where a method writes and caches, in what batches, with or without plot and
  progress bars.
- `VectorChoice`: the persona vector `[L, D]`, the layer the method reads it at and the spec
  (`FILE[:KEY]`) it was read from, which results record.
- `Bootstrap`: how many resamples a bootstrap interval takes, at what level, from which seed.
- `ThresholdRule` and `ScoreMeaning`: how a monitor's threshold is chosen, and what the scores it
  was calibrated on are (`pvjax.methods.monitoring.calibrate`).

They are frozen, so a setting cannot change under a running method, and built from plain values:
the `of` constructors read a config section (a dict or an ml_collections `ConfigDict`) and are the
only place here that knows a config. `VectorChoice` holds an array, so it is a
`flax.struct.dataclass` (a pytree whose array is the one leaf, layer and spec static); the others
are never pytrees and are plain frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.struct
import numpy as np

from pvjax.settings.fields import InvalidConfig, check_fields, integer, number


def _get(section, key: str, default):
    """`section[key]`, or `default` where the section lacks it (an older or a smaller config)."""
    try:
        return section[key]
    except (KeyError, AttributeError):
        return default


_SAMPLING_FIELDS = {
    "max_new_tokens": integer(1),
    "temperature": number(0.0),
    "top_p": number(0.0, 1.0, lo_open=True),
    "seed": integer(-(2**63)),
}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How answers are sampled: `temperature == 0` is greedy (and ignores `top_p` and `seed`).
    Checked on construction, as the engine's `SamplingParams` checks them, so a bad value fails
    before any model loads (`InvalidConfig`, naming every bad field)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        problems = []
        check_fields(dataclasses.asdict(self), _SAMPLING_FIELDS, problems)
        if problems:
            raise InvalidConfig("bad sampling settings: " + "; ".join(problems))

    def engine_fields(self) -> dict:
        """The fields of the engine's `SamplingParams`: all but the seed, which generation takes
        apart."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }

    @classmethod
    def of(cls, cfg) -> "Sampling":
        """From a config's `max_new_tokens`, `temperature`, `top_p` (default 1) and `seed`
        (default 0)."""
        return cls(
            max_new_tokens=int(cfg["max_new_tokens"]),
            temperature=float(cfg["temperature"]),
            top_p=float(_get(cfg, "top_p", 1.0)),
            seed=int(_get(cfg, "seed", 0)),
        )


@dataclasses.dataclass(frozen=True)
class Judging:
    """The judge: `backend` 'openai' (an OpenAI-compatible server: `model`, `base_url`,
    `concurrency` requests at once), 'local' (a pvjax model: `model` a source, or '' / 'same' for
    the answering model; `batch_size` rows, `numeric_only` constrains the answer token to numbers)
    or 'none'. `coherence`: also score coherence where a method can use it."""

    backend: str = "none"
    model: str = ""
    base_url: str = ""
    concurrency: int = 8
    batch_size: int = 8
    coherence: bool = True
    numeric_only: bool = False

    @classmethod
    def of(cls, section) -> "Judging":
        """From a config's `judge` section; a field it lacks takes the default above."""
        return cls(**{f.name: _get(section, f.name, f.default) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Where a method writes (`work`) and caches answers (`cache_dir`, None: its own default under
    `work`), its batch size (rows per generation or forward call), whether it draws its plot and
    shows progress bars."""

    work: Path
    cache_dir: Path | None = None
    batch_size: int = 16
    plot: bool = True
    progress: bool = False

    def __post_init__(self):
        object.__setattr__(self, "work", Path(self.work))
        if self.cache_dir:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        else:
            object.__setattr__(self, "cache_dir", None)

    def cache(self, default: str = "answer_cache") -> Path:
        """The answer cache folder: `cache_dir`, else `work/default`."""
        return self.cache_dir or self.work / default


@flax.struct.dataclass
class VectorChoice:
    """A persona vector `[L, D]` (hidden_states rows), the `layer` a method reads it at (None where
    the method picks the layer itself, as calibrating a monitor does) and the `spec` it came from
    (`FILE[:KEY]`, recorded in results; '' when it came from elsewhere)."""

    vector: Any
    layer: int | None = flax.struct.field(pytree_node=False)
    spec: str = flax.struct.field(pytree_node=False, default="")

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.vector)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """A percentile bootstrap: `n` resamples, a `level` interval, indices drawn from `seed` (the
    same seed, the same interval)."""

    n: int = 1000
    level: float = 0.95
    seed: int = 0

    @classmethod
    def of(cls, section) -> "Bootstrap":
        """From a config's `bootstrap` section (`n`, `level`, `seed`)."""
        return cls(n=section["n"], level=section["level"], seed=section["seed"])


@dataclasses.dataclass(frozen=True)
class ScoreMeaning:
    """What a monitor's scores are, as its file records them: scores of `trait`, of `kind` 'judge'
    or 'contrast'; `label` says which counted as the trait expressed (e.g. "judge score >= 50")."""

    trait: str
    kind: str
    label: str


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """How a monitor's threshold is chosen (`pvjax.methods.monitoring.choose_threshold`): 'youden',
    or 'fpr' (the largest true-positive rate with a false-positive rate <= `target_fpr`)."""

    rule: str = "youden"
    target_fpr: float = 0.1
