"""The generation engine: batched prefill and decode with interventions and per-token monitoring
in one compiled program (`generate`), its loop (`decode_loop`), prompt sharing (`prompt_split`),
its layout on a mesh (`mesh`), interventions as batch rows (`rows`), steering terms, the one format
of the CLI, configs, studies and server (`terms`), a model's own answers kept on disk
(`answer_cache`), and the step engine continuous batching runs on (`slots`, with its programs in
`slot_programs`).

May import: the model contract (`pvjax.model`, `interventions`, `capture`, `inputs`), `models`,
`kernels`, `files`, `parallel`. Never `measure`, `methods`, `studies` or the CLI."""
