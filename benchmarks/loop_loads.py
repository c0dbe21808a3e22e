"""The loads inside the book's kernels' loops that are not the pipeline's, found without a GPU.

    python benchmarks/loop_loads.py [--only decode,band,selection] [--arch 90]

Triton software-pipelines a loop (`num_stages`): its loads of wide enough tiles become
asynchronous copies into shared memory, issued steps ahead. A load it does not take — too narrow
(at least 4 bytes a thread for a copy: a `(128,)` bf16 vector over 128 threads has 2), or in a
loop that holds another loop (the pipeliner takes innermost loops only) — is issued where the
code stands, and if the step uses its value, the step waits for it: a round trip to L2 or memory
at every step. A kernel of the decoding step's cache writers lost most of its time that way
(chapter 13's appendix, "Waits inside the cache writers' loops").

This script compiles, for `sm_<arch>`, the launches the offline scripts record — a decoding
step with its cache writes (`decode_compile.py`, two shapes), the band kernels of a forward and
backward (`band_registers.py`) and the fused selection (`select_registers.py`), at 64k tokens —
and reads each kernel's Triton IR (TTGIR): every `tt.load` inside an `scf.for` that is left, with
its source line, its tile, the bytes a thread loads, and whether the step *waits* for it (its
value used in the step) or *carries* it to the next (fetched a step ahead by hand). A lead, not
a verdict: other warps on the multiprocessor may hide a wait, and a load that hits in L1 costs
little. Import triton before nsa (this script does): the kernels are compiled, not interpreted.
"""

import argparse
import linecache
import math
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                      # the checkout's nsa, without an install

import triton  # noqa: E402  (before nsa: a machine without CUDA would switch on the interpreter otherwise)

from offline_compile import compile_launch  # noqa: E402  (benchmarks/, this script's folder)

DECODE_SHAPES = ((64, 4, 1, 1, 65536), (64, 4, 1, 16, 65536))   # (Hq, H, new tokens, batch, context)
TRAINING_HEADS = ((64, 4), (32, 8))
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "i64": 8, "i8": 1, "i1": 1}


def source_of(locations: dict, name: str, depth: int = 0) -> list[tuple[str, int]]:
    """The (file, line)s a TTGIR location `#locN` points to: the line itself, then the lines that
    called the helper it is in, outward."""
    text = locations.get(name, "")
    found = re.match(r'loc\("([^"]+)":(\d+):\d+\)', text)
    if found or depth > 32:
        return [(found.group(1), int(found.group(2)))] if found else []
    call = re.match(r"loc\(callsite\((#loc\d*) at (#loc\d*)\)\)", text)
    if call:
        return source_of(locations, call.group(1), depth + 1) + source_of(locations, call.group(2), depth + 1)
    named = re.match(r'loc\("[^"]*"\((#loc\d*)\)\)', text)
    return source_of(locations, named.group(1), depth + 1) if named else []


def loop_loads(ttgir: str, num_warps: int) -> list[dict]:
    """The synchronous loads (`tt.load`) inside the loops (`scf.for`) of a kernel's TTGIR: for each,
    its source (file, line), tile (shape, element type), bytes a thread loads, and whether the step
    of its innermost loop uses its value ("waits") or only hands it to the next step through that
    loop's own `scf.yield` ("carries")."""
    locations = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))$", ttgir, re.M))
    lines = ttgir.splitlines()
    depth_before, loops, depth = [], [], 0       # the regions open before each line; the loop bodies' depths
    for line in lines:
        depth_before.append(depth)
        depth += line.count("{") - line.count("}")
    found = []
    for number, line in enumerate(lines):
        loops = [d for d in loops if d <= depth_before[number]]               # loop bodies still open here
        if "scf.for" in line and line.count("{") > line.count("}"):
            loops.append(depth_before[number] + 1)
            continue
        if " tt.load " not in line or not loops:
            continue
        result, body = line.split("=")[0].strip(), loops[-1]
        tile = re.search(r"tensor<([0-9x]+)x!tt\.ptr<(\w+)>", line)
        shape, dtype = (tile.group(1), tile.group(2)) if tile else ("1", re.search(r"!tt\.ptr<(\w+)>", line).group(1))
        uses = []                                 # (line, at the loop body's own depth) until the body closes
        for later in range(number + 1, len(lines)):
            if depth_before[later] < body:
                break
            if re.search(re.escape(result) + r"\b", lines[later]):
                uses.append((lines[later], depth_before[later] == body))
        where = re.search(r"loc\((#loc\d*)\)\s*$", line)
        found.append(dict(source=source_of(locations, where.group(1)) if where else [], shape=shape, dtype=dtype,
                          bytes_per_thread=math.prod(map(int, shape.split("x"))) * BYTES.get(dtype, 4)
                          / (32 * num_warps),
                          waits=not all("scf.yield" in use and own for use, own in uses)))
    return found


def recorded(which: set[str]):
    """(label, kernel, args, meta) of every recorded launch of the chosen families, each kernel and
    meta-parameters once per label."""
    launches = []
    if "decode" in which:
        import decode_compile
        for shape in DECODE_SHAPES:
            label = f"{shape[0]}/{shape[1]} heads, T={shape[2]}, batch {shape[3]}, {shape[4]} tokens"
            launches += [(label, *launch) for launch in decode_compile.recorded_launches(*shape)]
    if "band" in which:
        import band_registers
        for heads_q, heads_kv in TRAINING_HEADS:
            launches += [(f"{heads_q}/{heads_kv} heads, {branch}", *launch)
                         for branch, launch in band_registers.recorded_launches(heads_q, heads_kv)]
    if "selection" in which:
        import select_registers
        from nsa import NSAConfig
        from nsa.kernels import selection
        for heads_q, heads_kv in TRAINING_HEADS:
            launches += [(f"{heads_q}/{heads_kv} heads{' (packed)' if packed else ''}", *launch)
                         for packed, launch in select_registers.recorded_selections(selection, heads_q, heads_kv,
                                                                                    NSAConfig())]
    seen, unique = set(), []
    for label, kernel, args, meta in launches:
        key = (label, kernel.fn.__name__, repr(sorted(meta.items())))
        if key not in seen:
            seen.add(key)
            unique.append((label, kernel, args, meta))
    return unique


def short(path: str) -> str:
    """A source path relative to the checkout, where it lies inside it."""
    return str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="decode,band,selection", help="kernel families, comma-separated")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, sm_{args.arch}: loads inside loops that the pipeline does not copy ahead")
    for label, kernel, launch_args, meta in recorded(set(args.only.split(","))):
        compiled = compile_launch(kernel, launch_args, meta, args.arch)
        loads = loop_loads(compiled.asm["ttgir"], meta.get("num_warps", 4))
        name = kernel.fn.__name__
        if "MEAN" in meta:
            name += " (mean pooling)" if meta["MEAN"] else " (the MLP's shares)"
        counted = {}                                       # a helper called twice: its loads, once each
        for load in loads:
            key = (tuple(load["source"]), load["shape"], load["dtype"], load["waits"])
            counted[key] = (load, counted.get(key, (load, 0))[1] + 1)
        waits = sum(load["waits"] for load in loads)
        print(f"{label}: {name}: " + (f"{len(loads)} load{'s' * (len(loads) > 1)} in loops, {waits} waited for "
                                      f"in the step" if loads else "none"), flush=True)
        for load, times in counted.values():
            where = " <- ".join(f"{short(path)}:{line}" for path, line in load["source"]) or "?"
            path, line = load["source"][0] if load["source"] else ("", 0)
            print(f"    {'waits  ' if load['waits'] else 'carries'} {load['shape']} x {load['dtype']} "
                  f"({load['bytes_per_thread']:g} bytes a thread){f', in {times} loops' if times > 1 else ''}: "
                  f"{where}\n        {linecache.getline(path, line).strip()[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
