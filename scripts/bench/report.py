"""The report: the comparison table (text, Markdown), the machine with its CPU flags, a summary of earlier results."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path


def fmt(value, spec=".4f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


ROWS = [  # label, getter, format, ratio kind: "x" (a / b), "diff" (a - b in points), None
    ("test accuracy", lambda s: s["test"] and s["test"]["accuracy"], ".4f", "diff"),
    ("test f1_macro", lambda s: s["test"] and s["test"]["f1_macro"], ".4f", "diff"),
    ("model/ re-scored accuracy", lambda s: s.get("test_rescored", {}).get("accuracy"), ".4f", None),
    ("best epoch / epochs run", lambda s: f"{s['best_epoch']}/{s['epochs_run']}", "s", None),
    ("train samples/s (loop only)", lambda s: s["train_samples_per_second"], ".1f", "x"),
    ("real tokens/s (loop only)", lambda s: s.get("tokens_per_second"), ".0f", "x"),
    ("train loop seconds", lambda s: s["train_seconds"], ".1f", "x"),
    ("start-up seconds (process start to loop)", lambda s: s.get("start_up_seconds"), ".1f", "x"),
    ("wall seconds (whole process)", lambda s: s["wall_seconds"], ".1f", "x"),
    ("CPU seconds (whole process)", lambda s: s["cpu_seconds"], ".1f", "x"),
    ("peak RSS MB (worker)", lambda s: s["peak_rss_mb"], ".0f", "x"),
    ("peak GPU MB allocated", lambda s: s.get("gpu_peak_mb"), ".0f", "x"),
    ("model MFLOP per token (image)", lambda s: s.get("flops_per_unit") and s["flops_per_unit"] / 1e6, ".1f", None),
    ("achieved GFLOP/s (loop)", lambda s: s.get("achieved_gflops"), ".1f", "x"),
    ("% of matmul peak", lambda s: s.get("peak_fraction") and 100 * s["peak_fraction"], ".0f", None),
    ("Trainer's own samples/s (+eval/save)", lambda s: s.get("trainer_train_samples_per_second"), ".1f", None),
    ("other processes' runnable threads", lambda s: s.get("other_runnable_threads"), ".1f", None),
]


def ratio(kind, a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or kind is None:
        return None
    if kind == "diff":
        return f"{100 * (a - b):+.1f} pt"
    return f"{a / b:.2f}x" if b else None


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    sides, pairs = result["sides"], result["pairs"]
    header = [""] + [s["label"] for s in sides] + [f"{result['labels'][a]} / {result['labels'][b]}" for a, b in pairs]
    rows = []
    for label, get, spec, kind in ROWS:
        values = [get(result["results"][s["key"]]) for s in sides]
        if all(v in (None, {}) for v in values):
            continue
        line = [label] + [fmt(v, spec) for v in values]
        for a, b in pairs:
            line.append(fmt(ratio(kind, get(result["results"][a]), get(result["results"][b])), "s"))
        rows.append(line)
    return header, rows


def settings_lines(result: dict) -> list[str]:
    """The settings every side shares on one line, then what differs side by side."""
    jobs = {side["label"]: result["jobs"][side["key"]] for side in result["sides"]}

    def shown(job: dict) -> dict:
        values = {k: v for k, v in job.items() if v is not None and k != "n"}
        values["rows (train/validation/test)"] = "/".join(str(job["n"][k]) for k in ("train", "validation", "test"))
        return {k: str(v) for k, v in values.items()}

    per_side = {label: shown(job) for label, job in jobs.items()}
    first = next(iter(per_side.values()))
    common = {k: v for k, v in first.items() if all(other.get(k) == v for other in per_side.values())}
    lines = ["all sides: " + " | ".join(f"{k} {v}" for k, v in common.items())]
    for label, values in per_side.items():
        own = {k: v for k, v in values.items() if k not in common}
        if own:
            lines.append(f"{label}: " + " | ".join(f"{k} {v}" for k, v in own.items()))
    return lines


def print_report(result: dict) -> None:
    header, rows = table_rows(result)
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
    print()
    print(f"{result['title']} — {result['machine']}")
    for line in settings_lines(result):
        print(f"  {line}")
    print(f"  matmul peak {result['matmul_gflops']:.0f} GFLOP/s fp32 at {result['threads']} threads "
          f"(before {result['matmul_before']:.0f}, after {result['matmul_after']:.0f})")
    print()
    for row in [header, *rows]:
        print(row[0].ljust(widths[0]) + "".join(str(c).rjust(w) for c, w in zip(row[1:], widths[1:])))
    for side in result["sides"]:
        r = result["results"][side["key"]]
        shown = "; ".join(f"{e['epoch']}: loss {fmt(e.get('loss'))} val "
                          + " ".join(f"{k} {fmt(v)}" for k, v in e["validation"].items() if k != "loss")
                          for e in r["epochs"])
        print(f"{side['label']} epochs  {shown}")
    print()
    print(f"model FLOPs: {result['flops_formula']}")
    for note in result["notes"]:
        print(f"note: {note}")


def markdown(result: dict) -> str:
    header, rows = table_rows(result)
    lines = [f"### {result['name']}", "",
             f"{result['title']}. {result['machine']}; {result['date']}; commit {result['commit']}.", "",
             f"`{result['command']}`", ""]
    lines += [f"- {line}" for line in settings_lines(result)]
    lines += [f"- matmul peak {result['matmul_gflops']:.0f} GFLOP/s fp32 at {result['threads']} threads (2048x2048, "
              f"best of 8; before {result['matmul_before']:.0f}, after {result['matmul_after']:.0f})",
              f"- model FLOPs: {result['flops_formula']}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" + "---:|" * (len(header) - 1))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    import transformers

    return (f"{cpu} ({cpu_flags()}), {len(os.sched_getaffinity(0))} usable cores{gpu}{kernel_limits()}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


# what limits the instruction set of torch's kernels below what the CPU has: a figure measured under them is one of
# that instruction set (an AVX2 machine's kernels on an AVX-512 CPU), whatever the CPU's flags say
KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def kernel_limits() -> str:
    import torch

    set_ = [f"{name}={os.environ[name]}" for name in KERNEL_LIMITS if os.environ.get(name)]
    if not set_:
        return ""
    return f", kernels limited to {torch.backends.cpu.get_cpu_capability()} ({' '.join(set_)})"


def cpu_flags() -> str:
    """The flags that decide CPU speed (AVX2, AVX-512, VNNI, bf16, AMX): figures from different CPUs differ."""
    from finetune.precision import cpu_flags as flags

    return flags()


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"
    except OSError:
        return "unknown"


def _job_line(job: dict) -> str:
    size = f"{job['max_length']} tokens" if job.get("max_length") else f"{job['image_size']} px"
    return (f"{job['backbone']}, {job['n']['train']} training rows, {size}, batch {job['batch_size']}, "
            f"{job['epochs']} epochs")


def summary(results: list[dict]) -> str:
    """The headline of each comparison (every pair of sides in every result file) in one Markdown table."""
    lines = ["| benchmark | job | sides (a vs b) | train samples/s, a vs b | a / b | train loop s | whole run s "
             "| test accuracy | CPU flags |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    machines, dates, commits = [], [], []
    for result in results:
        for seen, value in ((machines, f"{result['machine']}; {result['threads']} threads"), (dates, result["date"]),
                            (commits, result["commit"].split(" ")[0])):
            if value not in seen:
                seen.append(value)
        for a, b in result["pairs"]:
            ra, rb = result["results"][a], result["results"][b]
            acc = [r["test"]["accuracy"] if r.get("test") else None for r in (ra, rb)]
            lines.append(
                f"| {result['name']} | {_job_line(result['jobs'][a])} | {result['labels'][a]} vs {result['labels'][b]} "
                f"| {ra['train_samples_per_second']:.1f} vs {rb['train_samples_per_second']:.1f} "
                f"| **{ra['train_samples_per_second'] / rb['train_samples_per_second']:.2f}x** "
                f"| {ra['train_seconds']:.1f} vs {rb['train_seconds']:.1f} "
                f"| {ra['wall_seconds']:.0f} vs {rb['wall_seconds']:.0f} "
                f"| {fmt(acc[0], '.3f')} vs {fmt(acc[1], '.3f')} | {_flags_of(result)} |")
    head = f"Measured on {' and '.join(machines)}; {', '.join(dates)}; commits {', '.join(commits)}."
    return "\n".join([head, ""] + lines) + "\n"


def _flags_of(result: dict) -> str:
    """The CPU's flags, and the instruction set its kernels were held to when the run limited them."""
    flags = result.get("cpu_flags") or f"not recorded ({result.get('machine', '?').split(',')[0]})"
    limited = re.search(r"kernels limited to (\w+)", result.get("machine", ""))
    return flags + (f" (kernels limited to {limited.group(1)})" if limited else "")


def slim(result: dict) -> dict:
    """The result without the row lists (each side's rows were checked equal; a count and a digest stand in)."""
    out = json.loads(json.dumps(result))
    for side in out["results"].values():
        if isinstance(side.get("rows"), dict):
            side["rows"] = {k: v if not isinstance(v, list) else
                            {"count": len(v), "sha256": hashlib.sha256(json.dumps(v).encode()).hexdigest()[:16]}
                            for k, v in side["rows"].items()}
    return out
