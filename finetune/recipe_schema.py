"""The recipe's typed schema: one dataclass per section, the one home of every key's default and its comment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from finetune.tasks import TASKS

TaskName = Literal[tuple(TASKS)]  # a new task is its module and its line in finetune.tasks.TASKS

# ---------------------------------------------------------------------------------------------------------------
# The schema. Field comments are the documentation; `finetune cp` gives a commented example.


@dataclass
class Backbone:
    name: str  # offline zoo name | hub id | timm model name | local directory
    dropout: Optional[float] = 0.1  # backbone dropout (hidden+attention for text, drop_rate for timm); null: keep
    drop_path: float = 0.0  # timm stochastic depth
    pretrained: bool = True  # false: same architecture, random weights (the from-scratch baseline)
    trust_remote_code: bool = False  # run model code from the hub; only for sources you trust
    # keep N of the pretrained layers, evenly spaced (the first and the last kept): a shallower, faster student
    # (transformers text backbones; timm models with one stack of blocks, such as ViT); null: all of them
    layers: Optional[int] = None


@dataclass
class Head:
    type: Literal["linear", "mlp"] = "linear"  # linear: one layer on the pooled output | mlp: head.hidden layers first
    hidden: list[int] = field(default_factory=list)  # mlp layer widths
    dropout: float = 0.1  # on the head's input (and between mlp layers)
    pooling: Literal["auto", "cls", "mean"] = "auto"  # auto: what the ecosystem's own class pools
    # tags: a tag per word, token-classification's only problem (it takes it whatever this says by default)
    problem: Literal["single_label", "multi_label", "regression", "tags"] = "single_label"
    threshold: float = 0.5  # multi_label: a label is predicted when its sigmoid exceeds this


@dataclass
class Data:
    # offline zoo data set | csv/tsv/json/jsonl/parquet file | image folder | hub:<id> | token-classification:
    # a CoNLL file (.conll, .iob, and .txt, which `finetune predict` reads as one text per line instead)
    train: str
    validation: Optional[str] = None  # null: a stratified val_fraction of train (seeded), saved in split.json
    test: Optional[str] = None  # null: the data set's own test split when it has one, else no test pass
    val_fraction: float = 0.1  # the share of train held out for validation when data.validation is null
    max_samples: Optional[int] = None  # cap the rows of each split (quick experiments)
    text_column: str = "text"  # tables: the column holding each row's text
    text_pair_column: Optional[str] = None  # sentence pairs (NLI, paraphrase, STS): the second text of each row
    tokens_column: str = "tokens"  # token-classification tables: a list of words per row
    tags_column: str = "tags"  # token-classification tables: a list of tags per row, one per word
    label_all_tokens: bool = False  # token-classification: a word's tag on all its sub-tokens (B- becoming I-)
    image_column: str = "image"  # image tables: paths (relative to the file) or image bytes
    label_column: str = "label"  # multi_label: a list column or an "a|b|c" string; regression: a number
    max_length: int = 256  # text: tokens per example, longer texts are truncated; batches padded to their longest row
    image_size: Optional[int] = None  # vision; null: the backbone's pretrained input size
    skip_bad_images: bool = False  # vision: skip (and count) unreadable images instead of stopping with an error
    # loader processes; null: 0 for text; images: 0 on CPUs whose every core trains (decoded images then stay in
    # memory), else up to 4 (tasks.image_classification)
    num_workers: Optional[int] = None
    # few labels: N training rows per class (seeded by train.seed, listed in split.json), cut after validation is
    # held out; a class with fewer rows is an error (label-free rows keep all). multi_label: greedy, rarest label first,
    # until each label is on N rows; tags: sentences holding each entity type; label-free rows: one more class
    train_per_class: Optional[int] = None
    validation_per_class: Optional[int] = None  # the same for validation (its file, or the part held out of train)


@dataclass
class Augment:
    """Train-time image augmentation, done by timm's own transforms; evaluation is always deterministic."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    hflip: float = 0.5  # probability of a horizontal flip
    auto_augment: Optional[str] = None  # timm policy: rand-m9-mstd0.5-inc1 (RandAugment) | trivialaugment | null
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # mixup alpha; 0: off
    cutmix: float = 0.0  # cutmix alpha; 0: off


@dataclass
class Ema:
    decay: float = 0.9998  # timm's ModelEmaV3; the EMA weights are evaluated and can be the kept model


@dataclass
class EarlyStopping:
    metric: Optional[str] = None  # null: eval.select_best
    patience: int = 2  # evaluations without improvement before stopping (epochs, or train.eval_every steps)


@dataclass
class Freeze:
    """How much of the pretrained backbone trains, epoch by epoch (the head always trains)."""

    head_warmup: int = 0  # epochs of training the head alone, then everything
    unfreeze_every: Optional[int] = None  # staged: the head alone, then one more layer from the top every K epochs


@dataclass
class Train:
    epochs: int = 3  # passes over the training data
    # stop after this many optimizer steps, whatever train.epochs says (the schedule spans them, as in the
    # transformers Trainer); null: train.epochs
    max_steps: Optional[int] = None
    eval_every: Optional[int] = None  # validate every N optimizer steps (and at the last); null: after each epoch
    batch_size: int = 32  # per process; the global batch is batch_size x processes x grad_accum
    eval_batch_size: Optional[int] = None  # null: 2 x batch_size
    lr: float = 5.0e-5  # peak learning rate (AdamW), reached after train.warmup
    head_lr: Optional[float] = None  # null: same as lr
    weight_decay: float = 0.01  # never on biases, norm weights, nor what timm's no_weight_decay() names
    # transformers' schedules (SchedulerType): cosine | linear | constant (with warmup) | cosine_with_min_lr |
    # cosine_warmup_with_min_lr | warmup_stable_decay | polynomial | cosine_with_restarts | inverse_sqrt |
    # constant_with_warmup; each takes its own train.scheduler_args. reduce_lr_on_plateau | greedy: the lr follows
    # eval.select_best after each validation (mode max/min from the metric; no warmup), as the Trainer steps them
    scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt",
        "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau", "greedy",
    ] = "cosine"
    # the schedule's own arguments, as transformers names them: {min_lr_rate: 0.1} (cosine_with_min_lr),
    # {num_decay_steps: 0.2, decay_type: linear} (warmup_stable_decay; steps as an int or a fraction of all steps),
    # {lr_end: 1.0e-7, power: 2.0} (polynomial), {num_cycles: 3} (cosine_with_restarts), {timescale: 100}
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    warmup: Union[int, float] = 0.1  # float < 1: fraction of steps; int: steps
    grad_accum: int = 1  # micro-batches summed into one optimizer step
    max_grad_norm: Optional[float] = 1.0  # null: no clipping
    # auto: bf16/fp16 on GPUs, bf16 autocast on CPUs with native bf16 (AVX512_BF16/AMX), fp32 on the others
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42  # weights of the new head, data order, dropout, the held-out validation split
    early_stopping: Optional[EarlyStopping] = None  # {metric: accuracy, patience: 2}
    label_smoothing: float = 0.0  # single_label cross-entropy (and mixup/cutmix targets)
    ema: Optional[Ema] = None  # {decay: 0.9998}: keep an exponential moving average of the weights
    # vision memory format; null: on for convolutional backbones on GPUs, measured on CPUs (finetune.step_choice)
    channels_last: Optional[bool] = None
    # none | backbone (linear probe: the head alone) | {head_warmup: N} | {unfreeze_every: K}
    freeze: Union[Literal["none", "backbone"], Freeze] = "none"
    layer_decay: Optional[float] = None  # e.g. 0.75: each layer below the head gets this times the lr of the one above
    # frozen backbone without augmentation: compute its features once (cached on disk) and train the head on them;
    # null: whenever that is possible
    cache_features: Optional[bool] = None
    group_by_length: bool = False  # text: batches of similar lengths (shuffled groups): less padding, faster epochs
    sampler: Literal["random", "balanced"] = "random"  # balanced: draw every class equally often (skewed labels)
    freeze_embeddings: bool = False  # text: keep the word embeddings as pretrained (a third of MiniLM's weights)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the model (pays off on long runs; the first steps compile)
    # CPU training: dropout (and the attention's dropout) with a cheaper random mask, same rate (finetune.dropout;
    # ~40% of a text forward pass otherwise); false: torch's own dropout. Ignored on GPUs.
    fast_dropout: bool = True
    # accelerate's experiment trackers, the recipe logged as each run's config: tensorboard (in the run folder) |
    # wandb | mlflow | comet_ml | aim | clearml | dvclive | trackio | swanlab; [] for none
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio",
                           "swanlab"]] = field(default_factory=lambda: ["tensorboard"])
    log_project: str = "finetune"  # the trackers' project (wandb, comet_ml, trackio) or experiment (mlflow, ...)
    checkpoint_every: Optional[int] = None  # optimizer steps between resumable checkpoints; null: at each epoch's end
    keep_checkpoints: int = 1  # resumable checkpoints kept (the newest); the best model is kept apart
    # single_label loss weights: auto (inverse class frequency in train, mean 1) | one number per label | null
    class_weights: Union[Literal["auto"], list[float], None] = None


@dataclass
class Lora:
    """Low-rank adapters through peft: the backbone stays frozen, small matrices beside chosen layers train."""

    r: int = 8  # rank of the update
    alpha: int = 16  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05  # on the adapters' input
    target_modules: Union[Literal["auto"], list[str]] = "auto"  # auto: peft's table per architecture, or ours for timm
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train too


@dataclass
class Contrastive:
    """SetFit's first stage, before the head trains: the backbone tuned so that the embeddings the head reads (mean
    pooled with head.pooling=mean) of rows of one class are alike. The head then trains as train.freeze says."""

    pairs: int = 20  # pairs per labelled row: half with a row of its class (target 1), half another's (0); seeded
    epochs: int = 1  # passes over the drawn pairs (SetFit: num_epochs of its first stage)
    lr: float = 2.0e-5  # linear warm-up over 10% of the steps, then linear decay
    batch_size: int = 16  # pairs per step
    # cosine: MSE between cos(u, v) and the pair's target (CosineSimilarityLoss); supcon: each batch's rows contrasted
    # together (SupConLoss, temperature 0.07). multi_label targets: the Jaccard similarity of the two label sets
    loss: Literal["cosine", "supcon"] = "cosine"


@dataclass
class Eval:
    # null: the usual ones for head.problem: [accuracy, f1_macro] | multi_label [f1_micro, f1_macro, accuracy] |
    # regression [rmse, mae, r2, pearson, spearman] | tags [f1, precision, recall, token_accuracy]
    metrics: Optional[list[str]] = None
    select_best: Optional[str] = None  # the metric that picks the kept checkpoint; null: the first of eval.metrics
    # eval.metrics may name Hugging Face evaluate modules, 'evaluate:<folder or hub id>[#key]'; evaluate.load runs
    # their Python code, so they load only with trust_metric_code: true (as transformers' trust_remote_code)
    trust_metric_code: bool = False
    metric_args: dict[str, Any] = field(default_factory=dict)  # 'evaluate:...' entry -> compute() args, config_name
    lower_is_better: list[str] = field(default_factory=list)  # 'evaluate:...' entries where a smaller value wins
    # temperature: one temperature fitted on the kept model's validation logits (minimising NLL) and folded into
    # the exported output layer, so every loader returns calibrated scores; labels never change. null: raw scores.
    # A regression head has none
    calibrate: Optional[Literal["temperature"]] = "temperature"


@dataclass
class Output:
    dir: Optional[str] = None  # null: runs/<recipe file name>


@dataclass
class Hub:
    repo_id: Optional[str] = None  # OWNER/NAME: push model/ there at the end of the run; null: no push
    private: bool = True  # a new repo is private; `finetune push --public` overrides


@dataclass
class Sweep:
    """`finetune sweep`: the search space (dotted recipe keys), the objective, the sampler and the pruner."""

    # dotted key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi], log: false} | {choice: [...]}
    space: dict = field(default_factory=dict)
    metric: Optional[str] = None  # null: eval.select_best; on validation, the trial's best epoch
    sampler: Literal["tpe", "random", "grid"] = "tpe"  # Optuna's TPE | random | grid (choices and int ranges)
    pruner: Literal["median", "hyperband", "none"] = "median"  # judged on each epoch's validation value
    trials: int = 10  # finished (complete or pruned) trials the study should hold; --trials overrides
    startup_trials: int = 3  # trials drawn at random and never pruned before the sampler and pruner use the rest
    # epochs a trial runs before the pruner may stop it; null: train.epochs // 2 + 1 (past the middle of a decaying
    # lr schedule, which ranks high-lr trials unfairly early); never after the last
    min_epochs: Optional[int] = None
    seed: Optional[int] = None  # sampler seed; null: every worker draws differently


@dataclass
class Distill:
    """Train the model (the student) on a trained teacher's soft outputs as well as on the labels."""

    teacher: str  # a run folder, its model/ folder, an export folder or a hub id, of the same task and labels
    temperature: float = 2.0  # both models' logits are divided by it before the KL (the loss is scaled by its square)
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * the labels' loss
    # a file or folder of inputs without labels (a text per line, a table's text column, images): the teacher labels
    # them softly and they join training (their loss is the KL part only); null: none
    unlabeled: Optional[str] = None


@dataclass(kw_only=True)
class Recipe:
    task: TaskName  # what the model learns: a label per text, per image, or a tag per word
    backbone: Backbone  # the pretrained model under the head
    head: Head = field(default_factory=Head)  # the new layers on top, and the problem they solve
    data: Data  # the training, validation and test data, and how to read them
    augment: Augment = field(default_factory=Augment)  # image-classification only: train-time augmentation
    train: Train = field(default_factory=Train)  # the optimisation: epochs, lrs, schedule, precision, freezing
    lora: Optional[Lora] = None  # low-rank adapters instead of training every weight: {r: 8} (peft); null: off
    contrastive: Optional[Contrastive] = None  # {pairs: 20, epochs: 1, lr: 2.0e-5, loss: cosine}: text only
    eval: Eval = field(default_factory=Eval)  # the metrics, and the one that picks the kept model
    output: Output = field(default_factory=Output)  # where the run folder goes
    hub: Hub = field(default_factory=Hub)  # pushing the model to the Hugging Face hub
    sweep: Optional[Sweep] = None  # read by `finetune sweep` only; `finetune run` ignores it
    distill: Optional[Distill] = None  # {teacher: runs/big, temperature: 2.0, alpha: 0.5, unlabeled: null}
