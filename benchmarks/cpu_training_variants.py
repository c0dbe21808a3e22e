"""Chapter 12's variants of the CPU recall run: NSA trained with one change at a time.

    python benchmarks/cpu_training_variants.py --out book/data     # writes training_variants_cpu.csv
    python benchmarks/cpu_training_variants.py --out /tmp/smoke --only 0 3 --steps 2   # a quick smoke run

Each variant is `nsa.training.CPU_EXPERIMENT` with one change (the learning rate, the length of
training, the compressed branch's gate opened at the start, one kv head for the four query heads,
more selected blocks, mean pooling for phi, another seed), trained from its seed as chapter 12
trains its models, then measured as the chapter measures its own two NSA models: the accuracy
over every distance beyond the window, the accuracy on the held-out queries whose stored block
is not forced (a free slot must find it), and how often each kv head of the first layer selects
the stored block for those queries, beside the chance of a free slot picking it at random. One
thread, as the chapter runs on a CPU (about seven minutes in all). No GPU needed; not collected by pytest.
"""

import argparse
import csv
import dataclasses
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch

from nsa.training import (CPU_EXPERIMENT, accuracy_by_distance, accuracy_without, fix_gate, inside_and_beyond,
                          make_recall_batch, needle_selection, train_recall)

VARIANTS = [   # (label, changes to CPU_EXPERIMENT, the compressed gate's starting bias or None)
    ("none (the paper's MLP phi)", {}, None),
    ("learning rate 1e-2 instead of 3e-3", {"lr": 1e-2}, None),
    ("600 steps instead of 300", {"steps": 600}, None),
    ("compressed-branch gate opened at the start (bias 2)", {}, 2.0),
    ("one kv head for the four query heads (one shared selection)", {"kv_heads": 1}, None),
    ("num_selected_blocks 5 (two free slots)", {"num_selected_blocks": 5}, None),
    ("mean pooling for phi (compress_mlp=False)", {"compress_mlp": False}, None),
    ("mean pooling, 500 steps", {"compress_mlp": False, "steps": 500}, None),
    ("mean pooling, one shared selection", {"compress_mlp": False, "kv_heads": 1}, None),
    ("seed 1: the paper's MLP phi", {"seed": 1}, None),
    ("seed 1: mean pooling", {"seed": 1, "compress_mlp": False}, None),
]
PROBE_SEED = 777       # chapter 12's held-out probe batch


def measure(model, experiment) -> dict:
    """The chapter's three columns for a trained NSA model, and the chance of a free slot."""
    _, beyond = inside_and_beyond(accuracy_by_distance(model, experiment), experiment.window_size)
    tokens, targets, distances = make_recall_batch(experiment.task, experiment.eval_batch_size, seed=PROBE_SEED)
    model.eval()
    found = needle_selection(model, tokens, targets, distances)
    free = ~found["forced"]
    rates = found["hits"][0][free].float().mean(0)              # first layer, per kv head
    return {"accuracy_beyond_window": beyond,
            "accuracy_free_slot": accuracy_without(model, None, tokens, targets, found)[1],
            "selection_min": rates.min().item(), "selection_max": rates.max().item(),
            "chance": found["chance"], "free_share": free.float().mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "book" / "data")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="variant indices (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="every variant's steps (a smoke run; default: theirs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    path = args.out / "training_variants_cpu.csv"
    fields = ["variant", "steps", "accuracy_beyond_window", "accuracy_free_slot", "selection_min",
              "selection_max", "chance", "free_share", "seconds"]
    with path.open("w", newline="") as f:
        f.write(f"# python benchmarks/cpu_training_variants.py --out {args.out}; torch {torch.__version__}, "
                f"CPU, one thread; nsa.training.CPU_EXPERIMENT with one change each\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for index, (label, changes, gate_bias) in enumerate(VARIANTS):
            if args.only is not None and index not in args.only:
                continue
            experiment = dataclasses.replace(CPU_EXPERIMENT, **changes)
            if args.steps is not None:
                experiment = dataclasses.replace(experiment, steps=args.steps)
            start = time.perf_counter()
            model = experiment.make_model("nsa")
            if gate_bias is not None:
                fix_gate(model, "cmp", gate_bias)          # the compressed gate's start: weights 0, this bias
            train_recall(model, experiment, desc=label[:24])
            row = {"variant": label, "steps": experiment.steps, **measure(model, experiment),
                   "seconds": time.perf_counter() - start}
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
            f.flush()
            print(f"{label:62s} beyond {row['accuracy_beyond_window']:.2f}  free-slot {row['accuracy_free_slot']:.2f}  "
                  f"selection {row['selection_min']:.2f}-{row['selection_max']:.2f} (chance {row['chance']:.2f})  "
                  f"{row['seconds']:.0f} s", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
