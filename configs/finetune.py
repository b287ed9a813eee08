"""Supervised finetuning, optionally with preventative steering, CAFT or a projection penalty.

    pvjax finetune --config configs/finetune.py:runlocal --workdir runs/ft
    pvjax finetune --config configs/finetune.py --config.model=/models/Qwen2.5-7B-Instruct \
        --config.data.train_file=evil_II.jsonl --config.vector=runs/evil/vectors.safetensors \
        --config.steering.type=steer --config.steering.coef=5.0 --config.steering.layers='(20,)' \
        --workdir runs/ft-evil-preventative

The default variant is the reference's training setup (rsLoRA off, r 32, alpha 64, all seven linear
targets, batch 2 x 8 accumulation, lr 1e-5, 5 warmup steps, linear decay, one epoch). `runlocal`
trains a rank-8 LoRA of the embedded SmolLM2 on `helpful_chat` (chat samples shipped in
`pvjax/data/finetune/`, written for this project) for 24 steps: a few minutes on a 2-core CPU.

Reference keys, for those coming from it: training_file -> data.train_file, max_seq_length ->
data.max_length, r -> lora.rank, lora_alpha -> lora.alpha, use_rslora -> lora.rslora,
target_modules -> lora.targets, per_device_train_batch_size -> batch.rows,
gradient_accumulation_steps -> batch.accum, steering_config.steering_vector_path -> vector
(FILE[:KEY]), steering_config.type / steering_coef / layers -> steering.type / coef / layers.
Steering layers are hidden-state rows, as in vector files (row l = output of block l).
"""

import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.model = (
        "Qwen/Qwen2.5-7B-Instruct"  # a local folder of safetensors, a .gguf, or the embedded name
    )
    c.workdir = ""
    c.dtype = ""  # how the frozen base is stored: "" = float32 on CPU, bfloat16 on accelerators
    c.compute_dtype = "float32"  # "bfloat16": bf16 forward/backward, float32 master weights
    c.remat = (
        True  # recompute each block in the backward pass (jax.checkpoint on the scanned block)
    )
    c.seed = 0
    c.mesh_model = 1  # devices on the mesh's "model" axis; the rest go to "data"
    # Several processes, one run (README, "Running on a pod"): the mesh spans every process's
    # devices.
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator="", num_processes=0, process_id=-1, timeout=300)
    )

    c.data = ml_collections.ConfigDict()
    c.data.train_file = (
        ""  # .jsonl ({"messages": [...]}) or .csv (question|prompt, answer), or a shipped name
    )
    c.data.eval_file = ""  # empty: hold out data.eval_fraction of the training samples
    c.data.eval_fraction = 0.1
    c.data.max_length = 2048  # packed row width, and the longest sample
    c.data.too_long = "truncate"  # or "drop" or "error"; counted in the data report either way

    c.method = "lora"  # or "full"
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.rslora = False
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.lora.layers = ()  # block indices 0..N-1 (peft's layers_to_transform); empty = all

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 5
    c.optim.schedule = "linear"  # or "cosine"
    c.optim.max_grad_norm = 1.0

    c.batch = ml_collections.ConfigDict()
    c.batch.rows = 2  # packed rows per micro-batch (global, split over the mesh's "data" axis)
    c.batch.accum = 8  # micro-batches per optimiser step
    c.epochs = 1
    c.max_steps = 0  # > 0 overrides epochs

    c.vector = ""  # FILE[:KEY]: the persona vector for steering, penalty and the shift monitor
    c.steering = ml_collections.ConfigDict()
    c.steering.type = ""  # "steer" (preventative steering) or "ablate" (CAFT); empty: none
    c.steering.coef = 0.0
    c.steering.layers = ()  # hidden-state rows
    c.penalty = ml_collections.ConfigDict()
    c.penalty.weight = 0.0  # loss += weight * mean projection of assistant tokens onto unit v
    c.penalty.layers = ()  # rows; empty: steering.layers, else the monitor layer
    c.monitor = ml_collections.ConfigDict()
    c.monitor.layer = 0  # row of the trait-shift monitor; 0 = first steering layer, else 2/3 depth
    c.monitor.max_shift = 0.0  # > 0: stop early once the shift along unit v exceeds it

    c.eval_every = 0  # steps between evaluations (eval loss, trait shift); 0 = at the end only
    c.log_every = 1
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.export = ml_collections.ConfigDict()
    c.export.merged = True  # <workdir>/export/merged: a Hugging Face folder
    c.export.adapters = True  # <workdir>/export/adapter: peft's layout (LoRA only)

    if "runlocal" in arg.split(","):
        c.model = "smollm2-135m-instruct"
        c.data.train_file = "helpful_chat"
        c.data.max_length = 256
        c.data.eval_fraction = 0.15
        c.lora.rank = 8
        c.lora.alpha = 16.0
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 3
        c.batch.rows = 2
        c.batch.accum = 1
        c.max_steps = 24
        c.eval_every = 8
        c.checkpoint.every = 8
    return c
