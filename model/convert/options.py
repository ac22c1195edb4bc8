"""What one `kvserve convert` run is: a frozen dataclass built once by the command line."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

INITS = ("fit", "mean")
# --train choices -> the parameter-name suffixes (of model/transformer.py) that are trained.
TRAIN_SETS: dict[str, tuple[str, ...]] = {
    "kv": ("attention.wkv.weight", "attention.wkv.bias"),
    "attention": ("attention.wq.weight", "attention.wq.bias", "attention.wkv.weight", "attention.wkv.bias",
                  "attention.wo.weight"),
    "all": ("",),
}
# Options that change what a step computes: a checkpoint resumes only a run that agrees on them.
# The budget (steps, max_minutes) and how often to report or save may change between sessions.
RUN_DEFINING = ("model", "variant", "init", "train", "lr", "batch_size", "seq_len", "seed", "fit_sequences",
                "fit_epochs", "fit_lr", "val_sequences", "warmup_steps", "clip_norm", "spike_factor",
                "snapshot_every", "heldout_tokens")


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    model: str
    variant: str
    output: Path
    steps: int | None = None            # distillation steps; 0 = write the initialised model
    max_minutes: float | None = None    # wall-clock budget of fit + distillation, across resumed sessions
    init: str = "fit"                   # fit | mean
    train: str = "kv"                   # kv | attention | all
    lr: float = 2e-3
    warmup_steps: int = 25              # linear learning-rate warm-up before the cosine
    clip_norm: float = 1.0              # the trained parameters' gradients are clipped to this total norm
    spike_factor: float = 2.0           # a training KL above this times its recent mean is a spike
    snapshot_every: int = 10            # steps between the snapshots a spike rolls back to
    max_rollbacks: int = 8              # the run stops (writing its best state) at this many rollbacks
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    fit_sequences: int = 32             # calibration sequences of seq_len tokens for --init fit
    fit_epochs: int = 8
    fit_lr: float = 3e-3
    val_sequences: int = 8              # held-out sequences for the validation KL
    eval_every: int = 50                # steps between validation KL measurements
    checkpoint_minutes: float = 5.0
    heldout_tokens: int = 8192          # tokens of each held-out text (docs, prose) for perplexity; 0: none
    progress: bool = False              # a tqdm bar (the CLI turns it on for a terminal)

    def __post_init__(self) -> None:
        if self.steps is None and self.max_minutes is None:
            raise ValueError("no budget: give --steps N and/or --max-minutes M")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"--steps={self.steps} is out of range: must be >= 0")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes={self.max_minutes} is out of range: must be > 0")
        if self.init not in INITS:
            raise ValueError(f"unknown --init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.train not in TRAIN_SETS:
            raise ValueError(f"unknown --train {self.train!r}: choose one of {', '.join(TRAIN_SETS)}")
        for name in ("batch_size", "seq_len", "fit_sequences", "fit_epochs", "val_sequences", "eval_every",
                     "snapshot_every", "max_rollbacks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range: must be >= 1")
        for name in ("warmup_steps", "heldout_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range: must be >= 0")
        for name in ("lr", "fit_lr", "checkpoint_minutes", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} is out of range: must be > 0")
        if not self.spike_factor > 1:
            raise ValueError(f"--spike-factor={self.spike_factor} is out of range: must be > 1")

    @property
    def checkpoint_dir(self) -> Path:
        """Where an unfinished run keeps its checkpoint: beside the output, renamed away at the end."""
        return self.output.with_name(self.output.name + ".partial")

    def run_key(self) -> dict:
        """The options a resumed run must share with the checkpoint it continues."""
        values = asdict(self)
        return {name: values[name] for name in RUN_DEFINING}

    def trains(self, name: str) -> bool:
        """Whether parameter `name` is trained."""
        return name.endswith(TRAIN_SETS[self.train])
