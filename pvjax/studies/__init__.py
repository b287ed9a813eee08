"""Studies: what researchers run on top of a persona vector, each from a config file.

The contract every study keeps (so `pvjax run` / `pvjax sweep` can run any of them):

- `configs/<study>.py` has `get_config(arg)` returning a ConfigDict with `study = "<name>"` (the
  module `pvjax.studies.<name>`), `model`, `trait`, `vector` (`FILE[:KEY]`, or empty: extract the
  trait's vector first, see `vector_source`), `extract` (an extraction config, used only when
  `vector` is empty) and `workdir`; optionally `sweep(add)` beside it.
- `pvjax.studies.<name>.run(cfg, work: Path, *, progress: bool = True) -> list[dict]` runs (or
  resumes) one point into `work` and returns its summary rows; it writes its own results and plots
  there, atomically, and skips what a previous attempt finished.
- `validate(cfg, work)` raises a `UserError` for anything wrong with the whole config (layers
  against the model's depth, read from its metadata), before any compute and before anything is
  written (the runner calls it for every point of a sweep before the first one runs and before a
  point's `point.json`); a study without one is checked only when it runs. Optional:
  `OWN_PROVENANCE = True` for a study that decides itself what a rerun under a changed config
  redoes (extraction), instead of the runner refusing the directory.

`pvjax run` / `pvjax sweep` (`pvjax.studies.runner`) run a study from its config file.
"""
