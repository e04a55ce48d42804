"""Gradual pruning with transformers.Trainer toward a SPDY profile, recovering accuracy by distillation.

1. A SPDY profile for the target speedup (one-shot search, of the recipe's family or --family; or pass
   --profile DIR/spdy_profile.json).
2. A fresh dense copy of the model is trained with `SPDYPruningCallback`: every unit's sparsity ramps to its
   level in the profile on a cubic schedule (structured: every group's heads/neurons are removed one by one in
   the database's order, on the same schedule) while the model learns to match the dense model's token embeddings
   (1 - cosine of the final hidden states) on the calibration text. Masks are re-applied after every optimizer
   step, so the result has exactly the profile's zeros.
3. Both the one-shot and the gradually pruned model are compared with the dense one on held-out text; the gradual
   one is saved with the profile (`load_pretrained` shrinks it, as it does a one-shot result).

    python examples/gradual_trainer.py --output spdy-minilm-gradual                          # minutes on 2 cores
    python examples/gradual_trainer.py --family structured --output spdy-minilm-gradual-heads
    python examples/gradual_trainer.py --quick --output /tmp/gradual                          # smoke run

Offline: the bundled all-MiniLM-L6-v2 and the built-in corpus.
"""

import argparse
import copy
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from spdy_hf import SPDYConfig, SPDYPruningCallback, prune_pretrained
from spdy_hf.calibration.text import builtin_corpus, load_texts, token_windows
from spdy_hf.modeling.loading import load_model_and_tokenizer


class Windows(torch.utils.data.Dataset):
    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return self.windows["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.windows.items()}


class DistillTrainer(Trainer):
    """Trains the model to reproduce the dense teacher's final hidden states (1 - cosine per token)."""

    def __init__(self, teacher, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            target = self.teacher(**inputs).last_hidden_state
        out = model(**inputs)
        loss = (1 - F.cosine_similarity(out.last_hidden_state, target, dim=-1)).mean()
        return (loss, out) if return_outputs else loss


@torch.no_grad()
def heldout_cosine(model, dense, tokenizer, n=64):
    texts = list(builtin_corpus("heldout"))[:n]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(m):
        h = m(**batch).last_hidden_state
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    return float((embed(model) * embed(dense)).sum(-1).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-speedup", type=float, default=1.5)
    parser.add_argument("--profile", help="An existing spdy_profile.json (skips the one-shot search).")
    parser.add_argument("--steps", type=int, default=600, help="Optimizer steps of training.")
    parser.add_argument("--family", choices=["unstructured", "structured", "mixed"], default=None,
                        help="The profile's level family (default: the recipe's, unstructured).")
    parser.add_argument("--output", default="spdy-minilm-gradual")
    parser.add_argument("--quick", action="store_true", help="Smoke run: magnitude, tiny search, 12 steps.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "gradual_trainer.yaml")
    config = SPDYConfig.load(recipe) if not args.quick else SPDYConfig(family="unstructured")
    config = SPDYConfig.from_dict({**config.to_dict(), "target_speedup": args.target_speedup,
                                   **({"family": args.family} if args.family else {})})
    steps = 12 if args.quick else args.steps
    if args.quick:
        config = SPDYConfig.from_dict({**config.to_dict(), "method": "magnitude",
                                       "calibration": {"num_samples": 16, "sequence_length": 64},
                                       "search": {"num_random_inits": 3, "patience": 2, "eval_samples": 4},
                                       "timing": {"profile_rounds": 1, "model_repeats": 5, "verify_repeats": 10},
                                       "gradual": {"start_step": 0, "end_step": 8, "update_every": 2}})

    dense, tokenizer = load_model_and_tokenizer()
    one_shot = None
    if args.profile:
        profile = args.profile
    else:
        one_shot = prune_pretrained(None, config)
        profile = one_shot  # the result: its units and, for heads/neurons, its groups

    student = copy.deepcopy(dense).train()
    cal = config.calibration
    windows = token_windows(tokenizer, load_texts(cal.source), cal.num_samples, cal.sequence_length, cal.seed)
    training = TrainingArguments(output_dir=args.output + "-run", max_steps=steps, per_device_train_batch_size=8,
                                 learning_rate=1e-4, warmup_steps=min(20, steps // 10), logging_steps=max(1, steps // 20),
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=args.quick)
    callback = SPDYPruningCallback.from_config(profile, config)
    trainer = DistillTrainer(dense, model=student, args=training, train_dataset=Windows(windows), callbacks=[callback])
    trainer.train()
    student.eval()

    print(f"sparsity of the profile's units after training: {callback.sparsity():.4f}")
    if one_shot is not None:
        print(f"held-out embedding cosine to dense: one-shot {heldout_cosine(one_shot.model, dense, tokenizer):.4f}, "
              f"gradual {heldout_cosine(student, dense, tokenizer):.4f}")
    if one_shot is not None:  # the trained weights with the profile, its card and config entry
        one_shot.model.load_state_dict(student.state_dict())
        one_shot.save_pretrained(args.output)
    else:
        student.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        source = os.path.join(profile, "spdy_profile.json") if os.path.isdir(profile) else profile
        shutil.copyfile(source, os.path.join(args.output, "spdy_profile.json"))
    print(f"gradually pruned model -> {args.output}")


if __name__ == "__main__":
    main()
