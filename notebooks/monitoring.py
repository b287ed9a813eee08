# %% [markdown]
# # Monitoring with a persona vector (percent-format notebook: run it as a script or open it with
# # jupytext)
#
# The paper's monitoring signal is the projection of the **last prompt token** onto the persona
# vector, read before any token is generated; during generation, the per-token projections trace
# the trait as the answer unfolds. This notebook uses the vector of a run directory given as its
# first argument (e.g. `runs/quickstart/humorous` from `python experiments/quickstart.py`), else the
# walkthrough's extraction in `$PVJAX_NOTEBOOK_WORKDIR/extract` (default `runs/notebook`), which it
# runs first when it is not there. About a minute on a CPU after that; `PVJAX_NOTEBOOK_SHORT=1`
# (CI) answers fewer questions with fewer tokens. The plot lands in `<workdir>/plots/`.

# %%
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: the notebook also runs headless in CI
import matplotlib.pyplot as plt
import numpy as np
from _common import extract_vector, save

import pvjax
from pvjax.engine.generate import SamplingParams, generate
from pvjax.files.traits import load_trait
from pvjax.files.vectors import read_vector

SHORT = os.environ.get("PVJAX_NOTEBOOK_SHORT", "") not in ("", "0")
WORK = Path(os.environ.get("PVJAX_NOTEBOOK_WORKDIR", "runs/notebook")).resolve()
args = [a for a in sys.argv[1:] if not a.startswith("-")][:2]  # a notebook kernel passes `-f FILE`
args = args if args and os.path.isdir(args[0]) else []
LAYER = int(args[1]) if len(args) > 1 else 20
RUN = (
    args[0]
    if args
    else extract_vector(WORK / "extract", "humorous", short=SHORT, layer=LAYER)["workdir"]
)
model = pvjax.load("smollm2-135m-instruct")
v = read_vector(os.path.join(RUN, "vectors.safetensors") + ":response_avg_diff", model)
unit = v / np.linalg.norm(v, axis=-1, keepdims=True)  # [L, D], one unit direction per layer

# %% [markdown]
# ## Last prompt token under trait and anti-trait system prompts
# Held-out questions (the eval split) under each instruction pair: the projection at the last
# prompt token should be higher under the trait prompt, before a single token is generated.

# %%
trait = load_trait("humorous", "eval")
questions = list(trait.questions[: 2 if SHORT else 4])
rows = {}
for pol in ("pos", "neg"):
    pair = trait.instruction[0]
    system = (
        f"You are a humorous assistant. {pair.pos}"
        if pol == "pos"
        else f"You are a helpful assistant. {pair.neg}"
    )
    # Short mode: the scanned layer layout, which compiles in about a fifth of the unrolled time.
    g = generate(
        model,
        questions,
        system=system,
        probes=unit[:, None],
        unroll=not SHORT,
        sampling=SamplingParams(max_new_tokens=16 if SHORT else 24),
    )
    rows[pol] = g
    last = [float(p[LAYER, -1, 0]) for p in g.prompt_projections]
    print(f"{pol}: last-prompt-token projection at layer {LAYER}: {np.round(last, 2)}")
gap = np.mean([p[LAYER, -1, 0] for p in rows["pos"].prompt_projections]) - np.mean(
    [p[LAYER, -1, 0] for p in rows["neg"].prompt_projections]
)
print(f"mean gap (pos - neg): {gap:.2f}")

# %% [markdown]
# ## Per-token trace during generation
# `projections[i]` is `[L, new tokens, K]`: every layer's residual at every generated token.

# %%
g = rows["pos"]
trace = g.projections[0][LAYER, :, 0]
toks = [model.tokenizer.decode([t]) for t in g.tokens[0]]
for t, p in zip(toks, trace):
    print(f"{p:8.2f}  {t!r}")

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(trace, marker=".")
ax.set_xticks(range(len(toks)), toks, rotation=90, fontsize=6)
ax.set(ylabel=f"projection at layer {LAYER}", title="per-token trace, trait system prompt")
save(fig, WORK / "plots" / "monitoring_trace.png")
