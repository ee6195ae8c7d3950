"""report.md and the charts, written from the ``results`` dict that ``benchmarks.run`` also saves
as results.json, after every run. A report can be redrawn from a results.json alone, that of a
benchmark stopped before its end included:

    python -m benchmarks.report FOLDER    # FOLDER/results.json -> FOLDER/report.md and the charts
"""

from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line

import contextlib
import errno
import json
import os
import shlex
import signal
from pathlib import Path
import sys
from typing import Optional

import numpy as np

from benchmarks.loader import NO_GPU_DECODING
from benchmarks.run import MEMORY_FORMATS, MODES, held
from benchmarks.workers import LR
from launch.cli import JSON_DAMAGE, Parser, pyplot, quick_exit, remove_abandoned, shell_word
from launch.ranks import raise_interrupt
from launch.step import AUTOCAST, PAPER_MOMENTUM, PAPER_WEIGHT_DECAY

MODE_ORDER = MODES  # the order of the report's rows
IMAGES_CHART = "images_per_s_vs_batch.png"
BYTES_CHART = "bytes_per_step_vs_batch.png"
REPORT_FILES = ("results.json", "report.md", IMAGES_CHART, BYTES_CHART)  # what a benchmark writes in its folder
# report.md's text: a path in it whose name is not UTF-8 (an --out, say) has its odd bytes escaped
REPORT_TEXT = {"encoding": "utf-8", "errors": "backslashreplace"}
PRECISION_ORDER = tuple(AUTOCAST)
SECTIONS = ("Machine and software", "Configuration", "Main table", "How each number is taken",
            "Towers: traffic per exchange", "Batch-size sweep", "Precision and memory format",
            "Projection to a two-GPU machine", "Data loader", "Hybrid: replicas of the towers",
            "Projection to eight GPUs: replicas of the towers or data parallel",
            "The training program against the synthetic step", "Speed goals", "Not measured")
# The goals of the GPU work, checked in the section "Speed goals".
GOAL_REFERENCE_VS_TORCHVISION = 1.0  # the reference at least as fast as torchvision's AlexNet, like for like
GOAL_PROGRAM_SHARE = 0.8  # the program on real JPEGs at 80 % or more of the synthetic rate of its layout


def _mb(n) -> str:
    return f"{n / 1e6:.2f}"


def _span(values) -> str:
    low, high = min(values) / 1e6, max(values) / 1e6
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def _load(values) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)


def _ranks(values, fmt) -> str:
    return " / ".join(fmt(v) for v in values)


def _find(results, mode, batch, precision="fp32", memory_format="contiguous", compiled=False):
    return next((r for r in results["runs"] if (r["mode"], r["batch"], r["precision"], r["memory_format"],
                                                r.get("compiled", False)) ==
                 (mode, batch, precision, memory_format, compiled)), None)


def _program_differs(results, program) -> Optional[str]:
    """How the training program's towers differ from the synthetic towers they are held
    against, in words, or None: a benchmark that did not pass on its FC8 placement ran the
    program with the program's own (tower0)."""
    if program["mode"] != "towers":
        return None
    words = program["command"].split()
    ran = words[words.index("--fc8-placement") + 1] if "--fc8-placement" in words else "tower0"
    synthetic = results["config"]["fc8_placement"]
    return None if ran == synthetic else f"the program ran with FC8 {ran}, the synthetic towers with FC8 {synthetic}"


def _not_held(results, program) -> Optional[str]:
    """Why a run of the training program is not held against a synthetic run, in words, or None."""
    if _find(results, program["mode"], program["batch"]) is None:
        why = "--modes" if program["mode"] not in results["config"]["modes"] else "see 'Not measured'"
        return f"no synthetic {program['mode']} run at batch {program['batch']} in the main table ({why})"
    return _program_differs(results, program)


def _plain(run) -> bool:
    """A run of the main table and the batch sweep: fp32, contiguous, eager."""
    return run["precision"] == "fp32" and run["memory_format"] == "contiguous" and not run.get("compiled")


def _variant(run) -> str:
    """A run's precision, memory format and compilation in words."""
    return f"{run['precision']}, {run['memory_format']}" + (", compiled" if run.get("compiled") else "")


def _devices(run) -> str:
    devices = sorted(set(run["devices"]))
    return f"{run['ranks']} x {', '.join(devices)}, {_ranks(run['threads'], str)} threads"


def _comm(run) -> str:
    if run["comm_ms"] is None:
        return "—"
    comm = _ranks(run["comm_ms"], lambda v: f"{v:.1f}")
    if run["mode"] == "towers":
        return f"exchange {comm}"
    return f"all-reduce {comm} (alone {_ranks(run['allreduce_alone_ms'], lambda v: f'{v:.1f}')})"


def _traffic(run) -> str:
    """The four bytes cells of the main table."""
    if run["ranks"] == 1:
        return "0 (one device) | 0 | 0 | 0"
    return (f"{_ranks(run['bytes_per_rank'], _mb)} MB | {_ranks(run['bytes_per_rank_analytic'], _mb)} MB "
            f"| {_mb(run['bytes_total'])} MB | {_mb(run['bytes_total_analytic'])} MB")


def _share(run) -> str:
    return "—" if run["peak"] is None else f"{100 * run['peak']['share']:.1f} % of {run['peak']['math']}"


def main_table(results) -> list:
    batch = results["config"]["batch"]
    kinds = "; ".join(sorted({r["memory_kind"] for r in results["runs"] if r["batch"] == batch}))
    memory = f"peak memory per rank (MB: {kinds})" if kinds else "peak memory per rank (MB)"
    lines = ["| mode | device (ranks x device, threads/rank) | global batch | images/s | ms/step median [p10, p90] "
             "| exchange or all-reduce ms (per rank) | compute ms (per rank) | bytes/step per rank: measured "
             f"| analytic | bytes/step total: measured | analytic | {memory} "
             "| param memory per rank (MB) | GFLOP/s | % of peak |",
             "|" + "---|" * 15]
    for mode in MODE_ORDER:
        run = _find(results, mode, batch)
        if run is None:
            if mode in results["config"]["modes"]:
                lines.append(f"| {mode} | not measured (see 'Not measured') |" + " |" * 13)
            continue
        s = run["step_ms"]
        compute = _ranks(run['compute_ms'], lambda v: f'{v:.1f}')
        if mode == "hybrid":  # its step without the gradients' all-reduce still holds the towers' exchanges
            compute += " (the `no_sync` step, exchanges in it)"
        lines.append(
            f"| {mode} | {_devices(run)} | {batch} | {run['images_per_s']:.1f} "
            f"| {s['median']:.1f} [{s['p10']:.1f}, {s['p90']:.1f}] | {_comm(run)} "
            f"| {compute} "
            f"| {_traffic(run)} "
            f"| {_ranks(run['peak_memory_bytes'], _mb)} | {_ranks(run['param_bytes'], _mb)} "
            f"| {run['gflop_per_s']:.1f} | {_share(run)} |")
    machine = results["machine"]
    cores = machine.get("usable_cores") or machine.get("cpu_count")  # not in older results: all of the machine's
    crowded = [run for mode in MODE_ORDER if (run := _find(results, mode, batch)) and cores
               and all(d == "cpu" for d in run["devices"]) and run["ranks"] > cores]
    lines += [""] * bool(crowded) + [
        f"- {run['mode']}: its {run['ranks']} ranks took turns on {cores} cores (more processes than cores, a "
        f"thread each): its figures hold that as well as the mode's own cost" for run in crowded]
    return lines


def methods(results) -> list:
    a, cfg = results["analytic"], results["config"]
    memory_kinds = "; ".join(sorted({r["memory_kind"] for r in results["runs"]})) or \
        "No run was measured (see 'Not measured')"
    rss = [r["rss_at_start_bytes"][0] for r in results["runs"] if "RSS" in r["memory_kind"]]
    return [
        f"- **Timing.** Each run is a fresh process (one per rank) started by `launch.ranks.run_ranks`; it runs "
        f"{cfg['warmup']} untimed warm-up step(s), then {cfg['steps']} timed calls of `launch.step.train_step` "
        f"(forward, cross-entropy, backward, SGD with momentum {PAPER_MOMENTUM:g} and weight decay "
        f"{PAPER_WEIGHT_DECAY:g} at learning rate "
        f"{LR:g}, small enough that the loss stays finite on the repeated batch), each between two "
        "`torch.cuda.synchronize` on a GPU. A step of a two-rank mode lasts as long as its slower rank's. "
        "ms/step is the median with the 10th and 90th percentiles; images/s = global batch / median step.",
        "- **Exchange (towers).** Wall time inside the collectives, from `Tower.exchange_log` (`seconds` per "
        "exchange). On a GPU it is taken in as many steps again, after the timed ones, with `synchronize = True`, "
        "which waits for the device before and after each collective (in the timed steps those waits would stall "
        "the queue of kernels, as no other mode's steps are). It includes waiting for the other tower"
        + (" (tower 0 computes FC8 and the loss alone, so tower 1 waits in the logits' exchange)"
           if cfg["fc8_placement"] == "tower0" else "") +
        ". Compute = step minus exchange, per step of those that time the exchanges, median per rank.",
        "- **All-reduce (ddp).** Not timed inside the hook, because DDP overlaps it with the backward pass: the "
        "same number of steps is also timed under `no_sync()` (nothing all-reduced: compute only), and "
        "all-reduce ms = median step - median `no_sync` step, per rank: the all-reduce time *not* hidden "
        "behind the backward (a difference of two medians: noise can make it negative when the all-reduce is "
        "well hidden). Compute = the median `no_sync` step. \"alone\": the median time of one `all_reduce` of "
        "a buffer as large as all the gradients, timed by itself after the steps (the link's cost with nothing "
        "to hide it behind).",
        "- **Bytes.** Per rank: bytes this rank sends per step. towers, measured: `ExchangeLog.sent_bytes` over "
        "the timed steps / steps; analytic: `benchmarks.traffic.tower_sent_elements` (each tower's half of the "
        "inputs of conv3, FC6, FC7 both ways, FC8's input and the logits by FC8 placement, from the layer "
        f"shapes) x batch x bytes per element (4 fp32, 2 bf16). ddp, measured: a comm hook "
        "(`benchmarks.workers.counting_allreduce_hook`, DDP's default all-reduce) counts each gradient bucket's "
        f"bytes, times the ring all-reduce factor 2(n-1)/n = {a['ring_factor']:g} for n = 2; analytic: "
        f"{a['num_params']:,} parameters x 4 bytes x {a['ring_factor']:g}. Total = sum over ranks. "
        "MB = 10^6 bytes.",
        f"- **Memory.** {memory_kinds}. "
        + (f"On the CPU this is the whole process: the Python/torch runtime alone held "
           f"{_span(rss)} MB when the worker started (results.json: `rss_at_start_bytes`). " if rss else "")
        + "Param memory = bytes of the rank's parameters (tower 0 holds FC8 when it is whole there).",
        f"- **FLOPs.** `benchmarks.flops`: forward MACs per layer from the layer shapes (conv: output elements x "
        f"in_channels/groups x kh x kw; FC: in x out), training = 3 x forward, 2 FLOPs per MAC "
        f"({a['training_flops_per_mac']} FLOPs per MAC per image); ReLU, LRN, pooling and the optimizer are not "
        f"counted. Reference: {a['macs_per_image']['single'] / 1e6:.1f} M MACs per image (both towers together "
        f"the same; tower 0 / tower 1: {_ranks(a['macs_per_image']['towers'], lambda v: f'{v / 1e6:.1f}')} M), "
        f"torchvision's AlexNet {a['macs_per_image']['torchvision'] / 1e6:.1f} M. GFLOP/s = training FLOPs of the "
        "global batch / median step. % of peak only on a GPU in `benchmarks.flops.GPU_PEAK_TFLOPS` (dense "
        "figures), against the peak of the math used (fp32 convolutions run as TF32 on cuDNN by default) times "
        "the number of GPUs." + (
            " In fp32 the fully connected layers (8 % of the multiply-adds) run in plain fp32 (torch leaves "
            "cuBLAS's TF32 off), far below the TF32 peak they are held to: an H100 SXM running both kinds of "
            "layer at their peaks would reach about two thirds of it."
            if any(r["peak"] and r["peak"]["math"] == "tf32" for r in results["runs"]) else ""),
    ]


def exchange_table(results) -> list:
    run = _find(results, "towers", results["config"]["batch"])
    if run is None:
        return ["towers was not measured at the main batch."]
    lines = [f"Global batch {run['batch']}, fp32; bytes sent per step by each tower (MB).", "",
             "| exchange/direction | tower 0 measured | tower 0 analytic | tower 1 measured | tower 1 analytic "
             "| bytes per element |", "|---|---|---|---|---|---|"]
    keys = sorted(set(run["exchanges"][0]) | set(run["exchanges"][1]))
    for key in keys:
        cells = []
        for exchanges in run["exchanges"]:
            e = exchanges.get(key)
            cells += [_mb(e["sent_bytes_per_step"]) if e else "—", _mb(e["sent_bytes_per_step_analytic"]) if e else "—"]
        size = {e[key]["bytes_per_element"] for e in run["exchanges"] if key in e}
        lines.append(f"| {key} | {' | '.join(cells)} | {', '.join(f'{s:g}' for s in sorted(size))} |")
    return lines


def crossover_lines(results) -> list:
    a, placement = results["analytic"], results["config"]["fc8_placement"]
    per_image = [sum(t.values()) for t in a["towers_sent_elements_per_image"]]
    c = a["crossover_batch"]
    return [
        f"Towers: {sum(per_image):,} elements cross per image per step (tower 0 / tower 1 sends "
        f"{per_image[0]:,} / {per_image[1]:,}; FC8 {placement}), i.e. {4 * sum(per_image) / 1e3:.1f} kB per image in "
        f"fp32, growing with the batch. Data parallel: 2 ranks x 2(n-1)/n x {a['num_params']:,} x 4 bytes = "
        f"{2 * a['ddp_bytes_per_rank'] / 1e6:.1f} MB per step, whatever the batch.",
        "",
        f"**Crossover** (equal total bytes per step): **{c['fp32'][placement]:.0f} images** per step with fp32 "
        f"activations (FC8 {placement}; {c['fp32']['split' if placement == 'tower0' else 'tower0']:.0f} with FC8 "
        f"{'split' if placement == 'tower0' else 'tower0'}), {c['bf16'][placement]:.0f} with bf16 activations "
        "(DDP's gradients stay fp32 under autocast). Below it the towers move fewer bytes than data parallel.",
    ]


def _swept(results) -> set:
    """The batches of the main table and the sweep (not the half batch that the projection's
    data-parallel compute is taken at, where the sweep leaves it out)."""
    return {results["config"]["batch"], *results["config"]["batches"]}


def sweep_tables(results) -> list:
    batches = sorted({r["batch"] for r in results["runs"] if _plain(r)} & _swept(results))
    if not batches:
        return ["Not measured: no fp32, contiguous run (see 'Not measured')."]
    modes = [m for m in MODE_ORDER if any(_find(results, m, b) for b in batches)]
    lines = ["images/s (ms/step median), fp32, contiguous:", "",
             "| global batch | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for b in batches:
        cells = [(lambda r: f"{r['images_per_s']:.1f} ({r['step_ms']['median']:.1f})" if r else "—")(_find(results, m, b))
                 for m in modes]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    rows = []
    for b in batches:
        cells = [(lambda r: f"{_mb(r['bytes_total'])} / {_mb(r['bytes_total_analytic'])}" if r else "—")(_find(results, m, b))
                 for m in ("towers", "ddp")]
        if cells != ["—", "—"]:
            rows.append(f"| {b} | " + " | ".join(cells) + " |")
    if rows:  # only the two-rank modes move bytes
        lines += ["", "Bytes per step, all ranks together (MB), measured / analytic:", "",
                  "| global batch | towers | ddp |", "|---|---|---|", *rows]
    return lines


def precision_table(results) -> list:
    batch = results["config"]["batch"]
    lines = [f"Global batch {batch}. Speed-up is against the same mode in fp32, contiguous. Analytic bytes for bf16 "
             "assume every exchanged activation is bf16; where autocast leaves one in fp32 (see bytes per "
             "element in results.json) the measured figure is higher.", "",
             "| mode | precision | memory format | torch.compile | images/s | ms/step median [p10, p90] | speed-up "
             "| bytes/step total measured / analytic (MB) | peak memory per rank (MB) |", "|" + "---|" * 9]
    cfg = results["config"]
    swept = [(p, f) for p in cfg["precisions"] for f in cfg["memory_formats"]]
    compiled_modes = cfg.get("compile_modes", ())
    for mode in (m for m in MODE_ORDER if m in cfg["precision_modes"] or m in compiled_modes):
        base = _find(results, mode, batch)
        combinations = dict.fromkeys(([("fp32", "contiguous", False)] + [(p, f, False) for p, f in swept]
                                      if mode in cfg["precision_modes"] else []) +
                                     ([(p, f, True) for p, f in swept] if mode in compiled_modes else []))
        # the speed-up's baseline is planned by the main table (--modes) or by the sweep itself
        baseline_planned = mode in cfg["modes"] or ("fp32", "contiguous") in swept
        for precision, memory_format, compiled in combinations:
            run = _find(results, mode, batch, precision, memory_format, compiled)
            compile_cell = "yes" if compiled else "no"
            if run is None:
                baseline = (precision, memory_format, compiled) == ("fp32", "contiguous", False)
                why = ("not measured" if not baseline or baseline_planned else
                       f"not planned: add {mode} to --modes for the speed-up's baseline")
                lines.append(f"| {mode} | {precision} | {memory_format} | {compile_cell} | {why} | | | | |")
                continue
            s = run["step_ms"]
            speedup = f"{base['step_ms']['median'] / s['median']:.2f}x" if base else "—"
            lines.append(f"| {mode} | {precision} | {memory_format} | {compile_cell} | {run['images_per_s']:.1f} "
                         f"| {s['median']:.1f} [{s['p10']:.1f}, {s['p90']:.1f}] | {speedup} "
                         f"| {_mb(run['bytes_total'])} / {_mb(run['bytes_total_analytic'])} "
                         f"| {_ranks(run['peak_memory_bytes'], _mb)} |")
    return lines


def projection_lines(results) -> list:
    p = results["projection"]
    if "skipped" in p:
        return [f"Not projected: {p['skipped']}."]
    lines = [
        "**PROJECTION, not a measurement**: the step time two GPUs joined by each link would take, from "
        "compute times measured here and the link's bandwidth.", "",
        f"- towers step = per-tower compute ({p['tower_compute_ms']:.1f} ms, {p['tower_compute_source']}) "
        f"+ bytes the busier tower sends ({_mb(p['towers_bytes_per_direction'])} MB, analytic, fp32) / bandwidth "
        f"+ {p['towers_calls']} collectives x {p['latency_us']:g} us.",
    ]
    if p["ddp_compute_ms"] is not None:
        lines.append(f"- ddp step = one rank's compute ({p['ddp_compute_ms']:.1f} ms, {p['ddp_compute_source']}) "
                     f"+ ring all-reduce bytes per rank ({_mb(p['ddp_bytes_per_direction'])} MB) / bandwidth + "
                     f"{p['ddp_calls']:g} buckets x {p['latency_us']:g} us (serial); overlapped = the larger of the two "
                     "(DDP's best case, all-reduce hidden behind the backward).")
    else:
        lines.append(f"- ddp: {p['ddp_compute_source']}.")
    lines += [
        "- Assumptions: full-duplex link at the stated bandwidth each way, both directions busy at once; "
        "the towers' exchanges block the next layer (no overlap with compute); both towers equally fast, "
        "their compute unchanged by the link (measured compute of a rank process here includes none of "
        "its waiting); the projected GPUs compute as fast as the device measured here (on a CPU the "
        "projection only shows how traffic would weigh against this machine's compute).", "",
        f"Global batch {p['batch']}, fp32. Measured here (ms/step): single {p['single_ms']:.1f}; towers "
        + (f"{p['measured']['towers']:.1f} on {', '.join(sorted(set(p['measured_devices']['towers'])))}"
           if p["measured"]["towers"] else "not measured")
        + "; ddp "
        + (f"{p['measured']['ddp']:.1f} on {', '.join(sorted(set(p['measured_devices']['ddp'])))}"
           if p["measured"]["ddp"] else "not measured") + ".", "",
        "| link | GB/s per direction | towers: link ms | towers ms/step | towers images/s | vs single "
        "| ddp: link ms | ddp ms/step serial / overlapped | ddp images/s (serial) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for link in p["links"]:
        towers = f"{link['towers_link_ms']:.2f} | {link['towers_ms']:.1f} | {p['batch'] / link['towers_ms'] * 1e3:.1f} " \
                 f"| {p['single_ms'] / link['towers_ms']:.2f}x"
        ddp = (f"{link['ddp_link_ms']:.2f} | {link['ddp_serial_ms']:.1f} / {link['ddp_overlapped_ms']:.1f} "
               f"| {p['batch'] / link['ddp_serial_ms'] * 1e3:.1f}") if "ddp_serial_ms" in link else "— | — | —"
        lines.append(f"| {link['link']} | {link['gb_per_s']:g} | {towers} | {ddp} |")
    return lines


def hybrid_lines(results) -> list:
    run = _find(results, "hybrid", results["config"]["batch"])
    if run is None:
        if "hybrid" not in results["config"].get("modes", ("hybrid",)):
            return ["Not run (--modes)."]
        return ["hybrid was not measured at the main batch (see 'Not measured')."]
    per_rank = lambda key, fmt=lambda v: f"{v:.1f}": _ranks(run[key], fmt)
    hidden = _ranks(run["hidden_share"], lambda v: "—" if v is None else f"{100 * v:.0f} %")
    return [
        f"{run['replicas']} replicas of the two towers on {run['ranks']} ranks ({_devices(run)}): rank r is tower "
        f"r % 2 of replica r // 2 (`launch.mesh`). Global batch {run['batch']}, {run['batch'] // run['replicas']} "
        "images per replica; per rank, in rank order:", "",
        "| images/s | ms/step | compute + exchanges ms (`no_sync`) | exchange ms | all-reduce added ms "
        "| all-reduce alone ms | hidden behind the backward |", "|---|---|---|---|---|---|---|",
        f"| {run['images_per_s']:.1f} | {run['step_ms']['median']:.1f} | {per_rank('compute_ms')} "
        f"| {per_rank('exchange_ms')} | {per_rank('comm_ms')} | {per_rank('allreduce_alone_ms')} | {hidden} |", "",
        "Bytes each rank sends per step (MB), measured against the analytic figure:", "",
        "| | measured | analytic |", "|---|---|---|",
        f"| exchanges with the other tower of its replica | {per_rank('exchange_bytes_per_rank', _mb)} "
        f"| {per_rank('exchange_bytes_per_rank_analytic', _mb)} |",
        f"| gradient all-reduce over the replicas (ring, x 2(D-1)/D) | {per_rank('gradient_bytes_per_rank', _mb)} "
        f"| {per_rank('gradient_bytes_per_rank_analytic', _mb)} |", "",
        "- How: `DistributedDataParallel` wraps each tower over its replica group (the ranks holding the same half "
        "in every replica) and all-reduces its gradients in buckets, each started as soon as its gradients are "
        "ready, so the all-reduce runs while the backward pass (and the towers' backward exchanges, on the other "
        "group) goes on. Measured as in ddp: all-reduce added = median step - median `no_sync` step; hidden = "
        "1 - added / alone. Exchanges: from the tower's `ExchangeLog` (on a GPU, in as many `no_sync` steps again, "
        "with `synchronize = True` and no all-reduce beside them); all-reduce bytes: the counting comm hook "
        f"({_ranks(run['buckets_per_step'], lambda v: f'{v:g}')} buckets per step), x the ring factor; analytic: "
        "`benchmarks.traffic.hybrid_bytes_per_rank` (each tower's exchanges on its replica's images, and "
        "`benchmarks.flops.tower_param_counts` x 4 bytes).",
    ]


def mesh_projection_lines(results) -> list:
    p = results.get("mesh_projection")
    if not p:
        return ["Not projected."]
    lines = [
        f"**PROJECTION, not a measurement**: {p['gpus']} GPUs joined by {p['link']} ({p['gb_per_s']:g} GB/s per "
        f"direction, {p['latency_us']:g} us per collective) as {p['replicas']} replicas of the two towers, or as "
        f"{p['gpus']} data-parallel ranks of the whole net, by global batch.", "",
        f"- compute per image (whole net, training): {p['per_image_ms'] * 1e3:.2f} us, {p['compute_source']}; a "
        f"tower does {100 * p['tower_share']:.1f} % of it (the busier one).",
        f"- hybrid step = tower compute on batch / {p['replicas']} + the towers' exchanges (they block the next "
        f"layer) + what the all-reduce of the tower's gradients over {p['replicas']} replicas "
        f"({_mb(p['hybrid_gradient_bytes_per_rank'])} MB per rank) does not hide behind the backward "
        f"({p['backward_share']:.2f} of the compute).",
        f"- data parallel step = compute on batch / {p['gpus']} + what the all-reduce of all gradients over "
        f"{p['gpus']} ranks ({_mb(p['ddp_gradient_bytes_per_rank'])} MB per rank) does not hide behind the backward.",
        "", "| global batch | hybrid: compute / exchanges / all-reduce ms | hybrid ms/step | data parallel: compute / "
        "all-reduce ms | data parallel ms/step | faster |", "|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        faster = "hybrid" if r["hybrid_ms"] < r["ddp_ms"] else "data parallel"
        lines.append(f"| {r['batch']} | {r['hybrid_compute_ms']:.2f} / {r['hybrid_exchange_ms']:.2f} / "
                     f"{r['hybrid_allreduce_ms']:.2f} | {r['hybrid_ms']:.2f} | {r['ddp_compute_ms']:.2f} / "
                     f"{r['ddp_allreduce_ms']:.2f} | {r['ddp_ms']:.2f} | {faster} |")
    names = {"hybrid": "hybrid", "ddp": "data parallel"}
    if p["changes"]:
        lines += [""] + [f"- From a global batch of **{c['batch']}** on, {names[c['to']]} is faster "
                         f"({names[c['from']]} below it)." for c in p["changes"]]
    else:
        lines += ["", f"- {names[p['faster_at_the_largest']]} is faster at every batch projected."]
    return lines


def _batch_axis(ax) -> None:
    from matplotlib.ticker import ScalarFormatter
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("global batch (images per step)")


def chart_images_per_s(results, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODE_ORDER:
        runs = sorted((r for r in results["runs"] if r["mode"] == mode and _plain(r) and r["batch"] in _swept(results)),
                      key=lambda r: r["batch"])
        if runs:
            ax.plot([r["batch"] for r in runs], [r["images_per_s"] for r in runs], marker="o", label=mode)
    _batch_axis(ax)
    ax.set_ylabel("images/s (median step)")
    ax.set_title(f"Training throughput, fp32 — {results['machine']['hostname']}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to name when no run was measured
        ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")  # a staged file (write_report)
    finally:
        plt.close(fig)


def chart_bytes(results, path: Path) -> None:
    plt = pyplot()
    a, placement = results["analytic"], results["config"]["fc8_placement"]
    crossover = a["crossover_batch"]["fp32"][placement]
    towers_per_image = 4 * sum(sum(t.values()) for t in a["towers_sent_elements_per_image"])
    ddp_total = 2 * a["ddp_bytes_per_rank"]
    batches = [r["batch"] for r in results["runs"]] or [1]
    n = np.geomspace(max(1, min(batches) / 2), max(2 * crossover, 2 * max(batches)), 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(n, towers_per_image * n / 1e6, color="C1", label="towers, analytic (activations)")
    ax.plot(n, np.full_like(n, ddp_total / 1e6), color="C2", label="ddp, analytic (gradients, ring)")
    for mode, color in (("towers", "C1"), ("ddp", "C2")):
        runs = [r for r in results["runs"] if r["mode"] == mode and _plain(r)]
        if runs:
            ax.scatter([r["batch"] for r in runs], [r["bytes_total"] / 1e6 for r in runs], color=color,
                       edgecolor="black", zorder=3, label=f"{mode}, measured")
    ax.axvline(crossover, color="grey", linestyle="--")
    ax.annotate(f"crossover ≈ {crossover:.0f} images", (crossover, ddp_total / 1e6), textcoords="offset points",
                xytext=(-10, -30), ha="right", fontsize=9)
    _batch_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("MB per step, all ranks (fp32)")
    ax.set_title("Bytes moved per step (single, torchvision: none)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")  # a staged file (write_report)
    finally:
        plt.close(fig)


def _no_program_goal(results) -> str:
    """Why the training program's goal has no verdict where no program run finished."""
    failed = [f"{p['mode']}: {p['failed']}" for p in results.get("program") or [] if "failed" in p]
    return f"no run of the training program finished ({'; '.join(failed)})" if failed else \
        "the training program was not run"


def loader_lines(results) -> list:
    loader = results.get("loader")
    if not loader or "skipped" in loader:  # a results.json of a benchmark stopped before, or a --time-limit
        why = loader["skipped"] if loader else "not measured: results.json holds no figures of it"
        return [f"{why[0].upper()}{why[1:]}."]
    batch, rows = loader["by_workers"][0]["batch"], loader["by_workers"]
    # fewer than planned where the --time-limit came while they were timed (planned_batches: not in older results)
    cut = [w for w in rows if w["batches"] < w.get("planned_batches", w["batches"])]
    timed = (f"{rows[0]['batches']} timed" if len({w["batches"] for w in rows}) == 1 else
             ", ".join(f"{w['batches']} timed with {w['workers']} workers" for w in rows))
    if cut:
        counts = ", ".join(f"{w['batches']} of {w['planned_batches']} with {w['workers']} workers" for w in cut)
        timed += f" ({counts}: {loader['not_measured_reason'].removeprefix('not measured: ')} while they were timed)"
    lines = [f"The training loader alone (`launch.data.Loader`: decode, base image, 224 crop, uint8 batch "
             f"of {batch}) on {loader['data']} ({loader['train_images']} training images), by DataLoader worker "
             f"processes; a warm-up batch for each worker, then {timed} (as many for each worker where they are "
             f"more), timed from when they are asked for.", "",
             "| workers | images/s | ms per batch |", "|---|---|---|"]
    measured = [(w["workers"], f"| {w['workers']} | {w['images_per_s']:.1f} | {1000 * w['seconds'] / w['batches']:.1f} |")
                for w in loader["by_workers"]]
    failed = [(w["workers"], f"| {w['workers']} | {w['reason']} | |") for w in loader.get("failed_workers", ())]
    lines += [line for _, line in sorted(measured + failed, key=lambda row: row[0])]
    lines += [f"| {w} | {loader['not_measured_reason']} | |" for w in loader.get("not_measured_workers", ())]
    towers = [r for r in results["runs"] if r["mode"] == "towers" and r["batch"] == results["config"]["batch"]
              and _plain(r)]
    lines += ["", f"- the rest of the augmentation (mean, reflection, colour shift) on {loader['device']}: "
              f"{loader['augment_ms_per_batch']:.1f} ms per batch of {batch}"]
    decoded = loader.get("decoded_on_device")  # not in older results
    if decoded and "reason" in decoded:
        lines.append(f"- the loader's first batches decoded on the GPU by torchvision (nvJPEG): {decoded['reason']}")
    elif decoded:
        cut = f" ({decoded['cut'].removeprefix('not measured: ')})" if decoded.get("cut") else ""
        against = (f", against the towers' step's {towers[0]['images_per_s']:.1f} (in training, decoding would share "
                   f"the GPU with it)") if towers else ""
        timed = f"{decoded['batches']} of {decoded['planned_batches']}"
        lines.append(f"- the loader's first batches decoded on {decoded['device']} by torchvision (nvJPEG, one call "
                     f"per batch; each file read on one thread, the crops cut on the GPU), alone on the GPU: "
                     f"{decoded['images_per_s']:.1f} images/s over {timed} timed batches{cut}{against}")
    if towers:
        rate = towers[0]["images_per_s"]
        keeping = [w for w in loader["by_workers"] if w["images_per_s"] >= rate]
        best = max(loader["by_workers"], key=lambda w: w["images_per_s"])
        lines.append(f"- the towers' training step takes {rate:.1f} images/s at this batch: " + (
            f"the loader keeps up with it from {min(w['workers'] for w in keeping)} workers" if keeping else
            f"no worker count measured keeps up with it (the most: {best['images_per_s']:.1f} images/s from "
            f"{best['workers']} workers)"))
    lines.append(f"- input crossing from rank 0 to the other tower per image: {loader['input_bytes_per_image']:,} "
                 f"bytes (uint8 crop and label) against {loader['float32_bytes_per_image']:,} as float32 images")
    return lines


def loader_decoding_missing(loader: dict) -> list:
    """The report's lines of what the decoding on the GPU planned and did not measure: none on
    the CPU, where it is not planned."""
    decoded = loader.get("decoded_on_device") or {}
    if decoded.get("reason", NO_GPU_DECODING) != NO_GPU_DECODING:  # failed, or the --time-limit reached first
        return [f"- the loader's batches decoded on the GPU: {decoded['reason']}"]
    if decoded.get("cut"):
        return [f"- the loader's batches decoded on the GPU, {decoded['planned_batches'] - decoded['batches']} of "
                f"{decoded['planned_batches']} batches: {decoded['cut']}"]
    return []


def program_lines(results) -> list:
    program = results.get("program")
    if program is None:
        return ["Not measured: results.json holds no figures of it."]
    if not program:
        return ["Not run (--program-modes)."]
    done = [p for p in program if "failed" not in p]
    failed = [f"- {p['mode']}: {p['failed']} (`python -m {p['command']}`)" for p in program if "failed" in p]
    if not done:
        return failed
    lines = ["`python -m launch.two_gpu` itself on real JPEGs: the loader, the uint8 hand-over and the augmentation on "
             "the device are in every step. A step's time is its own `step_ms` in metrics.jsonl (the wait for its "
             "batch, `input_ms`, and the step), after the run's first steps; the synthetic rate is the main table's, "
             f"same mode and batch, fp32, contiguous, the towers' FC8 {results['config']['fc8_placement']} in both. "
             "The wait for the batch (loading, the hand-over between the ranks) is time in which the device has "
             "nothing to do.", "",
             "| mode | batch | device | loader workers | timed steps | program images/s (median step) | mean images/s "
             "(every timed step) | median step ms (of which waiting for the batch) | synthetic images/s "
             "| program / synthetic | 90 ImageNet epochs at this rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in done:
        synthetic = None if _not_held(results, p) else _find(results, p["mode"], p["batch"])
        rate = f"{synthetic['images_per_s']:.1f}" if synthetic else "—"
        ratio = f"{100 * p['images_per_s'] / synthetic['images_per_s']:.0f} %" if synthetic else "—"
        hours = p["paper_training_hours"]
        waited = f" ({p['median_input_ms']:.1f})" if "median_input_ms" in p else ""  # not in older results
        lines.append(f"| {p['mode']} | {p['batch']} | {p['device']} | {p['workers']} | {p['timed_steps']} "
                     f"| {p['images_per_s']:.1f} | {p['mean_images_per_s']:.1f} | {p['median_step_ms']:.1f}{waited} "
                     f"| {rate} | {ratio} "
                     f"| {hours:,.0f} h ({hours / 24:,.1f} days) |")
    lines += ["", f"- data: {done[0]['data']}; commands: " + "; ".join(f"`python -m {p['command']}`" for p in done),
              "- 90 epochs: 90 x 1,281,167 ImageNet training images at the program's median-step rate, "
              "evaluations and checkpoints left out (the paper: five to six days on two GTX 580s)"]
    lines += [f"- {p['mode']}: not held against the synthetic step: {why}" for p in done
              if (why := _not_held(results, p))]
    return lines + failed


def speed_goal_lines(results) -> list:
    """The three goals of the GPU work, each checked against the runs of this report."""
    cfg, macs = results["config"], results["analytic"]["macs_per_image"]
    order = lambda r: (r["batch"], PRECISION_ORDER.index(r["precision"]), r["memory_format"], r.get("compiled", False))
    pairs = [(r, tv) for r in sorted((r for r in results["runs"] if r["mode"] == "single"), key=order)
             if (tv := _find(results, "torchvision", r["batch"], r["precision"], r["memory_format"],
                             r.get("compiled", False)))]
    verdict = lambda ok: "met" if ok else "**not met**"
    lines = [f"**1. The reference (single) at least as fast as torchvision's AlexNet**, like for like: the same "
             f"device, batch, precision, memory format and compilation. The reference computes "
             f"{macs['single'] / macs['torchvision']:.2f} times torchvision's multiply-adds per image, and a "
             f"response normalisation that torchvision's net leaves out.", ""]
    if pairs:
        lines += ["| batch | variant | single images/s | torchvision images/s | single / torchvision | goal |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {_variant(r)} | {r['images_per_s']:.1f} | {tv['images_per_s']:.1f} "
                  f"| {r['images_per_s'] / tv['images_per_s']:.2f} "
                  f"| {verdict(r['images_per_s'] >= GOAL_REFERENCE_VS_TORCHVISION * tv['images_per_s'])} |"
                  for r, tv in pairs]
        for precision in sorted({r["precision"] for r, _ in pairs}, key=PRECISION_ORDER.index):
            at_batch = [(r, tv) for r, tv in pairs if r["precision"] == precision and r["batch"] == cfg["batch"]]
            if len(at_batch) > 1:
                best, best_tv = (max((pair[i] for pair in at_batch), key=lambda run: run["images_per_s"])
                                 for i in (0, 1))
                lines += ["", f"- fastest of each at batch {cfg['batch']} in {precision}: single "
                              f"{best['images_per_s']:.1f} images/s ({_variant(best)}), torchvision "
                              f"{best_tv['images_per_s']:.1f} ({_variant(best_tv)})"]
    else:
        lines.append("Not measured: no single and torchvision runs of the same batch and variant.")
    lines += ["", f"**2. The training program at {100 * GOAL_PROGRAM_SHARE:.0f} % or more of the synthetic step "
                  "rate** of the same layout and batch (fp32, contiguous; the section above):", ""]
    done = [p for p in results.get("program") or [] if "failed" not in p]
    differing = [f"- {p['mode']}: not checked: {why}" for p in done if (why := _not_held(results, p))]
    checked = [(p, _find(results, p["mode"], p["batch"])) for p in done if not _not_held(results, p)]
    lines += [f"- {p['mode']}: {100 * p['images_per_s'] / s['images_per_s']:.0f} % ({p['images_per_s']:.1f} against "
              f"{s['images_per_s']:.1f} images/s): "
              f"{verdict(p['images_per_s'] >= GOAL_PROGRAM_SHARE * s['images_per_s'])}" for p, s in checked] + \
        differing or [f"- not measured: {_no_program_goal(results)}"]
    lines += ["", "**3. The share of the GPU's dense bf16 peak reached** (training FLOPs as in 'How each number is "
                  "taken', per GPU):", ""]
    bf16 = [r for r in results["runs"] if r["peak"] and r["peak"]["math"] == "bf16"]
    if bf16:
        best = max(bf16, key=lambda r: r["peak"]["share"])
        lines.append(f"- at most {100 * best['peak']['share']:.1f} % of the {best['peak']['gpu']}'s "
                     f"{best['peak']['tflop_per_s_per_device']:g} TFLOP/s: {best['mode']}, batch {best['batch']}, "
                     f"{_variant(best)}, {best['gflop_per_s'] / 1e3:.1f} TFLOP/s over {best['peak']['devices']} GPU(s)")
    else:
        lines.append("- not measured: no bf16 run on a GPU whose peak `benchmarks.flops.GPU_PEAK_TFLOPS` knows")
    return lines


def usable_cores_note(machine: dict) -> str:
    """", N of them usable by the benchmark" where a taskset or container gave it fewer cores
    than the machine has (its threads were sized to those); "" otherwise, and for a results.json
    that did not record them."""
    usable = machine.get("usable_cores")
    return f" ({usable} of them usable by the benchmark)" if usable not in (None, machine.get("cpu_count")) else ""


def write_report(results: dict, folder: Path) -> None:
    folder = Path(folder)
    m, cfg = results["machine"], results["config"]
    plan = m["device_plan"]
    two_rank_threads = sorted({t for r in results["runs"] if r["ranks"] > 1 for t in r["threads"]})
    one_rank_threads = sorted({t for r in results["runs"] if r["ranks"] == 1 for t in r["threads"]})
    never = results.get("planned_runs", 0) - len(results["runs"]) - len(results["not_measured"])
    # None until measured (a results.json of a version before them lacks the keys: it had finished)
    stages = [what for key, what in (("loader", "the data loader"), ("program", "the training program"))
              if key in results and results[key] is None]
    parts = ([f"{never} of the {results['planned_runs']} planned runs"] if never > 0 else []) + stages
    unstarted = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)  # "" if none
    stopped = ([f"**Not finished**: {unstarted} had not been measured when results.json was written (the "
                f"benchmark was stopped, or was still running); what follows is what was measured before.", ""]
               if unstarted else [])
    lines = [
        f"# AlexNet: one device, two towers, data parallel — {m['hostname']}, {results['date']}", "", *stopped,
        f"## {SECTIONS[0]}", "",
        f"- host `{m['hostname']}`, {m['platform']}, Python {m['python']}",
        f"- CPU: {m['cpu_model']}, {m['cpu_count']} logical cores{usable_cores_note(m)}",
        f"- GPUs: {', '.join(m['gpus']) or 'none'}",
        f"- torch {m['torch']} (CUDA {m['cuda']}), torchvision {m['torchvision']}",
        f"- devices: {plan['note']}; two-rank backend: {plan['backend'] or '—'}",
        f"- load average (1, 5, 15 min) at start {_load(m['load_average']['start'])}, at end "
        f"{_load(m['load_average']['end'])}: other work on the machine slows every mode, the more threads the more",
        f"- threads per process: single-device modes {', '.join(map(str, one_rank_threads)) or '—'}, "
        f"multi-rank modes {', '.join(map(str, two_rank_threads)) or '—'} per rank", "",
        f"## {SECTIONS[1]}", "",
        f"- command: `{results['command']}`",
        f"- main table: global batch {cfg['batch']}, fp32, contiguous; {cfg['warmup']} warm-up + {cfg['steps']} "
        f"timed steps per run; seed {cfg['seed']}; FC8 placement {cfg['fc8_placement']}; dropout 0.5 as in training",
        "- data: synthetic float32 N x 3 x 224 x 224 images at raw-pixel scale, random labels, resident on the "
        "device; towers: both ranks get the whole global batch; ddp: each rank half of it",
        f"- batch sweep: {', '.join(map(str, cfg['batches']))} over {', '.join(cfg['sweep_modes'])}; precision "
        f"sweep: {', '.join(cfg['precisions'])} x {', '.join(cfg['memory_formats'])} over "
        f"{', '.join(cfg['precision_modes'])}; compiled (torch.compile, backend "
        f"{cfg.get('compile_backend', 'inductor')}): {', '.join(cfg.get('compile_modes', ())) or 'none'}",
        (f"- the runs measured here took {results['elapsed_s']:.0f} s; the benchmark had not finished" if unstarted else
         f"- the whole run took {results['elapsed_s']:.0f} s"), "",
        f"## {SECTIONS[2]}", "", *main_table(results), "",
        f"## {SECTIONS[3]}", "", *methods(results), "",
        f"## {SECTIONS[4]}", "", *exchange_table(results), "",
        f"## {SECTIONS[5]}", "", *sweep_tables(results), "", *crossover_lines(results), "",
        f"![images/s against batch size]({IMAGES_CHART})", "",
        f"![bytes per step against batch size, crossover marked]({BYTES_CHART})", "",
        f"## {SECTIONS[6]}", "", *precision_table(results), "",
        f"## {SECTIONS[7]}", "", *projection_lines(results), "",
        f"## {SECTIONS[8]}", "", *loader_lines(results), "",
        f"## {SECTIONS[9]}", "", *hybrid_lines(results), "",
        f"## {SECTIONS[10]}", "", *mesh_projection_lines(results), "",
        f"## {SECTIONS[11]}", "", *program_lines(results), "",
        f"## {SECTIONS[12]}", "", *speed_goal_lines(results), "",
        f"## {SECTIONS[13]}", "",
    ]
    missing = [f"- {n['mode']}, batch {n['batch']}, {_variant(n)}: {n['reason']}" for n in results["not_measured"]]
    loader = results.get("loader") or {}
    if loader.get("skipped"):
        missing.append(f"- the data loader: {loader['skipped']}")
    missing += [f"- the data loader with {w['workers']} workers: {w['reason']}"
                for w in loader.get("failed_workers", ())]
    missing += [f"- the data loader with {w} workers: {loader['not_measured_reason']}"
                for w in loader.get("not_measured_workers", ())]
    missing += loader_decoding_missing(loader)
    missing += [f"- the training program, {p['mode']}: {p['failed']}" for p in results.get("program") or []
                if "failed" in p]
    lines += missing
    if unstarted:  # a results.json of a benchmark stopped from outside
        lines.append(f"- {unstarted} had not been measured: the benchmark was stopped, or was still running")
    elif not missing:
        lines.append("Everything planned was measured.")
    diverged = [f"{r['mode']} (batch {r['batch']}, {_variant(r)})" for r in results["runs"]
                if not all(loss is not None and np.isfinite(loss) for loss in r["final_loss"])]
    if diverged:  # the arithmetic timed is the same, but non-finite values can run slower on some CPUs
        lines += ["", f"Note: the loss became non-finite in {', '.join(diverged)} (random labels at raw-pixel scale)."]
    # The text first, then the files, each drawn beside its place and all put in place at the
    # end: a results.json that cannot make a report, a full disk or a Ctrl-C changes none of an
    # earlier draw's (no new chart beside its report).
    staged = {name: folder / f".{name}.partial-{os.getpid()}" for name in REPORT_FILES[1:]}
    try:
        for name in REPORT_FILES[1:]:
            remove_abandoned(folder, f".{name}.partial-")  # of a draw that was killed
        chart_images_per_s(results, staged[IMAGES_CHART])
        chart_bytes(results, staged[BYTES_CHART])
        staged["report.md"].write_text("\n".join(lines) + "\n", **REPORT_TEXT)
        for name in staged:  # which a rename fails on: before the first, not after it
            if (folder / name).is_dir() and not (folder / name).is_symlink():
                raise IsADirectoryError(errno.EISDIR, f"{name} there is a folder", str(folder / name))
        for name, path in staged.items():
            os.replace(path, folder / name)
    finally:
        for path in staged.values():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def main(argv=None) -> None:
    parser = Parser(prog="python -m benchmarks.report",
                    description="Redraws report.md and the charts in FOLDER from FOLDER/results.json.")
    parser.add_argument("folder", metavar="FOLDER", help="a folder that python -m benchmarks.run wrote")
    folder = parser.parse_args(argv).folder
    if folder == "":  # which Path takes for the current folder
        parser.error("FOLDER is empty: give a folder that python -m benchmarks.run wrote (. for the current one)")
    folder = Path(folder)
    path = folder / "results.json"
    with contextlib.ExitStack() as locked:
        try:
            is_folder = folder.is_dir()
        except OSError as error:  # a name too long
            print(f"error: FOLDER {folder}: {error.strerror}: give a folder that python -m benchmarks.run wrote",
                  file=sys.stderr)
            sys.exit(2)
        if is_folder:  # a benchmark writing there now: its results.json is not its last
            try:
                locked.enter_context(held(folder, "FOLDER"))
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
        _redraw(path, folder)
    print(folder / "report.md")


# What a step took beyond its compute, where the compute is timed apart: DDP hides its all-reduce
# in the backward pass, and the difference of the two medians may fall below zero.
SIGNED = ("comm_ms",)


def check_numbers(value, where: str = "", signed: bool = False) -> None:
    """ValueError naming the first number in ``value`` (a results.json as read) that no benchmark
    writes: one not finite, too large for a float, or below zero (but those of ``SIGNED``); a
    final loss, which a run whose loss diverged leaves not finite (null), excepted."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key != "final_loss":
                check_numbers(item, f"{where}.{key}" if where else key, key in SIGNED)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_numbers(item, f"{where}[{index}]", signed)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > 1e300:
            raise ValueError(f"{where} is an integer of {len(str(abs(value)))} digits, not a number a benchmark "
                             f"measures")
        if (value < 0 and not signed) or abs(value) > 1e300 or value != value:
            raise ValueError(f"{where} is {value:.6g}, not a number a benchmark measures")


def check_names(results: dict) -> None:
    """ValueError naming a run whose mode, precision or memory format the report does not know
    (its row would say the run was not measured, and 'Not measured' that everything was)."""
    for index, r in enumerate(results["runs"]):
        for key, known in (("mode", MODE_ORDER), ("precision", PRECISION_ORDER),
                           ("memory_format", MEMORY_FORMATS)):
            if r[key] not in known:
                raise ValueError(f"runs[{index}].{key} is {r[key]!r}, not one of {', '.join(known)}")


# What a results.json that python -m benchmarks.run did not write raises as the report reads it.
NOT_RESULTS = (KeyError, TypeError, AttributeError, IndexError, ValueError, ZeroDivisionError, OverflowError)


def _ablation_redraw(results, folder: Path) -> Optional[str]:
    """Where ``results`` is an ablation's (python -m benchmarks.ablations keeps its command under
    "info", and its runs by variant), its command with --reuse and the folders it wrote; else None."""
    info = results.get("info") if isinstance(results, dict) else None
    command = info.get("command") if isinstance(info, dict) else None
    if not (isinstance(command, str) and command.startswith("python -m benchmarks.ablations")):
        return None
    runs = results.get("runs")
    folders = {str(Path(r["run_dir"]).parent) for r in runs.values() if isinstance(r, dict)
               and isinstance(r.get("run_dir"), str)} if isinstance(runs, dict) else set()
    try:
        reused = "--reuse" in shlex.split(command)
    except ValueError:  # edited by hand
        reused = False
    return " ".join([command, *([] if reused else ["--reuse"]), "--out", shell_word(folder.absolute()),
                     *(["--runs", shell_word(folders.pop())] if len(folders) == 1 else [])])


def _redraw(path: Path, folder: Path) -> None:
    if path.exists() and not path.is_file():  # a FIFO would wait for a writer for good, a device be read for good
        print(f"error: {path} is not a file: give a folder that python -m benchmarks.run wrote", file=sys.stderr)
        sys.exit(2)
    try:
        results = json.loads(path.read_text())
    except (OSError, *JSON_DAMAGE) as error:
        print(f"error: {path} cannot be read ({error}): give a folder that python -m benchmarks.run wrote",
              file=sys.stderr)
        sys.exit(2)
    again = _ablation_redraw(results, folder)
    if again:
        print(f"error: {path} is an ablation's, not a benchmark's: its report is redrawn, its runs read again, by "
              f"{again} (from the folder where it ran)", file=sys.stderr)
        sys.exit(2)

    def not_results(error: Exception):
        print(f"error: {path} is not what python -m benchmarks.run writes ({type(error).__name__}: {error}): "
              f"give a folder that it wrote", file=sys.stderr)
        sys.exit(2)

    try:
        check_numbers(results)
        check_names(results)
    except NOT_RESULTS as error:
        not_results(error)
    try:
        pyplot()
    except ValueError as error:  # no folder for matplotlib's cache: its message names the fix
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        write_report(results, folder)
    except NOT_RESULTS as error:
        not_results(error)
    except OSError as error:
        print(f"error: cannot write the report in {folder} ({error.strerror or error}): copy {path} to a folder "
              f"that can be written and give that", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_interrupt)  # as Ctrl-C: the drawing stops, the earlier report stays
    with quick_exit():
        try:
            main()
        except KeyboardInterrupt:
            print("interrupted: the report was not redrawn, and the folder's earlier files are as they were",
                  file=sys.stderr)
            sys.exit(130)
