# %% [markdown]
# # pvjax walkthrough: extract, steer, monitor, ablate (percent-format notebook)
#
# Run it as a script (`python notebooks/walkthrough.py`) or open it with jupytext. Everything runs
# on the embedded SmolLM2-135M-Instruct on a CPU, through the library API:
#
# 1. **extract** a persona vector for a trait (`pvjax.methods.extraction.run` with
# `configs/extract.py:runlocal`);
# 2. **steer** with it: fixed coefficients and closed-loop rows (`interventions.cap` / `target`)
# side
#    by side in one batched generation, plus the judge-free likelihood margin per coefficient;
# 3. **monitor**: the last prompt token's projection onto the vector under trait / anti-trait
#    system prompts, read before a single token is generated;
# 4. **ablate**: project the direction out at one layer (and at every layer) and compare the margin
#    with the unablated baseline.
#
# Settings from the environment: `PVJAX_NOTEBOOK_SHORT=1` (CI: fewer questions, 16-24 new tokens,
# a couple of minutes on a CPU), `PVJAX_NOTEBOOK_WORKDIR` (default `runs/notebook`; the extraction
# there is reused by a rerun and by `notebooks/monitoring.py`), `PVJAX_NOTEBOOK_TRAIT` (default
# `humorous`). Plots land in `<workdir>/plots/`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: the notebook also runs headless in CI
import matplotlib.pyplot as plt
import numpy as np
from _common import extract_vector, save

import pvjax
from pvjax import interventions as ivs
from pvjax.engine.generate import SamplingParams, generate
from pvjax.files.traits import load_trait
from pvjax.files.vectors import read_vector
from pvjax.measure.causality import likelihood_margins
from pvjax.methods.extraction import system_prompt
from pvjax.methods.monitoring import last_prompt_projections, prompt_ids, unit_rows
from pvjax.studies import grid

SHORT = os.environ.get("PVJAX_NOTEBOOK_SHORT", "") not in ("", "0")
WORK = Path(os.environ.get("PVJAX_NOTEBOOK_WORKDIR", "runs/notebook")).resolve()
TRAIT = os.environ.get("PVJAX_NOTEBOOK_TRAIT", "humorous")
LAYER = 20  # hidden_states row: the output of block 20 of SmolLM2's 30
N_Q = 2 if SHORT else 6  # eval questions for steering, monitoring and ablation
NEW = 16 if SHORT else 48  # new tokens per answer
# Short mode generates on the scanned layer layout (`unroll=False`): it compiles in about a fifth
# of the time of the unrolled default and decodes slower, the right trade for a few 16-token
# answers.
UNROLL = not SHORT


# %% [markdown]
# ## 1. Extract
# The quickstart's run: the embedded model answers the trait's extraction questions under pos/neg
# system prompts, pairs are filtered judge-free by their contrast score, and the vector is the
# difference of mean response activations, `[n_layers+1, D]`. Short mode answers fewer questions
# with shorter answers and keeps every non-empty pair (a vector of the right shape and direction
# for the demo, not a good one).

# %%
summary = extract_vector(WORK / "extract", TRAIT, short=SHORT, layer=LAYER)

model = pvjax.load("smollm2-135m-instruct")
L, D = model.n_layers + 1, model.hidden_size
v_LD = read_vector(str(WORK / "extract" / "vectors.safetensors") + ":response_avg_diff", model)
u_LD = unit_rows(v_LD)
norms = np.linalg.norm(v_LD, axis=-1)
print(f"vector {v_LD.shape}, norm at layer {LAYER}: {norms[LAYER]:.2f}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(norms, marker=".")
ax.set(xlabel="layer (hidden_states row)", ylabel="||v||", title=f"{TRAIT}: vector norm per layer")
save(fig, WORK / "plots" / "vector_norms.png")

# %% [markdown]
# ## 2. Steer: fixed and closed-loop rows in one batch
# Every (setting, question) is a row of one batched generation, each row with its own
# intervention. Fixed rows add `coef * v` at the layer; the `cap` row removes only the part of the
# projection above a ceiling (here 0), the `target` row pulls the projection half-way toward it
# at every token. All
# rows answer under the trait's *pos* system prompt, so the closed-loop rows suppress.

# %%
trait_eval = load_trait(TRAIT, "eval")
questions = list(trait_eval.questions[:N_Q])
pair = trait_eval.instruction[0]
pos_sys, neg_sys = system_prompt(TRAIT, pair.pos), system_prompt("helpful", pair.neg)

neg_last = last_prompt_projections(model, prompt_ids(model, questions, system=neg_sys), v_LD)
ceiling = 0.0  # the answer may not lean toward the trait at this layer at all
settings = {
    "coef -1": -1.0,
    "coef 0": 0.0,
    "coef +1": 1.0,
    f"cap {ceiling:.1f}": ivs.cap(ceiling),
    f"target {ceiling:.1f}": ivs.target(ceiling, gain=0.5),
}
names = list(settings)
row_coefs = [settings[n] for n in names for _ in questions]
iv = ivs.build(L, D, steer=[(v_LD, LAYER, row_coefs)], batch=len(row_coefs))
g = generate(
    model,
    [q for _ in names for q in questions],
    system=pos_sys,
    intervention=iv,
    positions="response",
    probes=u_LD[:, None],
    sampling=SamplingParams(max_new_tokens=NEW),
    batch_size=len(row_coefs),
    unroll=UNROLL,
)
mean_proj = {}
for s, name in enumerate(names):
    rows = range(s * N_Q, (s + 1) * N_Q)
    mean_proj[name] = float(np.mean([g.projections[i][LAYER, :, 0].mean() for i in rows]))
    print(f"{name:>14}: mean projection {mean_proj[name]:7.2f} | {g.texts[s * N_Q][:70]!r}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for s, name in enumerate(names):
    axes[0].plot(g.projections[s * N_Q][LAYER, :, 0], label=name)
axes[0].axhline(ceiling, color="k", lw=0.8, ls=":")
axes[0].set(
    xlabel="generated token", ylabel=f"projection at layer {LAYER}", title="question 1, per token"
)
axes[0].legend(fontsize=7)
axes[1].bar(range(len(names)), [mean_proj[n] for n in names])
axes[1].set_xticks(range(len(names)), names, rotation=30, fontsize=7)
axes[1].set(ylabel="mean projection", title="mean over tokens and questions")
save(fig, WORK / "plots" / "steer_projection.png")

# %% [markdown]
# The judge-free likelihood margin: mean per-token log-likelihood of the model's own pos answer
# minus its neg answer (no system prompt; the steering alone must carry the trait), per
# coefficient. It should rise with the coefficient.

# %%
(WORK / "steer").mkdir(parents=True, exist_ok=True)
refs = grid.reference_answers(
    model, trait_eval, questions, WORK / "steer", max_new_tokens=NEW, batch_size=8, unroll=UNROLL
)
coefs = [-2.0, 0.0, 2.0] if SHORT else [-4.0, -2.0, 0.0, 2.0, 4.0]
lm = likelihood_margins(
    model,
    v_LD,
    [LAYER],
    coefs,
    [r["question"] for r in refs],
    [r["pos_answer"] for r in refs],
    [r["neg_answer"] for r in refs],
)
margins = lm["layers"][LAYER]["margins"]
print(
    "margin per coefficient:",
    dict(zip(coefs, np.round(margins, 3))),
    f"slope {lm['layers'][LAYER]['slope']:.3f}",
)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(coefs, margins, marker="o")
ax.set(
    xlabel="steering coefficient", ylabel="likelihood margin (nats/token)", title=f"layer {LAYER}"
)
save(fig, WORK / "plots" / "steer_margin.png")

# %% [markdown]
# ## 3. Monitor: the last prompt token, before generation
# The same questions under the trait's pos and neg system prompts; one packed forward each, no
# generation. The projection per layer should separate the two.

# %%
pos_last = last_prompt_projections(model, prompt_ids(model, questions, system=pos_sys), v_LD)
gap_L = pos_last.mean(0) - neg_last.mean(0)
print(
    f"layer {LAYER}: pos {np.round(pos_last[:, LAYER], 2)}  neg {np.round(neg_last[:, LAYER], 2)}  "
    f"gap {gap_L[LAYER]:.2f}; largest gap at layer {int(np.argmax(gap_L))}"
)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].plot(gap_L, marker=".")
axes[0].set(
    xlabel="layer", ylabel="mean pos - neg projection", title="last prompt token, per layer"
)
axes[1].scatter(np.zeros(N_Q), neg_last[:, LAYER], label="neg system prompt")
axes[1].scatter(np.ones(N_Q), pos_last[:, LAYER], label="pos system prompt")
axes[1].set_xticks([0, 1], ["neg", "pos"])
axes[1].set(ylabel=f"projection at layer {LAYER}", title="per prompt")
axes[1].legend(fontsize=7)
save(fig, WORK / "plots" / "monitor.png")

# %% [markdown]
# ## 4. Ablate: project the direction out
# Directional ablation (`h <- h - (h.u) u`) at the layer and at every layer, against the unablated
# baseline, on the same judge-free margin. Ablating the trait direction should pull the margin
# down toward zero; all three settings are rows of the same batched forwards.

# %%
variants = {
    "baseline": ivs.build(L, D),
    f"ablate layer {LAYER}": ivs.build(L, D, ablate=[(v_LD, LAYER)]),
    "ablate all layers": ivs.build(L, D, ablate=[(v_LD, list(range(1, L)))]),
}
ablated = grid.margins(
    model, grid.stack(list(variants.values())), refs, positions="response", batch_size=8
)
for name, m in zip(variants, ablated):
    print(f"{name:>18}: margin {m:+.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(range(len(variants)), ablated)
ax.set_xticks(range(len(variants)), list(variants), fontsize=8)
ax.set(ylabel="likelihood margin (nats/token)", title="directional ablation vs baseline")
save(fig, WORK / "plots" / "ablate.png")
