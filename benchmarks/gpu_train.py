"""Chapter 12's experiment at GPU size: the recall models trained on 4096-token sequences.

Dense, sliding-window, NSA and NSA with mean-pooled compression (`nsa.training.GPU_EXPERIMENT`),
trained and evaluated one after the other; writes the results that the chapter plots.

    python benchmarks/gpu_train.py --out book/data          # the committed run (CUDA GPU)
    python benchmarks/gpu_train.py --out /tmp/smoke --steps 20 --eval-batch-size 2   # a quick smoke run
    python benchmarks/gpu_train.py --out /tmp/smoke --device cpu --seq-len 256 --steps 2 --batch-size 2
        --eval-batch-size 1                            # the script's logic, on a CPU

Writes training_<gpu>.csv (accuracy against distance), training_<gpu>_curves.csv (loss, accuracy
per step) and training_<gpu>.json (experiment, device, wall time, tokens/s, and for the NSA models
chapter 12's selection probe: how often each layer's kv heads select the stored pair's block for
the queries that need a free slot, beside chance) into --out, after each model
(so a run cut short keeps what it finished). Not collected by pytest (no test_ prefix).
"""

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch

import nsa
from nsa.device import gpu_tag
from nsa.training import (GPU_EXPERIMENT, MODELS, accuracy_by_distance, make_recall_batch, model_variant,
                          needle_selection, print_selection, selection_summary, train_recall, write_results)


def nsa_backend_in_use(experiment, device) -> str:
    """Which backend the NSA layers will really run: one forward and backward on a small input."""
    layer = experiment.make_model("nsa").blocks[0].attn.to(device)
    x = torch.randn(2, min(1024, experiment.task.seq_len), experiment.dim, device=device, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught, experiment.autocast(device):
        warnings.simplefilter("always")
        layer(x).float().sum().backward()
    fallbacks = [str(w.message) for w in caught if "uses 'torch'" in str(w.message)]
    if experiment.backend == "auto":
        if device == "cpu":
            return "torch"
        return "torch (" + fallbacks[0] + ")" if fallbacks else "triton"
    return experiment.backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "book" / "data"),
                        help="directory for the three result files (default: the repository's book/data)")
    parser.add_argument("--steps", type=int, default=None, help=f"default {GPU_EXPERIMENT.steps}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {GPU_EXPERIMENT.batch_size}")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help=f"default {GPU_EXPERIMENT.eval_batch_size}")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "flex", "triton"),
                        help=f"NSA backend, default {GPU_EXPERIMENT.backend!r}")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="nsa_mean = NSA with mean-pooled compression")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu only to smoke-test this script (with a small --seq-len)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"default {GPU_EXPERIMENT.task.seq_len} (evaluation distances beyond it are dropped)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_train.py needs a CUDA GPU (the CPU version of this experiment is chapter 12 itself)")
    device = args.device

    changes = {name: value for name, value in (("steps", args.steps), ("batch_size", args.batch_size),
                                               ("eval_batch_size", args.eval_batch_size),
                                               ("backend", args.backend)) if value is not None}
    if args.steps is not None:   # keep the curriculum's share of the steps
        changes["short_steps"] = round(GPU_EXPERIMENT.short_steps * args.steps / GPU_EXPERIMENT.steps)
    if args.seq_len is not None:
        task = dataclasses.replace(GPU_EXPERIMENT.task, seq_len=args.seq_len)
        changes["task"] = task
        changes["short_seq_len"] = min(GPU_EXPERIMENT.short_seq_len, args.seq_len)
        changes["eval_distances"] = tuple(d for d in GPU_EXPERIMENT.eval_distances if d <= task.max_distance)
    experiment = dataclasses.replace(GPU_EXPERIMENT, **changes)
    backend = nsa_backend_in_use(experiment, device) if {"nsa", "nsa_mean"} & set(args.models) else "-"
    extra = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
             "nsa_backend": backend, "command": "python " + " ".join(sys.argv)}
    try:
        import triton
        extra["triton"] = triton.__version__
    except ImportError:
        pass
    print(experiment)
    print(f"device {extra['device']}, NSA backend: {backend}", flush=True)
    if device == "cuda" and backend.startswith("torch") and args.backend is None:
        sys.exit(f"NSA would run on the torch reference ({backend}): far too slow and large at "
                 f"{experiment.task.seq_len} tokens; fix the triton backend, or force it with --backend torch "
                 "and a smaller --batch-size")

    histories, accuracy = {}, {}
    start = time.perf_counter()
    for name in args.models:
        variant, attention = model_variant(experiment, name)
        model = variant.make_model(attention).to(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        histories[name] = train_recall(model, variant, desc=name)
        accuracy[name] = accuracy_by_distance(model, variant)
        if name.startswith("nsa"):   # chapter 12's probe: does the selection hold the stored pair's block?
            probe = [t.to(device) for t in make_recall_batch(variant.task, variant.eval_batch_size, seed=777)]
            found = needle_selection(model, *probe)
            print_selection(name, found)
            extra.setdefault("selection", {})[name] = selection_summary(found)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            extra.setdefault("peak_memory_gib", {})[name] = round(peak, 2)
        write_results(args.out, gpu_tag() if device == "cuda" else "cpu", experiment, histories, accuracy, extra)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\ntotal {time.perf_counter() - start:.0f} s; results in {args.out}")
    print(f"{'model':>9} {'wall s':>8} {'tokens/s':>10}  accuracy by distance")
    for name, result in accuracy.items():
        by_distance = " ".join(f"{d}:{a:.2f}" for d, a in zip(result["distance"], result["accuracy"]))
        print(f"{name:>9} {histories[name]['wall_s']:8.1f} {histories[name]['tokens_per_s']:10,.0f}  {by_distance}")


if __name__ == "__main__":
    main()
