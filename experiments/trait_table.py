"""Every shipped trait extracted on the embedded model: pairs kept, causality slope, monotonic or
not.

    python experiments/trait_table.py                        # runlocal, judge-free contrast filter
    python experiments/trait_table.py --filter margin        # runlocal with the local judge's
    margin filter python experiments/trait_table.py --set n_per_question=1 --set temperature=0.0
    --set batch_size=16  # greedy

Each trait runs `configs/extract.py:runlocal` (its own defaults, whatever they are) with the filter
named by `--filter`: `contrast` (judge.backend='none', no judge at all), `margin` (the local judge,
the SmolLM2 judging itself), `none` (every non-empty pair: the filter's own ablation) or `config`
(runlocal exactly as shipped). `--set FIELD=VALUE` overrides any other config field (Python
literal). Runs live in `--workdir/<trait>`, shared by every filter: the answers are made once and
another
`--filter` only rejudges, refilters and retests them (a repeated call only prints). Prints a
markdown table and writes it, with a CSV, to `--out` (default `<workdir>/<filter>_table.{md,csv}`).

A trait whose filter keeps fewer than `filter.min_pairs` pairs is reported with its kept count and
no vector (the extraction's own error says why).
"""

from __future__ import annotations

import argparse
import ast
import csv
import logging
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs.extract import get_config  # noqa: E402

TRAITS = ("evil", "sycophantic", "hallucinating", "optimistic", "impolite", "apathetic", "humorous")


def config_for(trait: str, filt: str, workdir: str, sets: list[str]):
    cfg = get_config("runlocal")
    # One run directory per trait: every filter refilters the same answers (provenance keeps them).
    cfg.trait, cfg.workdir = trait, os.path.join(workdir, trait)
    if filt in ("contrast", "none"):
        cfg.judge.backend, cfg.filter.mode, cfg.filter.coherence = "none", filt, 0.0
    elif filt == "margin":
        cfg.judge.backend, cfg.judge.model, cfg.filter.mode = "local", "same", "margin"
    for item in sets:
        key, _, value = item.partition("=")
        *sections, leaf = key.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        node[leaf] = ast.literal_eval(value)
    return cfg


def measure(cfg) -> dict:
    from pvjax.methods.extraction import ExtractionError, run

    t0 = time.time()
    try:
        s = run(cfg, progress=False)
    except ExtractionError as e:
        m = re.search(r"only (\d+) of (\d+) answer pairs", str(e))
        return {
            "trait": cfg.trait,
            "kept": int(m.group(1)) if m else 0,
            "pairs": int(m.group(2)) if m else 0,
            "layers": {},
            "error": str(e).split(";")[0],
            "seconds": time.time() - t0,
        }
    layers = {int(l): r for l, r in s["causality"]["layers"].items()}
    return {
        "trait": cfg.trait,
        "kept": s["counts"]["kept"],
        "pairs": s["counts"]["pairs"],
        "layers": layers,
        "agreement": (s.get("agreement") or {}).get("spearman"),
        "error": "",
        "seconds": time.time() - t0,
    }


def table(rows: list[dict]) -> tuple[str, list[dict]]:
    layers = sorted({l for r in rows for l in r["layers"]})
    head = (
        ["trait", "kept / pairs"]
        + [f"slope L{l}" for l in layers]
        + [f"monotonic L{l}" for l in layers]
    )
    flat = []
    for r in rows:
        d = {"trait": r["trait"], "kept / pairs": f"{r['kept']} / {r['pairs']}"}
        for l in layers:
            x = r["layers"].get(l)
            d[f"slope L{l}"] = "" if x is None else f"{x['slope']:+.3f}"
            d[f"monotonic L{l}"] = "" if x is None else ("yes" if x["monotonic"] else "no")
        if r["error"]:
            d["trait"] += " (no vector)"
        flat.append(d)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(d[h] for h in head) + " |" for d in flat]
    return "\n".join(md), flat


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traits", default=",".join(TRAITS))
    p.add_argument("--filter", default="contrast", choices=("contrast", "margin", "none", "config"))
    p.add_argument("--workdir", default="runs/trait_table")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--out", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    for trait in args.traits.split(","):
        r = measure(config_for(trait, args.filter, args.workdir, args.set))
        rows.append(r)
        print(
            f"{trait}: kept {r['kept']} of {r['pairs']} in {r['seconds']:.0f} s "
            + " ".join(
                f"L{l} slope {x['slope']:+.3f}{' mono' if x['monotonic'] else ''}"
                for l, x in r["layers"].items()
            )
            + (f"  [{r['error']}]" if r["error"] else ""),
            flush=True,
        )
    md, flat = table(rows)
    print(md)
    out = args.out or os.path.join(args.workdir, f"{args.filter}_table")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(md + "\n")
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    print(f"written: {out}.md, {out}.csv")


if __name__ == "__main__":
    main()
