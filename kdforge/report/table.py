"""Results tables from run directories: scan, group by dataset and pair, aggregate over seeds, write Markdown/CSV.

A run directory is any folder holding ``summary.json`` and ``config.yaml`` (``metrics.jsonl`` and ``env.json`` are
used when present). Runs are grouped by (dataset, teacher, student): a distillation run names its teacher in its
config; a run without a teacher joins every group whose student is its network (the "student alone" baseline,
or a teacher-free method such as DML); the teacher row is the run its distillation runs loaded the teacher from
(``teacher.checkpoint``), else a teacher-free vanilla run of the teacher network, else the teacher accuracy the
distillation runs measured before training. Within a group, runs of one method form one row, aggregated over
seeds; runs of one method that differ in anything but the seed (and bookkeeping keys) get separate rows whose labels
name the differing keys.

Every number is the run's primary metric: ``summary["primary"]`` (written by tasks other than classification, e.g.
``mIoU`` for segmentation; ``top1`` when absent), read as ``best_<primary>``/``final_<primary>`` from ``summary.json``
and ``test_<primary>`` from ``metrics.jsonl``. Runs of different primary metrics never share a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import kdforge.data  # noqa: F401  (registers the datasets whose entries describe_budget reads)
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.errors import KDForgeError
from kdforge.registry import DATASETS
from kdforge.report.published import Published, lookup

# Display names in table order: the logit family first, then feature/relation/contrastive methods (the order of
# docs/RESULTS.md); methods not listed follow alphabetically under their registry name.
DISPLAY = {
    "vanilla": "student alone",
    "kd": "KD",
    "dkd": "DKD",
    "ls_kd": "LS-KD",
    "ls_dkd": "LS-DKD",
    "alpha_kd": "α-KD",
    "atf": "ATF",
    "atf_shadow": "ATF (shadow)",
    "bilateral": "bilateral KD",
    "kd_jda": "KD + JDA",
    "ccd": "CCD",
    "fitnet": "FitNets",
    "at": "AT",
    "rkd": "RKD",
    "crd": "CRD",
    "aft_kd": "AFT-KD",
    "amkd": "AMKD",
    "triplet_kd": "triplet KD",
    "purf": "PURF",
    "dml": "DML",
    "pixel_kd": "pixel KD",
    "cwd": "CWD",
    "fckdnet": "FCKDNet",
    "det_kd": "class KD",
    "ld": "LD",
    "pkd": "PKD",
    "fgd": "FGD",
    "shared_kd": "Shared-KD",
    "rotated_ld": "Rotated-LD",
    "oriented_dkd": "discretized-decoupled KD",
    "output_kd": "output KD",
    "feature_kd": "feature KD",
    "at_enh": "AT",
    "lowlight_kd": "low-light KD",
    "code_kd": "code KD",
    "contrastive_code_kd": "contrastive code KD",
    "brcd": "BRCD",
    "dats": "DATS",
}

# Config keys that never tell two runs' protocols apart: the seed (aggregated over), where files live, which
# network (already the group) and run-time conveniences.
IGNORED_KEYS = (
    "train.seed",
    "train.device",
    "train.progress",
    "train.log_every",
    "train.compile",
    "train.channels_last",
    "train.deterministic",
    "train.tensorboard",
    "model.name",
    "model.checkpoint",
    "model.num_classes",
    "teacher.",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.eval_batch_size",
)


def metric_label(primary: str) -> str:
    """How a table, a note or an axis names a primary metric: ``top-1`` for ``top1``, else its own name."""
    return "top-1" if primary == "top1" else primary


@dataclass
class RunRecord:
    """One finished run directory."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    curve: list[tuple[float, float]]
    env: dict[str, Any]
    #: hashing runs evaluated with ``task.pr_curve``: precision and recall per Hamming radius at the last evaluation
    pr_curve: tuple[list[float], list[float]] | None = None

    @property
    def primary(self) -> str:
        """The task's primary metric the run was scored and checkpointed by (``top1`` for classification)."""
        return str(self.summary.get("primary", "top1"))

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or self.config.get("data", {}).get("name", "?"))

    @property
    def model(self) -> str:
        return str(self.summary.get("model") or self.config.get("model", {}).get("name", "?"))

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def teacher(self) -> str | None:
        teacher = self.config.get("teacher") or {}
        return teacher.get("name") or None

    @property
    def teacher_checkpoint(self) -> Path | None:
        ckpt = (self.config.get("teacher") or {}).get("checkpoint")
        if not ckpt:
            return None
        path = Path(ckpt).resolve()
        return path.parent if path.is_file() else path

    @property
    def epochs(self) -> int | None:
        return self.config.get("train", {}).get("epochs")

    def protocol(self) -> dict[str, Any]:
        """The flattened config without the ignored keys: what two seeds of one setting share."""
        flat = _flatten(self.config)
        return {
            k: v for k, v in flat.items() if not any(k == i or (i[-1] == "." and k.startswith(i)) for i in IGNORED_KEYS)
        }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return out


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when it is missing)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the rest of the file is still good
    return records


def _read_curve(records: Sequence[Mapping[str, Any]], primary: str = "top1") -> list[tuple[float, float]]:
    """``(epoch, test_<primary>)`` of every evaluated epoch among a ``metrics.jsonl``'s records."""
    key = f"test_{primary}"
    points = [(float(r["epoch"]), float(r[key])) for r in records if key in r]
    # A resumed run may have logged an epoch twice (crash after the log line, before the checkpoint): keep the last.
    return sorted(dict(points).items())


def _read_pr_curve(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]] | None:
    """Precision and recall at Hamming radius 0, 1, ... from the last record holding them (``task.pr_curve``)."""
    last = next((r for r in reversed(records) if "test_pr_precision@0" in r), None)
    if last is None:
        return None
    radii = range(sum(1 for k in last if k.startswith("test_pr_precision@")))
    return [float(last[f"test_pr_precision@{i}"]) for i in radii], [float(last[f"test_pr_recall@{i}"]) for i in radii]


def scan_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run directory under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.is_dir():
        raise KDForgeError(f"runs directory {root} does not exist")
    records = []
    for summary_path in sorted(root.rglob("summary.json")):
        run_dir = summary_path.parent
        if not (run_dir / "config.yaml").is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise KDForgeError(f"{run_dir}: unreadable summary.json or config.yaml ({err})") from None
        env_path = run_dir / "env.json"
        env = json.loads(env_path.read_text()) if env_path.is_file() else {}
        lines = _read_records(run_dir / "metrics.jsonl")
        curve = _read_curve(lines, str(summary.get("primary", "top1")))
        records.append(RunRecord(run_dir.resolve(), config, summary, curve, env, _read_pr_curve(lines)))
    if not records:
        raise KDForgeError(f"no run directories (summary.json + config.yaml) under {root}")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Aggregation


@dataclass
class Stat:
    """Mean, sample standard deviation (``None`` for one value) and count."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def format(self, digits: int = 2) -> str:
        """``mean ± std`` with ``digits`` decimals (``mean`` alone for one run)."""
        return f"{self.mean:.{digits}f}" if self.std is None else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


# Two-sided 95 % quantiles of Student's t (t_0.975) for 1 to 30 degrees of freedom; beyond, the Cornish-Fisher
# expansion around the normal quantile is within 1e-4 of the exact value.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` ≥ 1 degrees of freedom (half-width factor of a 95 % interval)."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least one degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Paired:
    """Differences of the final metric, row minus baseline, between runs of the same seed (``train.seed``): their
    mean and two-sided 95 % t-interval (``None`` for one seed), over the seeds both rows finished.

    Pairing removes what two runs of one seed share (data order, augmentation, and the initialisation when the
    networks are the same), so it resolves differences that the seed spread of either row alone hides.
    """

    mean: float
    interval: tuple[float, float] | None
    seeds: list[int]

    @classmethod
    def of(cls, row: Mapping[int, float], base: Mapping[int, float]) -> Paired | None:
        seeds = sorted(set(row) & set(base))
        if not seeds:
            return None
        diffs = [row[s] - base[s] for s in seeds]
        mean = statistics.mean(diffs)
        if len(diffs) == 1:
            return cls(mean, None, seeds)
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return cls(mean, (mean - half, mean + half), seeds)

    def format(self, digits: int = 2) -> str:
        """``+mean [low, high] (n seeds)``; ``+mean (1 seed)`` without an interval."""
        text = f"{self.mean:+.{digits}f}"
        if self.interval is not None:
            text += f" [{self.interval[0]:+.{digits}f}, {self.interval[1]:+.{digits}f}]"
        n = len(self.seeds)
        return text + f" ({n} seed{'s' if n > 1 else ''})"


@dataclass
class Row:
    """One line of a table: the teacher, the student alone, or a method, aggregated over its runs."""

    role: str  # "teacher", "student" or "method"
    network: str
    method: str
    label: str
    runs: list[RunRecord]
    best: Stat
    final: Stat
    time_s: float | None
    gain_best: Stat | None = None
    gain_final: float | None = None
    published: Published | None = None
    extras: dict[str, Stat] = field(default_factory=dict)
    #: final values of the task's other summary metrics (enhancement: ``ssim``), beside the primary's
    secondary: dict[str, Stat] = field(default_factory=dict)


@dataclass
class Group:
    """All rows of one (dataset, teacher, student)."""

    dataset: str
    teacher: str
    student: str
    rows: list[Row]
    primary: str = "top1"  # the metric of every number in the table
    #: paired comparisons: (baseline row label, [(row label, difference)]), the student alone first
    paired: list[tuple[str, list[tuple[str, Paired]]]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        """The primary metric's display name (``top-1``, ``mIoU``, ...)."""
        return metric_label(self.primary)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.dataset}_{self.teacher}_{self.student}")

    def row(self, role: str) -> Row | None:
        return next((r for r in self.rows if r.role == role), None)


def _order(method: str) -> tuple[int, str]:
    names = list(DISPLAY)
    return (names.index(method), "") if method in names else (len(names), method)


def _summary_value(run: RunRecord, key: str) -> float:
    try:
        return float(run.summary[key])
    except KeyError:
        raise KDForgeError(f"{run.path}/summary.json has no {key!r}; is it a kdforge run directory?") from None


def _final_by_seed(row: Row, primary: str) -> dict[int, float]:
    """Seed → final value of a row's runs; empty when a seed is missing or repeats (no unambiguous pairing)."""
    out: dict[int, float] = {}
    for run in row.runs:
        seed = run.config.get("train", {}).get("seed")
        if not isinstance(seed, int) or seed in out:
            return {}
        out[seed] = _summary_value(run, f"final_{primary}")
    return out


def _paired_against(base: Row, rows: Sequence[Row], primary: str) -> list[tuple[str, Paired]]:
    """Every method row (other than ``base``) paired by seed against ``base``, where they share a seed."""
    reference = _final_by_seed(base, primary)
    out = []
    for row in rows:
        if row is base or row.role != "method":
            continue
        paired = Paired.of(_final_by_seed(row, primary), reference)
        if paired is not None:
            out.append((row.label, paired))
    return out


def _row(role: str, method: str, label: str, runs: list[RunRecord], key: tuple[str, str, str, str]) -> Row:
    """Aggregate ``runs`` of group ``key`` = (dataset, teacher, student, primary) into one row."""
    dataset, teacher, student, primary = key
    best = Stat.of([_summary_value(r, f"best_{primary}") for r in runs])
    final = Stat.of([_summary_value(r, f"final_{primary}") for r in runs])
    times = [float(r.summary["train_time_s"]) for r in runs if "train_time_s" in r.summary]
    extras: dict[str, list[float]] = {}
    suffix = f"_{primary}"
    for r in runs:
        for name, value in r.summary.items():
            if name.startswith("final_") and name.endswith(suffix) and name != f"final{suffix}":
                extras.setdefault(name.removeprefix("final_").removesuffix(suffix), []).append(float(value))
    # A dense task's other summary metrics (``final_<m>``, e.g. SSIM beside PSNR) get columns of their own;
    # classification tables keep their fixed columns (top-1 only).
    secondary: dict[str, list[float]] = {}
    if primary != "top1":
        for r in runs:
            for name, value in r.summary.items():
                metric = name.removeprefix("final_")
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if name.startswith("final_") and metric != primary and not name.endswith(suffix) and numeric:
                    secondary.setdefault(metric, []).append(float(value))
    # Published numbers are classification top-1 (BENCHMARKS.md); another metric is never compared with them.
    published = (
        lookup(dataset, teacher, student, "teacher" if role == "teacher" else method, runs[0].epochs)
        if primary == "top1"
        else None
    )
    return Row(
        role=role,
        network=f"{teacher} (teacher)" if role == "teacher" else student,
        method=method,
        label=label,
        runs=runs,
        best=best,
        final=final,
        time_s=statistics.mean(times) if times else None,
        published=published,
        extras={k: Stat.of(v) for k, v in extras.items() if len(v) == len(runs)},
        secondary={k: Stat.of(v) for k, v in secondary.items() if len(v) == len(runs)},
    )


def _labelled(runs: list[RunRecord]) -> list[tuple[str, str, list[RunRecord]]]:
    """Split runs by method, then by protocol; returns (method, label, runs) with distinguishing labels."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    out = []
    for method in sorted(by_method, key=_order):
        variants: dict[str, list[RunRecord]] = {}
        protocols: dict[str, dict[str, Any]] = {}
        # Only keys every run's config has: a key added to the schema later (absent from older runs) says nothing.
        common = set.intersection(*(set(r.protocol()) for r in by_method[method]))
        for r in by_method[method]:
            proto = {k: v for k, v in r.protocol().items() if k in common}
            key = json.dumps(proto, sort_keys=True, default=str)
            variants.setdefault(key, []).append(r)
            protocols[key] = proto
        name = DISPLAY.get(method, method)
        if len(variants) == 1:
            out.append((method, name, next(iter(variants.values()))))
            continue
        keys = sorted({k for p in protocols.values() for k in p})
        differing = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in protocols.values()}) > 1]
        labelled = []
        for key, group_runs in variants.items():
            detail = ", ".join(f"{k}={protocols[key].get(k)}" for k in differing)
            labelled.append((method, f"{name} ({detail})", group_runs))
        out += sorted(labelled, key=lambda item: item[1])
    return out


def _same_budget(a: RunRecord, b: RunRecord) -> bool:
    """Two runs trained on the same budget (epochs and training subset): a fair gain comparison."""
    return a.epochs == b.epochs and a.config.get("data", {}).get("train_subset") == b.config.get("data", {}).get(
        "train_subset"
    )


def build_groups(records: Iterable[RunRecord], against: Sequence[str] = ()) -> list[Group]:
    """Group and aggregate runs into tables (see the module docstring for the rules).

    Every method row is paired by seed against the student alone (:attr:`Group.paired`) and against the rows whose
    method name or label is in ``against``; a name no group has is an error.
    """
    records = list(records)
    wanted = {name.lower() for name in against}
    found: set[str] = set()
    by_path = {r.path: r for r in records}
    teacher_dirs = {r.teacher_checkpoint for r in records if r.teacher_checkpoint is not None}
    keys = sorted({(r.dataset, r.teacher, r.model, r.primary) for r in records if r.teacher is not None})
    groups = []
    for dataset, teacher, student, primary in keys:
        distilled = [
            r for r in records if (r.dataset, r.teacher, r.model, r.primary) == (dataset, teacher, student, primary)
        ]
        alone = [
            r
            for r in records
            if r.teacher is None
            and r.dataset == dataset
            and r.model == student
            and r.primary == primary
            and r.path not in teacher_dirs
        ]
        refs = {r.teacher_checkpoint for r in distilled}
        teacher_runs = [by_path[p] for p in sorted(p for p in refs if p in by_path)]  # type: ignore[type-var]
        if not teacher_runs and teacher != student:
            teacher_runs = [
                r
                for r in records
                if r.teacher is None
                and r.method == "vanilla"
                and r.dataset == dataset
                and r.model == teacher
                and r.primary == primary
            ]
        key = (dataset, teacher, student, primary)
        rows: list[Row] = []
        if teacher_runs:
            rows.append(_row("teacher", "vanilla", "vanilla", teacher_runs, key))
        else:
            # No teacher run in the scan: the accuracy the distillation runs measured on the same test set.
            measured_key = f"teacher_{primary}"
            measured = sorted({float(r.summary[measured_key]) for r in distilled if measured_key in r.summary})
            if measured:
                stat = Stat.of(measured)
                rows.append(Row("teacher", f"{teacher} (teacher)", "—", "evaluated", [], stat, stat, None))
        for method, label, runs in _labelled(alone):
            role = "student" if method == "vanilla" else "method"
            rows.append(_row(role, method, label, runs, key))
        for method, label, runs in _labelled(distilled):
            rows.append(_row("method", method, label, runs, key))
        baselines = [r for r in rows if r.role == "student"]
        for row in rows:
            if row.role != "method":
                continue
            base = next((b for b in baselines if _same_budget(b.runs[0], row.runs[0])), None)
            if base is None and len(baselines) == 1:
                base = baselines[0]
            if base is not None:
                # The error of a gain is the spread of the difference of two independent seeds' accuracies.
                stds = [s for s in (row.best.std, base.best.std) if s is not None]
                std = math.sqrt(sum(s * s for s in stds)) if stds else None
                row.gain_best = Stat(row.best.mean - base.best.mean, std, row.best.n)
                row.gain_final = row.final.mean - base.final.mean
        group = Group(dataset, teacher, student, rows, primary)
        references = baselines + [
            r for r in rows if r.role == "method" and {r.method.lower(), r.label.lower()} & wanted
        ]
        for ref in references:
            found |= {ref.method.lower(), ref.label.lower()} & wanted
            comparisons = _paired_against(ref, rows, primary)
            if comparisons:
                group.paired.append((ref.label, comparisons))
        groups.append(group)
    missing = sorted(wanted - found)
    if missing:
        labels = sorted({r.label for g in groups for r in g.rows if r.role == "method"})
        raise KDForgeError(f"--against {', '.join(missing)}: no method row has that name or label (rows: {labels})")
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Rendering

COLUMNS = [
    "network",
    "method",
    "n",
    "best top-1",
    "final top-1",
    "gain (best) over student alone",
    "train time / run",
    "published (best)",
]


def _published_cell(row: Row) -> str:
    return f"{row.published.top1:.2f} [{row.published.tag}]" if row.published else "—"


def columns(primary: str = "top1") -> list[str]:
    """The table's column headers, naming the primary metric of its numbers."""
    metric = metric_label(primary)
    return [c.replace("top-1", metric) if c in ("best top-1", "final top-1") else c for c in COLUMNS]


def secondary_metrics(group: Group) -> list[str]:
    """The other summary metrics any row of ``group`` has, in the order the rows first name them; a row without one
    (hashing's ``map_teacher_db`` needs a teacher, so the teacher and the student alone have none) shows "—"."""
    names: dict[str, None] = {}
    for row in group.rows:
        names.update(dict.fromkeys(row.secondary))
    return list(names)


def _digits(group: Group) -> int:
    """Decimals of the group's primary metric: a metric in [0, 1] (COCO AP, retrieval mAP) needs four, like SSIM: at
    two, AP 0.1275 and 0.1302 both read 0.13. Percentages (top-1, mIoU) keep two."""
    return 4 if all(abs(s.mean) <= 1 for row in group.rows for s in (row.best, row.final)) else 2


def _secondary_cell(stat: Stat | None) -> str:
    # a metric in [0, 1] (SSIM, retrieval mAP) needs more than two decimals to show its differences
    return "—" if stat is None else stat.format(4 if abs(stat.mean) < 1 else 2)


def markdown_table(group: Group) -> str:
    """The group's rows as a Markdown table (a dense task's other metrics in columns after the primary's)."""
    header = columns(group.primary)
    others = secondary_metrics(group)
    at = header.index(f"final {group.metric}") + 1
    header = header[:at] + [f"final {m}" for m in others] + header[at:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = _digits(group)
    for row in group.rows:
        gain = f"{row.gain_best.mean:+.{digits}f}" if row.gain_best is not None else ""
        minutes = f"{row.time_s / 60:.1f} min" if row.time_s is not None else ""
        cells = [
            row.network,
            row.label,
            str(row.best.n),
            row.best.format(digits),
            row.final.format(digits),
            *(_secondary_cell(row.secondary.get(m)) for m in others),
            gain,
            minutes,
            _published_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_notes(group: Group) -> list[str]:
    """Sentences about extra networks a method reports (e.g. ATF's fine-tuned teacher) and published sources."""
    notes = []
    teacher = group.row("teacher")
    metric = group.metric
    for row in group.rows:
        for name, stat in row.extras.items():
            if name == "teacher":
                base = f" (the pretrained teacher: {teacher.final.mean:.2f} %)" if teacher else ""
                notes.append(f"{row.label}'s fine-tuned teacher ends at {stat.format()} % {metric}{base}.")
            else:
                notes.append(f"{row.label}'s {name} network ends at {stat.format()} % {metric}.")
    digits = _digits(group)
    for base, comparisons in group.paired:
        cells = "; ".join(f"{label} {paired.format(digits)}" for label, paired in comparisons)
        notes.append(
            f"Paired by seed against {base} (final {metric}, row minus {base}, mean over the seeds both finished, "
            f"two-sided 95 % t-interval): {cells}."
        )
    sources = {r.published.tag: r.published.source for r in group.rows if r.published}
    if sources:
        notes.append("Published: " + "; ".join(f"[{t}] {s}" for t, s in sorted(sources.items())) + ".")
    return notes


def describe_device(records: Iterable[RunRecord]) -> str:
    """The devices the runs trained on, from their ``env.json`` (this machine when none has one)."""
    names = []
    for r in records:
        env = r.env
        if not env:
            continue
        if str(env.get("device", "")).startswith("cuda"):
            name = f"GPU {env.get('gpu', 'cuda')} (CUDA {env.get('cuda', '?')})"
        else:
            arch = next((a for a in ("x86_64", "aarch64", "arm64") if a in str(env.get("platform", ""))), "CPU")
            name = f"CPU ({arch}, {env.get('cpu_count', '?')} cores)"
        if name not in names:
            names.append(name)
    if not names:
        return f"unknown (no env.json); report made on {platform.machine()}"
    return "; ".join(names)


def describe_dates(records: Iterable[RunRecord]) -> str:
    """The day(s) the runs finished (modification time of their summary.json), UTC."""
    stamps = {(r.path / "summary.json").stat().st_mtime for r in records}
    days = sorted({datetime.fromtimestamp(t, timezone.utc).date().isoformat() for t in stamps})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


#: what each task's training augmentation does (docs/tasks/<task>.md has the details)
AUGMENTATION = {
    "classification": "random crop + flip",
    "segmentation": "joint scale + crop + flip of input and target",
    "detection": "joint scale + crop + flip of image and boxes",
    "enhancement": "joint random crop + flip of input and target",
    "oriented_detection": "joint quarter turns + mirror of image and rotated boxes",
    "hashing": "two views per image (CIBHash's random resized crop, flip, colour jitter, grayscale, blur)",
}


def _own_split(data: Mapping[str, Any]) -> str | None:
    """The registry's description of the split a dataset defines itself (``None`` for a plain train/test set)."""
    name = data.get("name")
    return DATASETS.meta(name).get("split") if name in DATASETS else None


def _describe_split(data: Mapping[str, Any]) -> str:
    """The images a run trains and is evaluated on. A dataset that defines its own split (a retrieval protocol)
    says so in its registry entry (``split``); its ``train_subset`` / ``test_subset`` then mean what the dataset's
    docstring says, so they are named as settings rather than as image counts."""
    split = _own_split(data)
    if split:
        subsets = [f"data.{k} {data[k]:,}" for k in ("train_subset", "test_subset") if data.get(k)]
        return "; ".join([split, *subsets])
    train_n = f"{data['train_subset']:,} training images" if data.get("train_subset") else "the full training set"
    test_n = f"{data['test_subset']:,} test images" if data.get("test_subset") else "the full test set"
    return f"{train_n}, {test_n}"


def describe_budget(group: Group) -> str:
    """Training budget of the group's runs, from their configs (the student runs' settings)."""
    students = [r for row in group.rows if row.role != "teacher" for r in row.runs]
    teachers = [r for row in group.rows if row.role == "teacher" for r in row.runs]
    if not students:
        return ""
    cfg = students[0].config
    data, optim, sched = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("schedule", {})
    epochs = sorted({r.epochs for r in students if r.epochs})
    teacher_epochs = sorted({r.epochs for r in teachers if r.epochs})
    parts = [_describe_split(data)]
    if teacher_epochs:
        teacher_n = {r.config.get("data", {}).get("train_subset") for r in teachers}
        ns = sorted(teacher_n, key=str)
        on = ""
        if teacher_n != {data.get("train_subset")}:  # the teacher trained on another share of the training set
            if _own_split(data):
                on = " with " + "/".join(f"data.train_subset {n:,}" if n else "no data.train_subset" for n in ns)
            else:
                on = " on " + "/".join(f"{n:,}" if n else "the full training set" for n in ns)
                on += " training images" if None not in teacher_n else ""
        parts.append(f"teacher {'/'.join(map(str, teacher_epochs))} epochs{on}")
    parts.append(f"each student run {'/'.join(map(str, epochs))} epochs")
    nesterov = " nesterov" if optim.get("nesterov") else ""
    opt = f"batch {data.get('batch_size')}, {optim.get('name', 'sgd').upper()}{nesterov} lr {optim.get('lr')}"
    parts.append(f"{opt}, weight decay {optim.get('weight_decay')}")
    schedule = f"{sched.get('name', 'multistep')} schedule"
    if sched.get("warmup_epochs"):
        schedule += f" with {sched['warmup_epochs']} epoch(s) of warm-up"
    parts.append(schedule)
    task = str(students[0].summary.get("task", "classification"))
    augmentation = AUGMENTATION.get(task, f"the {task} task's joint augmentation of input and target")
    parts.append(augmentation if data.get("augment", True) else "no augmentation")
    return "; ".join(parts) + "."


def describe_methods(group: Group) -> str:
    """Each method row's parameters as its runs' configs give them (the values that produced the numbers)."""
    parts = []
    for row in group.rows:
        if row.role != "method" or not row.runs:
            continue
        params = {k: v for k, v in row.runs[0].config.get("method", {}).items() if k != "name"}
        text = ", ".join(f"{k} {v}" for k, v in params.items()) or "defaults"
        parts.append(f"{row.label}: {text}")
    return "; ".join(parts) + "." if parts else ""


def group_title(group: Group) -> str:
    return f"{group.dataset}: {group.teacher} → {group.student}"


def csv_text(groups: Sequence[Group]) -> str:
    """One CSV row per table row of every group (numbers unrounded; empty cells for missing values).

    When any group's metric is not top-1, a last ``metric`` column names each row's metric (``best_mean`` etc. are
    in that metric); a classification-only report keeps the columns it always had.
    """
    with_metric = any(g.primary != "top1" for g in groups)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = [
        "dataset", "teacher", "student", "role", "method", "label", "n", "best_mean", "best_std", "final_mean",
        "final_std", "gain_best", "gain_best_std", "gain_final", "train_time_s", "published_top1", "published_source",
    ]  # fmt: skip
    writer.writerow(header + (["metric"] if with_metric else []))

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    for g in groups:
        for row in g.rows:
            gain = row.gain_best
            writer.writerow(
                [
                    g.dataset, g.teacher, g.student, row.role, row.method, row.label, row.best.n,
                    num(row.best.mean), num(row.best.std), num(row.final.mean), num(row.final.std),
                    num(gain.mean if gain else None), num(gain.std if gain else None), num(row.gain_final),
                    num(row.time_s), num(row.published.top1 if row.published else None),
                    row.published.source if row.published else "",
                ] + ([g.primary] if with_metric else [])
            )  # fmt: skip
    return buffer.getvalue()


@dataclass
class Report:
    """What ``write_report`` produced."""

    groups: list[Group]
    markdown: Path
    csv: Path
    plots: list[Path]
    block: str  # the Markdown body (no top-level heading), for inserting into another document


#: primary metrics the tasks report in percent (the others are fractions in [0, 1], or PSNR in dB)
PERCENT_METRICS = ("top1", "top5", "mIoU", "mAcc", "aAcc")


def plot_units(primary: str) -> tuple[str, str]:
    """The unit of a primary metric on a plot axis and of a difference of it: ``("%", "points")`` for percentages,
    ``("dB", "dB")`` for PSNR, none for fractions (COCO AP, DOTA mAP, retrieval mAP)."""
    if primary == "psnr":
        return "dB", "dB"
    return ("%", "points") if primary in PERCENT_METRICS else ("", "")


def group_plots(group: Group, out_dir: Path) -> list[Path]:
    """Accuracy-per-epoch curves (seed bands) and the gains bar chart of one group; for hashing runs evaluated with
    ``task.pr_curve``, the precision–recall curves of their last evaluation, one line per row."""
    from kdforge.report.plots import plot_gains, plot_seed_curves

    curves = {_plot_label(group, row): [r.curve for r in row.runs] for row in group.rows if row.runs}
    metric = group.metric
    unit, diff_unit = plot_units(group.primary)
    ylabel = f"test {metric} ({unit})" if unit else f"test {metric}"
    paths = [plot_seed_curves(curves, out_dir / f"{group.slug}_curves.png", title=group_title(group), ylabel=ylabel)]
    gains = {
        row.label: (row.gain_best.mean, row.gain_best.std or 0.0) for row in group.rows if row.gain_best is not None
    }
    if gains:
        paths.append(
            plot_gains(
                gains,
                out_dir / f"{group.slug}_gains.png",
                title=group_title(group),
                ylabel=f"best {metric} minus the student alone's" + (f" ({diff_unit})" if diff_unit else ""),
            )
        )
    pr_curves = _mean_pr_curves(group)
    if pr_curves:
        from kdforge.report.retrieval_pictures import plot_precision_recall

        title = f"{group_title(group)}: Hamming-ball retrieval, last evaluation"
        paths.append(plot_precision_recall(pr_curves, out_dir / f"{group.slug}_pr.png", title=title))
    return paths


def _mean_pr_curves(group: Group) -> dict[str, tuple[Any, Any]]:
    """Row label → (precision, recall) per Hamming radius, averaged over the row's seeds (runs with a curve)."""
    import torch

    curves = {}
    for row in group.rows:
        runs = [r.pr_curve for r in row.runs if r.pr_curve is not None]
        if not runs:
            continue
        precision = torch.tensor([p for p, _ in runs], dtype=torch.float64)
        recall = torch.tensor([r for _, r in runs], dtype=torch.float64)
        # a radius where one seed retrieves nothing (NaN precision) takes the other seeds' mean
        curves[_plot_label(group, row)] = (precision.nanmean(0), recall.nanmean(0))
    return curves


def _plot_label(group: Group, row: Row) -> str:
    """A row's legend entry: the teacher row names the teacher network, the others their table label."""
    return f"teacher {group.teacher}" if row.role == "teacher" else row.label


def render_block(
    groups: Sequence[Group],
    records: Sequence[RunRecord],
    *,
    command: str,
    runs_command: str | None = None,
    plots: Mapping[str, Sequence[Path]] | None = None,
    link_base: Path | None = None,
    heading_level: int = 3,
) -> str:
    """The report body: provenance lines, then per group a title, budget, table, notes and plot links."""
    today = datetime.now(timezone.utc).date().isoformat()
    lines = []
    if runs_command:
        lines.append(f"- Runs: `{runs_command}`")
    metrics = sorted({g.metric for g in groups}, key=lambda m: (m != "top-1", m))
    metric = " or ".join(metrics) if metrics else "top-1"
    definition = (
        f"- Best = highest test {metric} over the evaluated epochs; final = last epoch; mean ± std over seeds "
        f"(sample std), n runs. Gain = mean best {metric} minus the student alone's on the same budget. Published: "
        "best-epoch numbers from BENCHMARKS.md, shown only where dataset, pair, method and epochs match the "
        "published protocol."
    )
    if len(metrics) > 1:
        definition += " Each table's columns name its metric."
    lines += [
        f"- Table: `{command}` (report date {today})",
        f"- Device: {describe_device(records)}; runs finished {describe_dates(records)}.",
        definition,
    ]
    single = len(groups) == 1
    for group in groups:
        lines.append("")
        if not single:
            lines += [f"{'#' * heading_level} {group_title(group)}", ""]
        budget = describe_budget(group)
        if budget:
            lines.append(f"- Budget: {budget}")
        methods = describe_methods(group)
        if methods:
            lines.append(f"- Method settings: {methods}")
        if budget or methods:
            lines.append("")
        lines.append(markdown_table(group))
        notes = group_notes(group)
        if notes:
            lines += ["", *notes]
        for path in (plots or {}).get(group.slug, []):
            target = Path(_relpath(path, link_base)) if link_base is not None else path
            lines += ["", f"![{path.stem}]({target.as_posix()})"]
    return "\n".join(lines) + "\n"


def _relpath(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), base.resolve())


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    *,
    command: str,
    runs_command: str | None = None,
    plots: bool = True,
    link_base: Path | None = None,
    against: Sequence[str] = (),
) -> Report:
    """Scan ``runs_dir`` and write ``report.md``, ``report.csv`` and (unless ``plots=False``) PNGs to ``out_dir``.

    ``runs_command`` (the command that produced the runs) defaults to the one a sweep records in
    ``<runs_dir>/_sweep/command.txt``. ``link_base`` is the folder image links in ``Report.block`` are relative to.
    ``against``: method names or row labels that every other method row is also paired against (beside the
    student alone; see :func:`build_groups`).
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    records = scan_runs(runs_dir)
    groups = build_groups(records, against)
    if not groups:
        raise KDForgeError(f"no distillation runs under {runs_dir}: a table needs runs that name a teacher")
    recorded = runs_dir / "_sweep" / "command.txt"
    if runs_command is None and recorded.is_file():
        runs_command = recorded.read_text().strip()
    plot_paths = {g.slug: group_plots(g, out_dir) for g in groups} if plots else {}
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    body = render_block(
        groups,
        records,
        command=command,
        runs_command=runs_command,
        plots=plot_paths,
        link_base=out_dir,
    )
    title = f"# kdforge report: {runs_dir.as_posix()}\n\n"
    if len(groups) == 1:
        title += f"## {group_title(groups[0])}\n\n"
    atomic_write_text(md_path, title + body)
    atomic_write_text(csv_path, csv_text(groups))
    block = render_block(
        groups,
        records,
        command=command,
        runs_command=runs_command,
        plots=plot_paths,
        link_base=link_base or out_dir,
    )
    return Report(groups, md_path, csv_path, [p for ps in plot_paths.values() for p in ps], block)


BEGIN = "<!-- kdforge report: begin (generated; edit outside these markers) -->"
END = "<!-- kdforge report: end -->"


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the generated part of section ``## heading`` replaced by ``body``; other text is kept.

    The generated part sits between the BEGIN/END markers under the heading. A section written before the markers
    existed is replaced up to its first paragraph starting with "Notes" (hand-written notes stay); a missing section
    is appended.
    """
    title = f"## {heading}"
    generated = f"{title}\n\n{BEGIN}\n{body.rstrip()}\n{END}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + generated
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = lines[start:end]
    end_marker = next((i for i, line in enumerate(section) if line.rstrip() == END), None)
    if end_marker is not None:
        kept = section[end_marker + 1 :]
    else:
        notes = next((i for i, line in enumerate(section) if line.startswith("Notes")), len(section))
        kept = section[notes:]
    rest = "".join(kept).lstrip("\n")
    tail = "".join(lines[end:])
    middle = generated + ("\n" + rest if rest else "")
    if tail and not middle.endswith("\n\n"):
        middle = middle.rstrip("\n") + "\n\n"
    return "".join(lines[:start]) + middle + tail
