"""The config sections of the work done on a pruned model's weights: few-sample recovery after the search
(`recovery`) and gradual pruning with `transformers.Trainer` (`gradual`). Part of `SPDYConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_checks import check_choice, check_fields, check_int, check_number

RECOVERY_METHODS = ("none", "gap", "layerwise", "auto")
RECOVERY_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class RecoveryConfig:
    """Few-sample recovery between search and verify (`spdy_hf.recovery`): the pruned model's remaining weights
    fitted to the dense model's layer outputs on the calibration windows, every profile zero held."""

    method: str = field(default="none", metadata={
        "help": "'gap' (global AdaPrune: the whole model at once, beside a dense copy), 'layerwise' (block by "
                "block: one block's activations at a time), 'auto' (gap where both models fit in memory, else "
                "layerwise) or 'none'."})
    epochs: int = field(default=8, metadata={"min": 1, "help": "Passes over the training windows (at most)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Adam's learning rate; null: for gap 3e-4 when the job's score is KL (causal LMs: the best measured on "
                "SmolLM2-135M) and 3e-5 otherwise (encoders: the best measured on MiniLM), 1e-4 for layerwise."})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "Windows per optimizer step."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Calibration windows used (the first ones); null: all of them."})
    holdout: float = field(default=0.125, metadata={
        "help": "Share of those windows held back for early stopping (never trained on)."})
    patience: int = field(default=2, metadata={"min": 1, "help": "Epochs without a better held-back loss before "
                                                                  "stopping; the best epoch's weights are kept."})
    output_weight: float = field(default=10.0, metadata={
        "help": "gap only: weight of the job's score on the final output (KL for LMs, cosine distance otherwise) "
                "added to the layer loss (10: the best measured on MiniLM); 0: layer outputs only, as the reference "
                "gAP."})

    precision: str = field(default="auto", metadata={
        "help": "Forward passes of recovery: 'bfloat16' (torch.autocast; the weights, gradients and Adam's state "
                "stay float32, the losses are taken in float32), 'float32', or 'auto' (bfloat16 on a GPU that "
                "supports it and on a CPU with bfloat16 matrix instructions, AVX512-BF16 or AMX; float32 on other "
                "CPUs)."})

    def __post_init__(self):
        check_fields(self, "recovery.")
        check_choice("recovery.method", self.method, RECOVERY_METHODS)
        check_choice("recovery.precision", self.precision, RECOVERY_PRECISIONS)
        if self.learning_rate is not None:
            check_number("recovery.learning_rate", self.learning_rate, lambda x: x > 0, "(0, inf)")
        check_number("recovery.holdout", self.holdout, lambda x: 0 < x < 1, "(0, 1)")
        check_number("recovery.output_weight", self.output_weight, lambda x: x >= 0, "[0, inf)")
        if self.num_samples is not None:
            check_int("recovery.num_samples", self.num_samples, 2)

    def lr(self, method: str, kind: str | None = None) -> float:
        """The learning rate for `method` ('gap' or 'layerwise') in a job scored by `kind` ('kl' for causal LMs)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        if method != "gap":
            return 1e-4
        return 3e-4 if kind == "kl" else 3e-5


@dataclass
class GradualConfig:
    """Gradual pruning with `transformers.Trainer` toward the profile (`SPDYPruningCallback.from_config`)."""

    start_step: int = field(default=0, metadata={"min": 0, "help": "Optimizer step the cubic sparsity ramp starts at."})
    end_step: int | None = field(
        default=None, metadata={"help": "Step the ramp ends at; null: two thirds of the training steps."})
    update_every: int = field(default=10, metadata={"min": 1, "help": "Optimizer steps between mask updates in the ramp."})

    def __post_init__(self):
        check_fields(self, "gradual.")
        if self.end_step is not None:
            check_int("gradual.end_step", self.end_step, self.start_step + 1)
