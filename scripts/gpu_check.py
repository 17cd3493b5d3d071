"""The steps of scripts/gpu_check.sh: environment, bench table with MFU, full CIFAR-10 training, and the report.

Run through scripts/gpu_check.sh (which budgets every step with ``timeout``); each step writes its part of
``OUT/gpu_check.json`` as soon as it has it and re-renders ``OUT/gpu_check.md``, so a step killed by its timeout
leaves everything measured before it. ``--dry-run`` runs every command on the CPU at tiny size (1 step per bench
configuration, a 1-epoch training on a few hundred images) to check that it parses and starts.

Needs: torch (CUDA build on the GPU), numpy, pyyaml, pillow, tqdm (kdforge's own imports); kdforge from this
checkout through PYTHONPATH. matplotlib is not used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".data" / "cifar10_jpeg.npz"

#: Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s, matched on the device name.
BF16_PEAKS = [
    ("H200", 989.4e12),  # same SXM tensor cores as H100: 989.4 TFLOP/s dense bf16
    ("H100", 989.4e12),  # H100 SXM; the PCIe card is 756 TFLOP/s, matched below first if named so
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("L4", 121e12),
    ("A10", 125e12),
]

# (teacher, student, batch): the issue's table, in priority order.
PAIRS = [("resnet32x4", "resnet8x4", 256), ("resnet32x4", "resnet8x4", 64), ("resnet56", "resnet20", 256)]
METHODS = ["kd", "atf"]
# (label, precision, channels_last, compile): all on, each one off, all off.
SETTINGS = [
    ("bf16+cl (compile off)", "bf16", True, False),
    ("fp32 eager NCHW (all off)", "fp32", False, False),
    ("bf16+cl+compile (all on)", "bf16", True, True),
    ("fp32+cl+compile (bf16 off)", "fp32", True, True),
    ("bf16+compile (channels_last off)", "bf16", False, True),
]


FAST = ("bf16+cl, fast mode (replay 8 views + teacher cache)", "bf16", True, False)


def bench_plan() -> list[tuple[str, tuple[str, str, int], tuple[str, str, bool, bool]]]:
    """Every (method, pair, setting) row, most wanted first, so a spent budget drops the least wanted: the headline
    KD pair with compile on and all off, then the uncompiled rows of every pair (the reference loop is timed in each
    pair's first row), KD's fast mode, then the remaining compiled rows."""
    first = [("kd", PAIRS[0], SETTINGS[0]), ("kd", PAIRS[0], SETTINGS[1]), ("kd", PAIRS[0], SETTINGS[2])]
    rest = [(m, p, s) for p in PAIRS for m in METHODS for s in SETTINGS[:2]]
    rest.append(("kd", PAIRS[0], FAST))
    rest += [(m, p, s) for s in SETTINGS[2:] for p in PAIRS for m in METHODS]
    return first + [row for row in rest if row not in first]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _load(out: Path) -> dict[str, Any]:
    path = out / "gpu_check.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(out: Path, part: str, value: Any) -> None:
    """Merge ``part`` into OUT/gpu_check.json (atomically) and re-render OUT/gpu_check.md."""
    report = _load(out)
    report[part] = value
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    (out / "gpu_check.md").write_text(render(report))


def bf16_peak(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak (FLOP/s) for a device name, and the line saying which was used."""
    if "H100" in name and "PCIe" in name:
        return 756e12, "H100 PCIe dense bf16 756 TFLOP/s"
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak, f"{key} dense bf16 {peak / 1e12:.1f} TFLOP/s (vendor data sheet, no sparsity)"
    return None, f"no bf16 peak known for {name!r}: fraction of peak not computed"


def step_env(out: Path, dry: bool) -> None:
    import torch

    info: dict[str, Any] = {
        "date": _now(),
        "dry_run": dry,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("numpy", "yaml", "PIL", "tqdm"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = "MISSING"
    if torch.cuda.is_available():
        info.update(
            device=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        info["device"] = "cpu (dry run)" if dry else "cpu"
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    _save(out, "env", info)
    print(json.dumps(info))


def _flops_per_image(method: str, teacher: str, student: str, cached: bool = False) -> tuple[float, str]:
    """Model FLOPs of one training image: 2·MACs per forward, ×3 for a network that is also backpropagated; with the
    teacher's logits ``cached`` the teacher runs no forward in the step."""
    from kdforge.models import create_model
    from kdforge.profile import count_macs

    t = count_macs(create_model(teacher, num_classes=10), (1, 3, 32, 32))
    s = count_macs(create_model(student, num_classes=10), (1, 3, 32, 32))
    if cached:
        return 2.0 * 3 * s, f"2·3·MACs_S (teacher logits cached), MACs_S={s:,}"
    if method == "atf":
        # ATF (default anchor=kl): the tuned teacher forward+backward, the frozen original forward, the student f+b.
        return 2.0 * (3 * t + t + 3 * s), f"2·(4·MACs_T + 3·MACs_S), MACs_T={t:,}, MACs_S={s:,}"
    return 2.0 * (t + 3 * s), f"2·(MACs_T + 3·MACs_S), MACs_T={t:,}, MACs_S={s:,}"


def step_bench(out: Path, dry: bool, budget_s: float) -> None:
    import torch

    from kdforge.bench import run_bench

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak, peak_line = bf16_peak(name)
    size = {"steps": 1, "warmup": 0, "rounds": 1} if dry else {"steps": 10, "warmup": 3, "rounds": 3}
    workers = 0 if dry else min(8, os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    refs: dict[tuple[str, str, str, int], float] = {}
    compiled_once = False
    plan = bench_plan()
    for method, (teacher, student, batch), (label, precision, cl, comp) in plan:
        left = budget_s - (time.perf_counter() - start)
        row: dict[str, Any] = {"method": method, "teacher": teacher, "student": student, "batch": batch}
        row.update(setting=label, precision=precision, channels_last=cl, compile=comp)
        if left < (90 if comp and not dry else 15):
            rows.append({**row, "status": f"not run: {left:.0f} s of the bench budget left"})
            continue
        key = (method, teacher, student, batch)
        fast = "fast mode" in label
        if dry and comp and compiled_once:
            comp = False  # one compiled configuration proves the compile path starts; the rest would cost minutes
            row["note"] = "dry run: compiled once only"
        if dry and precision == "fp16":
            precision = "bf16"
        try:
            t0 = time.perf_counter()
            torch.compiler.reset()
            report = run_bench(
                method,
                teacher,
                student,
                data="embedded",
                batch_size=4 if dry else batch,
                device=device,
                precision=precision,
                channels_last=cl,
                compile_model=comp,
                reference=key not in refs,
                replay_views=8 if fast else 0,
                teacher_cache=fast,
                workers=workers,
                **size,
            )
            compiled_once |= comp
            res = {r["path"]: r for r in report["results"]}
            if "reference" in res:
                refs[key] = res["reference"]["img_per_s"]
            main = res.get("kdforge+cache", res["kdforge"])
            flops, formula = _flops_per_image(method, teacher, student, cached=fast)
            achieved = flops * main["img_per_s"]
            row.update(
                status="ok",
                img_per_s=main["img_per_s"],
                ms_per_step=main["ms_per_step"],
                warmup_s=main["warmup_s"],
                peak_mem_mb=main["peak_mem_mb"],
                reference_img_per_s=refs.get(key),
                ratio=main["img_per_s"] / refs[key] if key in refs else None,
                tflops=achieved / 1e12,
                peak_fraction=achieved / peak if peak else None,
                flops_formula=formula,
                epoch_50k_s=50_000 / main["img_per_s"],
                wall_s=time.perf_counter() - t0,
                settings=main["settings"],
            )
            if fast:
                row["teacher_cache"] = report.get("teacher_cache")
        except Exception as e:
            row.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        rows.append(row)
        _save(out, "bench", {"device": name, "peak": peak_line, "rows": rows, "workers": workers, **size})
        print(json.dumps(row, default=str), flush=True)
    _save(out, "bench", {"device": name, "peak": peak_line, "rows": rows, "workers": workers, **size})


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def step_train(out: Path, dry: bool, budget_s: float) -> None:
    """Full CIFAR-10: a resnet20 teacher, then KD into resnet8, each timed end to end (process start to exit)."""
    import torch

    work = out / "gpu_check_runs"
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not dry
    if DATA.is_file():
        data = f"{{name: cifar10_jpeg, root: {DATA}, batch_size: 128, num_workers: 0"
    elif dry:
        data = "{name: embedded, batch_size: 128, num_workers: 0"
    else:
        _save(out, "train", {"status": f"not run: {DATA} missing (run scripts/gpu_check.sh --prepare first)"})
        return
    data += ", train_subset: 256, test_subset: 100}" if dry else "}"
    epochs_t, epochs_s = (1, 1) if dry else (10, 10)
    train = (
        f"{{epochs: {{E}}, device: {'cuda' if cuda else 'cpu'}, precision: {'bf16' if cuda else 'fp32'}, "
        "channels_last: true, progress: false, log_every: 100}"
    )
    optim = "{name: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"
    common = f"data: {data}\noptim: {optim}\nschedule: {{name: cosine, warmup_epochs: 1}}\n"
    t_cfg = _yaml(
        work / "teacher.yaml",
        f"model: {{name: resnet20}}\nmethod: {{name: vanilla}}\n{common}train: {train.replace('{E}', str(epochs_t))}\n",
    )
    s_cfg = _yaml(
        work / "kd.yaml",
        f"model: {{name: resnet8}}\nteacher: {{name: resnet20, checkpoint: {work / 'teacher'}}}\n"
        f"method: {{name: kd}}\n{common}train: {train.replace('{E}', str(epochs_s))}\n",
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result: dict[str, Any] = {"data": data, "epochs": {"teacher": epochs_t, "student": epochs_s}, "dry_run": dry}
    start = time.perf_counter()
    for stage, command, cfg in (("teacher", "train", t_cfg), ("kd", "distill", s_cfg)):
        left = budget_s - (time.perf_counter() - start)
        if left < 10:
            result[stage] = {"status": f"not run: {left:.0f} s left"}
            break
        cmd = [sys.executable, "-m", "kdforge", command, "--config", str(cfg), "--out", str(work / stage), "--force"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=left)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            rc, tail = 124, str(e.stdout or "")[-1500:] if e.stdout else "timed out"
        wall = time.perf_counter() - t0
        entry: dict[str, Any] = {"command": " ".join(cmd), "rc": rc, "wall_s": wall}
        summary = work / stage / "summary.json"
        if rc == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            entry.update(status="ok", final_top1=s["final_top1"], best_top1=s["best_top1"])
            entry["train_time_s"] = s["train_time_s"]
        else:
            entry.update(status=f"failed (rc {rc})", log_tail=tail)
        result[stage] = entry
        _save(out, "train", result)
        print(json.dumps(entry, default=str), flush=True)
        if rc != 0:
            break
    _save(out, "train", result)


def step_tests(out: Path, log: Path, rc: int, seconds: float) -> None:
    text = log.read_text(errors="replace") if log.is_file() else ""
    tail = [line for line in text.splitlines() if line.strip()][-25:]
    summary = next(
        (
            line
            for line in reversed(tail)
            if " in " in line and any(w in line for w in ("passed", "failed", "error", "skipped", "collected"))
        ),
        "",
    )
    _save(out, "cuda_tests", {"rc": rc, "seconds": seconds, "summary": summary.strip("= "), "tail": tail})


def render(report: dict[str, Any]) -> str:
    env = report.get("env", {})
    lines = [
        f"# GPU check, {env.get('device', '?')}, {env.get('date', '?')}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}, {env.get('cpu_count')} CPU "
        f"cores, commit {env.get('git_commit')}"
        + (" — **dry run on the CPU, numbers meaningless**" if env.get("dry_run") else ""),
        "",
        'Produced by `bash scripts/gpu_check.sh OUT_DIR` (docs/PERFORMANCE.md, "GPU check").',
        "",
        "## CUDA tests (`pytest -m cuda tests/test_cuda.py`)",
        "",
    ]
    tests = report.get("cuda_tests")
    if tests:
        lines += [f"exit code {tests['rc']}, {tests['seconds']:.0f} s: {tests['summary'] or 'no summary line'}", ""]
        if tests["rc"] not in (0, 5):
            lines += ["```", *tests["tail"], "```", ""]
    else:
        lines += ["not run", ""]
    bench = report.get("bench")
    lines += ["## Bench: kdforge path against the reference loop", ""]
    if bench:
        lines += [
            f"{bench['device']}; embedded CIFAR-10 subset (10k images), randomly initialized networks, median of "
            f"{bench['rounds']} rounds of {bench['steps']} steps after {bench['warmup']} warm-up steps; reference "
            f"loop: fp32 eager, PIL per sample, {bench['workers']} workers, timed once per method/pair/batch. "
            f"Peak used for the fraction: {bench['peak']}. Model FLOPs per image: 2·MACs per forward (kdforge "
            "profile), ×3 for a network that is backpropagated (formula per row in the JSON).",
            "",
            "| method | teacher → student | batch | setting | img/s | ms/step | ref img/s | ratio | TFLOP/s | "
            "of bf16 peak | 50k epoch (s) | peak MiB |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in bench["rows"]:
            pair = f"{r['teacher']} → {r['student']}"
            if r.get("status") != "ok":
                lines.append(f"| {r['method']} | {pair} | {r['batch']} | {r['setting']} | {r['status']} ||||||||")
                continue

            def f(v: Any, fmt: str) -> str:
                return "—" if v is None else format(v, fmt)

            lines.append(
                f"| {r['method']} | {pair} | {r['batch']} | {r['setting']} | {r['img_per_s']:,.0f} | "
                f"{r['ms_per_step']:.1f} | {f(r['reference_img_per_s'], ',.0f')} | {f(r['ratio'], '.2f')}× | "
                f"{r['tflops']:.1f} | {f(r['peak_fraction'], '.1%')} | {r['epoch_50k_s']:.2f} | "
                f"{f(r['peak_mem_mb'], ',.0f')} |"
            )
        lines.append("")
    else:
        lines += ["not run", ""]
    train = report.get("train")
    lines += ["## Full CIFAR-10: resnet20 teacher, then KD resnet8 (end to end, process start to exit)", ""]
    if train:
        lines += [f"data {train.get('data')}, epochs {train.get('epochs')}", ""]
        for stage in ("teacher", "kd"):
            e = train.get(stage)
            if not e:
                continue
            if e.get("status") == "ok":
                lines.append(
                    f"- {stage}: final top-1 **{e['final_top1']:.2f}%** (best {e['best_top1']:.2f}%), "
                    f"{e['wall_s']:.1f} s end to end, {e['train_time_s']:.1f} s in training epochs; `{e['command']}`"
                )
            else:
                lines.append(
                    f"- {stage}: {e.get('status')}" + (f"\n\n```\n{e['log_tail']}\n```" if "log_tail" in e else "")
                )
        if "status" in train:
            lines.append(f"- {train['status']}")
        lines.append("")
    else:
        lines += ["not run", ""]
    steps = report.get("steps")
    if steps:
        lines += ["## Step times", "", *[f"- {k}: {v}" for k, v in steps.items()], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("step", choices=["env", "bench", "train", "tests", "step", "render"])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=float, default=120.0, help="seconds this step may take")
    p.add_argument("--log", type=Path, help="tests: the pytest output file")
    p.add_argument("--rc", type=int, default=0, help="tests/step: the exit code")
    p.add_argument("--seconds", type=float, default=0.0, help="tests/step: the seconds it took")
    p.add_argument("--name", default="", help="step: the step's name")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "env":
        step_env(args.out, args.dry_run)
    elif args.step == "bench":
        step_bench(args.out, args.dry_run, args.budget)
    elif args.step == "train":
        step_train(args.out, args.dry_run, args.budget)
    elif args.step == "tests":
        assert args.log is not None
        step_tests(args.out, args.log, args.rc, args.seconds)
    elif args.step == "step":
        steps = _load(args.out).get("steps", {})
        steps[args.name] = f"exit {args.rc}, {args.seconds:.0f} s" + (" (timed out)" if args.rc in (124, 137) else "")
        _save(args.out, "steps", steps)
    else:
        (args.out / "gpu_check.md").write_text(render(_load(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
