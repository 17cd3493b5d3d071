"""``kdforge sweep``: a grid of runs (methods × teacher/student pairs × seeds) from one small YAML file.

A sweep file (documented with examples in docs/EXPERIMENTS.md)::

    out: runs/sweeps/cifar10              # root of the run directories (required)
    base: configs/smoke/kd.yaml           # optional: a config file or an inline mapping, under everything else
    overrides: {train.epochs: 5}          # optional: dotted keys applied to every run, teachers included
    teachers:                             # per teacher model: a checkpoint/run dir, or overrides to train it first
      resnet20: {train.epochs: 10}
    pairs: [[resnet20, resnet8]]          # [teacher, student]
    methods:                              # label -> dotted overrides; method.name defaults to the label
      student: {method.name: vanilla}
      kd: {method.temperature: 4}
    seeds: [0, 1, 2]

Every run gets a deterministic directory: ``<out>/<dataset>/<teacher>_<student>/<label>/seed<k>`` for a method that
distills, ``<out>/<dataset>/<student>/<label>/seed<k>`` for one that trains without a teacher (so pairs sharing a
student share its baseline) and ``<out>/<dataset>/teachers/<teacher>`` for a teacher the sweep trains. A directory
with ``summary.json`` is finished and skipped, one with ``last.pt`` but no summary is resumed, anything else
(re)started. Teachers run first (beside them the runs that need no teacher); each distillation run starts once its own
teacher has finished and reads it as a checkpoint.

Runs execute one after another in this process by default; ``gpus=[0, 1]`` runs up to one run per GPU at once as
``python -m kdforge train|distill`` subprocesses with ``CUDA_VISIBLE_DEVICES`` set, each writing its own log;
``workers=N`` runs up to N at once on a CPU machine, each with ``OMP_NUM_THREADS`` = its share of the cores (small
models scale badly over threads: two one-thread runs on two cores finish sooner than two two-thread runs in turn), or
``threads`` each when other jobs share the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from kdforge.config import RunConfig, config_from_dict, deep_merge, dump_yaml, load_yaml
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.engine.loop import TrainingInterrupted
from kdforge.engine.signals import StopRequest
from kdforge.errors import ConfigError, KDForgeError
from kdforge.registry import close_matches
from kdforge.validation import validate

SWEEP_KEYS = ("out", "base", "overrides", "teachers", "pairs", "methods", "seeds")
# Files of the sweep itself (launch configs, subprocess logs) live here, outside every run directory: a run that is
# restarted from scratch clears its directory, and must not take its own log or launch config with it.
SWEEP_DIR = "_sweep"

State = Literal["done", "resume", "new"]


@dataclass
class PlannedRun:
    """One run of a sweep: where it writes, what it runs and with which resolved config."""

    key: str
    out: Path
    command: Literal["train", "distill"]
    config: RunConfig
    role: Literal["teacher", "run"] = "run"
    after: tuple[str, ...] = ()  # keys of the sweep's teacher runs it distils from: it starts once they are done

    def state(self) -> State:
        """``done`` (summary.json exists), ``resume`` (last.pt without summary) or ``new``."""
        if (self.out / "summary.json").is_file():
            return "done"
        if (self.out / "last.pt").is_file():
            return "resume"
        return "new"


@dataclass
class SweepPlan:
    """The expanded grid: teachers the sweep trains first, then every other run."""

    out: Path
    teachers: list[PlannedRun] = field(default_factory=list)
    runs: list[PlannedRun] = field(default_factory=list)

    @property
    def all_runs(self) -> list[PlannedRun]:
        return [*self.teachers, *self.runs]


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    hints = close_matches(key, list(valid))
    hint = ("closest valid keys: " + ", ".join(hints)) if hints else ("valid keys: " + ", ".join(valid))
    return ConfigError(f"{where}: unknown key '{key}'; {hint}")


def _nest(dotted: Any, where: str) -> dict[str, Any]:
    """``{"train.epochs": 5}`` → ``{"train": {"epochs": 5}}``; nested mappings pass through."""
    if dotted is None:
        return {}
    if not isinstance(dotted, Mapping):
        raise ConfigError(f"{where} must be a mapping of dotted keys to values, like {{train.epochs: 5}}")
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = str(key).split(".")
        if any(not p for p in parts):
            raise ConfigError(f"{where}: key {key!r} has an empty part; write it like train.epochs")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        out = deep_merge(out, {parts[0]: nested})
    return out


def _method_section(base: Mapping[str, Any], override: Mapping[str, Any], default_name: str) -> dict[str, Any]:
    """The run's method: base parameters are kept only when the method stays the same (another method's
    parameters would be unknown keys for this one)."""
    base_method = base.get("method") or {}
    if isinstance(base_method, str):
        base_method = {"name": base_method}
    name = override.get("name", default_name)
    kept = dict(base_method) if base_method.get("name", "kd") == name else {}
    return {**kept, **override, "name": name}


def _needs_teacher(method: str) -> bool:
    from kdforge.methods import METHODS

    if method not in METHODS:
        return True  # validate() names the unknown method with close matches
    return bool(getattr(METHODS.get(method), "needs_teacher", True))


def _build(data: dict[str, Any], key: str, command: Literal["train", "distill"]) -> RunConfig:
    try:
        return validate(config_from_dict(data), command)
    except ConfigError as err:
        raise ConfigError(f"sweep run {key}: {err}") from None


def load_sweep(path: str | Path, *, root: str | Path | None = None) -> SweepPlan:
    """Read and expand a sweep file; relative ``out``/``base`` paths are relative to ``root`` (default: cwd)."""
    return expand_sweep(load_yaml(path), root=root, where=str(path))


def expand_sweep(spec: Mapping[str, Any], *, root: str | Path | None = None, where: str = "sweep") -> SweepPlan:
    """Expand a sweep mapping into validated runs (see the module docstring for the schema)."""
    for key in spec:
        if key not in SWEEP_KEYS:
            raise _unknown(str(key), SWEEP_KEYS, where)
    base_dir = Path(root) if root is not None else Path()
    if not spec.get("out"):
        raise ConfigError(f"{where}: 'out' is required (the root folder of the sweep's run directories)")
    out = base_dir / str(spec["out"])

    base = spec.get("base") or {}
    if isinstance(base, (str, Path)):
        base = load_yaml(base_dir / base)
    if not isinstance(base, Mapping):
        raise ConfigError(f"{where}: base must be a config file path or a mapping")
    common = deep_merge(base, _nest(spec.get("overrides"), f"{where}: overrides"))

    pairs = spec.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise ConfigError(f"{where}: pairs must be a non-empty list of [teacher, student], like [[resnet20, resnet8]]")
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ConfigError(f"{where}: each entry of pairs must be [teacher, student] model names, got {pair!r}")
    methods = spec.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ConfigError(f"{where}: methods must map labels to overrides, like {{kd: {{method.temperature: 4}}}}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds repeat a value: {seeds}")
    teachers_spec = spec.get("teachers") or {}
    if not isinstance(teachers_spec, Mapping):
        raise ConfigError(f"{where}: teachers must map a teacher model to a checkpoint path or to training overrides")

    plan = SweepPlan(out=out)
    teacher_ckpt: dict[str, str] = {}
    teacher_run: dict[str, str] = {}  # teacher model -> key of the run that trains it here
    for teacher in dict.fromkeys(p[0] for p in pairs):
        if teacher not in teachers_spec:
            raise ConfigError(
                f"{where}: teacher '{teacher}' has no entry under teachers; give its checkpoint "
                f"(teachers: {{{teacher}: runs/.../teacher}}) or {{}} to train it in the sweep"
            )
        entry = teachers_spec[teacher]
        if isinstance(entry, str):
            path = base_dir / entry
            if not path.exists():
                raise ConfigError(f"{where}: teachers.{teacher}: {path} does not exist")
            teacher_ckpt[teacher] = str(path)
            continue
        data = deep_merge(common, _nest(entry, f"{where}: teachers.{teacher}"))
        data["method"] = _method_section(common, {"name": "vanilla"}, "vanilla")
        data["model"] = {**(data.get("model") or {}), "name": teacher}
        data.pop("teacher", None)
        cfg = _build(data, f"teachers/{teacher}", "train")
        run = PlannedRun(f"{cfg.data.name}/teachers/{teacher}", Path(), "train", cfg, role="teacher")
        run.out = out / run.key
        plan.teachers.append(run)
        teacher_ckpt[teacher] = str(run.out)
        teacher_run[teacher] = run.key
    unused = [t for t in teachers_spec if t not in teacher_ckpt]
    if unused:
        raise ConfigError(f"{where}: teachers lists {', '.join(unused)}, which no pair uses")

    seen: set[str] = set()
    for label, entry in methods.items():
        override = _nest(entry, f"{where}: methods.{label}")
        method_override = override.pop("method", {}) or {}
        for teacher, student in pairs:
            for seed in seeds:
                data = deep_merge(common, override)
                data["method"] = _method_section(common, method_override, str(label))
                data["model"] = {**(data.get("model") or {}), "name": student}
                data["train"] = {**(data.get("train") or {}), "seed": seed}
                distills = _needs_teacher(data["method"]["name"])
                if distills:
                    data["teacher"] = {**(data.get("teacher") or {}), "name": teacher}
                    data["teacher"]["checkpoint"] = teacher_ckpt[teacher]
                    group = f"{teacher}_{student}"
                else:
                    data.pop("teacher", None)
                    group = student
                dataset = (data.get("data") or {}).get("name", "embedded")
                key = f"{dataset}/{group}/{label}/seed{seed}"
                if key in seen:  # a teacher-less baseline shared by pairs with the same student
                    continue
                seen.add(key)
                command: Literal["train", "distill"] = "distill" if distills else "train"
                after = (teacher_run[teacher],) if distills and teacher in teacher_run else ()
                plan.runs.append(PlannedRun(key, out / key, command, _build(data, key, command), after=after))
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Execution


class Process(Protocol):
    """What the scheduler needs of a launched run (``subprocess.Popen`` satisfies it)."""

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


Launcher = Callable[[list[str], dict[str, str], Path], Process]


def launch_subprocess(argv: list[str], env: dict[str, str], log: Path) -> Process:
    """Start ``argv`` with ``env``, stdout and stderr into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:  # the child keeps its own copy of the descriptor
        # A session of its own: a terminal's Ctrl-C reaches only the sweep, which passes it on once (a second signal
        # would make the run stop at once, without writing last.pt).
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _slug(key: str) -> str:
    return key.replace("/", "__")


def _subprocess_argv(plan: SweepPlan, run: PlannedRun) -> list[str]:
    """The ``python -m kdforge`` command of a run; its config goes to a file under the sweep's own folder."""
    config_path = plan.out / SWEEP_DIR / "configs" / f"{_slug(run.key)}.yaml"
    atomic_write_text(config_path, dump_yaml(run.config))
    argv = [sys.executable, "-m", "kdforge", run.command, "--config", str(config_path), "--out", str(run.out)]
    state = run.state()
    if state == "resume":
        argv.append("--resume")
    elif run.out.exists():
        argv.append("--force")  # a directory left by a run that died before its first checkpoint
    return argv


def _run_in_process(run: PlannedRun) -> None:
    from kdforge.api import run as api_run

    state = run.state()
    api_run(run.config, run.command, run.out, resume=state == "resume", force=state == "new")


@dataclass
class SweepResult:
    """What happened to each run: finished now, skipped (already finished), or failed (with the reason)."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _schedule(
    plan: SweepPlan,
    runs: list[PlannedRun],
    slots: Mapping[str, Mapping[str, str]],
    launcher: Launcher,
    result: SweepResult,
    log: Callable[[str], None],
    poll_s: float,
) -> None:
    """Run ``runs`` as subprocesses, at most one per slot at a time (a slot: a name like ``GPU 0`` and the environment
    variables its runs get), handing a freed slot to the first queued run whose teachers are done (a distillation
    run starts as soon as its own teacher has finished, beside another teacher still training)."""
    queue = list(runs)
    active: dict[str, tuple[PlannedRun, Process, Path]] = {}
    # SIGTERM/SIGINT: passed on to the running runs, which finish their step and write last.pt; nothing new starts,
    # and the sweep stops once they have exited, so that running it again resumes every one of them.
    stop = StopRequest().install()
    forwarded = False
    try:
        while queue or active:
            if stop.requested and not forwarded:
                forwarded = True
                queue.clear()
                for _, proc, _ in active.values():
                    proc.send_signal(getattr(signal, stop.signal_name or "SIGTERM"))
            for slot, extra_env in slots.items():
                run = None if slot in active else _next_ready(queue, result)
                if run is not None:
                    env = {**os.environ, **extra_env}
                    log_path = plan.out / SWEEP_DIR / "logs" / f"{_slug(run.key)}.log"
                    argv = _subprocess_argv(plan, run)
                    log(f"start {run.key} on {slot} (log {log_path})")
                    active[slot] = (run, launcher(argv, env, log_path), log_path)
            if queue and not active:  # every slot free and none of the rest can start: a teacher that never ran
                for run in queue:
                    result.failed[run.key] = "not run: its teacher " + ", ".join(run.after) + " did not finish"
                queue.clear()
            for slot, (run, proc, log_path) in list(active.items()):
                code = proc.poll()
                if code is None:
                    continue
                del active[slot]
                if code == 0:
                    result.ran.append(run.key)
                    log(f"done  {run.key} on {slot}")
                elif forwarded:
                    log(f"stopped {run.key} on {slot} (its last.pt resumes it)")
                else:
                    result.failed[run.key] = f"exit status {code}, see {log_path}"
                    log(f"FAIL  {run.key} on {slot}: exit status {code}, see {log_path}")
            if active:
                time.sleep(poll_s)
    finally:
        stop.uninstall()
    if stop.requested:
        raise TrainingInterrupted(
            f"sweep stopped by {stop.signal_name}: the runs it had started wrote last.pt; run the same kdforge sweep "
            "again to resume them"
        )


def _next_ready(queue: list[PlannedRun], result: SweepResult) -> PlannedRun | None:
    """Pops the first run of ``queue`` whose teacher runs are done (run or skipped as done), marking on the way the
    runs whose teacher failed as failed unlaunched; ``None`` when none can start yet."""
    done = {*result.ran, *result.skipped}
    for run in list(queue):
        if any(key in result.failed for key in run.after):
            queue.remove(run)
            result.failed[run.key] = "not run: a teacher of the sweep failed"
        elif all(key in done for key in run.after):
            queue.remove(run)
            return run
    return None


def parallel_slots(
    gpus: Sequence[str] | None, workers: int | None, cpus: int | None = None, threads: int | None = None
) -> dict[str, dict[str, str]]:
    """The subprocess slots of ``--gpus`` (one per GPU id) or ``--workers N`` (N CPU runs, each with
    ``OMP_NUM_THREADS`` = ``threads``, by default ``cpus // N``, at least 1); ``{}`` for neither (runs in this
    process)."""
    if gpus and workers:
        raise ConfigError("give --gpus or --workers, not both: --gpus already runs one run per GPU at a time")
    if threads is not None and not workers:
        raise ConfigError("--threads sets the threads of each --workers run: give --workers N with it")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if gpus:
        return {f"GPU {g}": {"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus}
    if workers is None:
        return {}
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    # Split evenly by default; --threads when other jobs share the cores (more threads than cores makes OpenMP spin).
    threads = threads or max(1, (cpus or os.cpu_count() or 1) // workers)
    return {f"worker {i}": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for i in range(workers)}


def run_sweep(
    plan: SweepPlan,
    *,
    gpus: Sequence[str] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    launcher: Launcher | None = None,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> SweepResult:
    """Run every unfinished run of ``plan``: teachers and the runs that need none first, then the distillation
    runs; returns what ran, skipped and failed.

    Without ``gpus`` the runs execute one by one in this process; a run that fails with a kdforge error is recorded
    and the sweep goes on. With ``gpus`` they run as subprocesses, one per GPU at a time, with ``workers`` N at a
    time on the CPU, each with ``threads`` threads (``launcher`` starts them; tests inject a fake one). A
    distillation run starts once its own teacher has finished; a run without a teacher (the student alone) may run
    beside a teacher. A failed teacher's distillation runs are recorded as failed without being started.
    """
    slots = parallel_slots(gpus, workers, threads=threads)
    result = SweepResult()
    # Queue order: teachers, then the runs that need none (with one teacher and two workers the second worker would
    # otherwise idle for the whole of the teacher's training), then the distillation runs, each waiting for its
    # teacher.
    independent = [r for r in plan.runs if r.command != "distill"]
    distilled = [r for r in plan.runs if r.command == "distill"]
    todo = []
    for run in [*plan.teachers, *independent, *distilled]:
        if run.state() == "done":
            result.skipped.append(run.key)
        else:
            todo.append(run)
    if slots:
        _schedule(plan, todo, slots, launcher or launch_subprocess, result, log, poll_s)
        return result
    total = len(todo)
    while (run := _next_ready(todo, result)) is not None:  # one after another, teachers first: each is ready in turn
        log(f"[{total - len(todo)}/{total}] {run.state():6s} {run.key}")
        try:
            _run_in_process(run)
        except TrainingInterrupted:
            raise  # SIGTERM/SIGINT stops the whole sweep; the run's last.pt lets the next sweep resume it
        except KDForgeError as err:
            result.failed[run.key] = str(err)
            log(f"FAIL  {run.key}: {err}")
        else:
            result.ran.append(run.key)
    return result


def describe_plan(plan: SweepPlan) -> list[str]:
    """One line per run: state, command and directory (``--dry-run``)."""
    return [f"{run.state():6s} {run.command:7s} {run.out}" for run in plan.all_runs]


def plan_summary(plan: SweepPlan) -> str:
    """``N runs: a done, b to resume, c new``."""
    states = [r.state() for r in plan.all_runs]
    return (
        f"{len(states)} runs: {states.count('done')} done, {states.count('resume')} to resume, "
        f"{states.count('new')} new"
    )
