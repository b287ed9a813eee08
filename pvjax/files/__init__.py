"""File formats and how they are written: persona-vector files (`vectors`), llama.cpp control
vectors (`control_vectors`), trait files (`traits`), training datasets (`datasets`), prompt lists
(`prompts`), atomic writes (`atomic`), figures (`plots`) and the run-directory ledger (`ledger`;
extraction's stages in `run_provenance`).

A leaf: imports only `pvjax.errors` and the capture's pooling names."""
