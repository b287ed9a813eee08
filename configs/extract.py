"""Persona-vector extraction (`pvjax.methods.extraction`).

    pvjax extract --config configs/extract.py --config.trait=evil --config.workdir=runs/evil
    pvjax extract --config configs/extract.py:runlocal --config.trait=humorous
    --config.workdir=/tmp/h

`trait` is a shipped trait name (`pvjax traits list`) or the path of a trait JSON file. The default
variant is the paper's setup (Qwen2.5-7B-Instruct from a local folder, an OpenAI-compatible judge,
threshold filter); `runlocal` runs everything on this machine: the embedded SmolLM2 answers a few
questions (6 questions x 2 instruction pairs, three answers each sampled at temperature 1: 36
candidate pairs) and the judge-free contrast filter keeps the pairs (no judge at all;
`--config.judge.backend=local` adds the model judging itself, and the agreement of its scores with
the contrast scores lands in summary.json).

Why runlocal samples and filters by contrast, measured on every shipped trait with
`experiments/trait_table.py` (README, "Trait table on the embedded model"): sampled, the contrast
filter keeps 14-31 of 36 pairs, over a third for every trait, and the causality margin rises
monotonically at layer 20 for all seven. Greedy single answers keep 7-9 of 12 on six traits but 1
on hallucinating (the 135M model's pos and neg answers barely differ), and the 135M model judging
itself keeps 0-5 of 12 and leaves two traits without a vector.
"""

import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.trait = "evil"
    c.workdir = ""
    c.model = "Qwen/Qwen2.5-7B-Instruct"  # a local folder of safetensors
    c.dtype = ""
    # Qwen3's chat-template switch: False renders answers without a reasoning block (persona
    # work reads the answer); other templates have no switch and ignore it. `--thinking` sets it.
    c.enable_thinking = False
    c.n_questions = 0  # 0: all questions of the extract split
    c.n_pairs = 0  # 0: all instruction pairs
    c.n_per_question = 10
    c.max_new_tokens = 1000
    c.temperature = 1.0
    c.top_p = 1.0
    c.seed = 0
    c.batch_size = 16
    # The layer layout answers are generated on (`pvjax.engine.generate.generate_ids`'s `unroll`):
    # unrolled
    # decodes faster, scanned compiles in about a fifth of the time (the better trade for a few
    # short answers, as in CI). The last bits differ (kernel vs XLA dots), so it is part of the
    # answers' provenance when scanned.
    c.unroll = True
    c.pos_name = ""  # defaults to the trait name: "You are an evil assistant."
    c.neg_name = "helpful"
    c.plot = True

    c.judge = ml_collections.ConfigDict()
    c.judge.backend = (
        "openai"  # or "local": a pvjax model judges; "none": no judge (contrast/none filters)
    )
    c.judge.model = "gpt-4.1-mini"  # for local: "same" (the answering model) or a model source
    c.judge.base_url = ""  # default: $OPENAI_BASE_URL or api.openai.com
    c.judge.concurrency = 8
    c.judge.batch_size = 8
    c.judge.coherence = True  # also judge coherence (needed by filter.coherence > 0)
    c.judge.numeric_only = False  # local judges: constrain the answer token to numbers

    c.filter = ml_collections.ConfigDict()
    # "threshold": the reference's rule on judge scores; "margin": pos - neg judge score, for weak
    # judges; "contrast": judge-free, pos - neg contrast score (log-likelihood of the answer under
    # the
    # pos vs the neg system prompt, nats/token) >= contrast_margin; "none": every non-empty pair.
    c.filter.mode = "threshold"
    c.filter.threshold = 50.0
    c.filter.coherence = 50.0
    c.filter.margin = 10.0
    c.filter.contrast_margin = 0.1  # nats per token, filter.mode="contrast"
    c.filter.min_pairs = 5

    c.causality = ml_collections.ConfigDict()
    c.causality.layers = ()  # empty: four layers between a quarter and three quarters of the depth
    c.causality.coefs = (-2.0, -1.0, 0.0, 1.0, 2.0)
    c.causality.max_pairs = 32

    # A mesh of this process's devices for generation and the forwards (pooling, contrast and
    # causality
    # scores, a local judge): data x model must equal the device count; 1 x 1 is one device, no
    # mesh.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.model = 1

    # A multi-process job (README, "Running on a pod"): every process runs the same command, each
    # does a share of every stage, process 0 writes the workdir. "" is one process; "auto" detects
    # a TPU slice, SLURM or Open MPI job; HOST:PORT is process 0's address, with num_processes and
    # process_id (0 and -1: from the cluster environment).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.timeout = 300  # seconds to wait for every process to join

    if "runlocal" in arg.split(","):
        c.model = "smollm2-135m-instruct"
        c.n_questions = 6
        c.n_pairs = 2
        c.n_per_question = 3
        c.max_new_tokens = 48
        c.temperature = 1.0
        c.batch_size = (
            18  # one instruction's 6 x 3 prompts in one batch: one program, no ragged tail
        )
        c.judge.backend = "none"  # "local": the model judges itself with the settings below
        c.judge.model = "same"
        c.judge.coherence = False
        c.judge.numeric_only = True
        c.filter.mode = "contrast"
        c.filter.contrast_margin = 0.1
        c.filter.margin = 1.0  # for filter.mode="margin" with the local judge
        c.filter.coherence = 0.0
        c.filter.min_pairs = 2
        c.causality.layers = (10, 20)
        c.causality.coefs = (-1.0, 0.0, 1.0)
        c.causality.max_pairs = 6
    return c


def sweep(add):
    """Every shipped trait on the paper's setup."""
    for trait in (
        "evil",
        "sycophantic",
        "hallucinating",
        "optimistic",
        "impolite",
        "apathetic",
        "humorous",
    ):
        add(trait=trait, workdir=f"runs/{trait}")
