"""`pvjax run --config configs/<study>.py[:variant] [--config.x=y ...] --workdir DIR`: one point of
a study (see `pvjax.studies.runner`). `pvjax sweep` (same arguments) runs every point the config's
`sweep(add)` declares, each in `DIR/<point>/`. Both write `DIR/summary.csv` and print it; a rerun
skips finished points and resumes a killed one. With `--config.distributed.*` (or, for a study,
`--config.extract.distributed.*`) naming a coordinator, every process of the job runs this same
command; the points are split between them and process 0 writes the summary.
"""

from __future__ import annotations


def add_parser(sub, name: str = "run"):
    sweep = name == "sweep"
    from pvjax.commands.extract import add_config_command

    p = add_config_command(
        sub,
        name,
        (
            "run every point of a config's sweep(add)"
            if sweep
            else "run a study from a config file (steer, ablate, extract, ...)"
        ),
        __doc__,
        lambda args: run(args, sweep=sweep),
        example="configs/steer.py:runlocal",
    )
    p.add_argument("--workdir", default="", help="output directory (default: the config's workdir)")
    return p


def run(args, *, sweep: bool = False) -> int:
    from pvjax.commands.extract import log_setup, overrides
    from pvjax.studies import jobs, runner

    log_setup()
    study, root, points = runner.load(args.config, overrides(args), args.workdir, sweep=sweep)
    job = jobs.join_job(points)  # a multi-process job: every process runs this same command
    rows = runner.run_points(study, root, points, progress=not args.quiet and job.writer, job=job)
    if not job.writer:
        return 0
    print(runner.table(rows))
    print(
        f"summary: {root / 'summary.csv'} ({len(rows)} rows from {len(points)} point"
        f"{'s' if len(points) != 1 else ''})"
    )
    return 0
