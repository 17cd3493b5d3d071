"""Distributed training with torchrun on the CPU (gloo): two processes against one, every method, resume, faults.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on tests/dist_worker.py or
on ``-m kdforge``, the way users run it, and compares what the ranks wrote with a one-process run made here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kdforge.api import fit
from kdforge.engine.loop import evaluate
from kdforge.methods import METHODS

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"


def torchrun(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return proc, time.perf_counter() - t0


def run_worker(mode: str, out: Path, *args: str) -> None:
    proc, _ = torchrun(str(WORKER), mode, str(out), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(("batch_size", "accum"), [(8, 1), (4, 2)])
def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path, batch_size, accum):
    from dist_worker import OPTIM, TRAIN, make_data, make_method

    run_worker("equal", tmp_path, str(batch_size), str(accum))
    # One process whose batch is the union of both ranks' batches (and of the accumulated micro-batches).
    method = make_method("kd", norm=False)
    data = make_data(0, 1, 2 * batch_size * accum)
    single = fit(method, data, train={**TRAIN, "epochs": 2}, optim=OPTIM, schedule={"name": "cosine"})
    want = method.student.state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")
        # Evaluation sums counts over the two shards of the 37 test images: exact, and the same on both ranks.
        ev = json.loads((tmp_path / f"rank{rank}.json").read_text())
        ref = evaluate(method, data.test)
        assert ev["count"] == 37
        assert ev["top1"] == ref["top1"] and ev["top5"] == ref["top5"]
        assert ev["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_top1"] for m in metrics] == [h["test_top1"] for h in single.history]
    # Logged losses and train accuracy are over both ranks' samples, as the one-process run sees them.
    for m, h in zip(metrics, single.history, strict=True):
        assert m["train_loss"] == pytest.approx(h["train_loss"], rel=1e-5)
        assert m["train_top1"] == pytest.approx(h["train_top1"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    assert not (tmp_path / "run" / "rank1").exists()


def test_rkd_global_batch_relations_match_one_process_on_the_union(tmp_path):
    from dist_worker import OPTIM, TRAIN, DoubleNet, make_data, make_method

    run_worker("rkd_global", tmp_path, "8")
    method = make_method("rkd", norm=False, net=DoubleNet, global_batch=True)  # float64, see DoubleNet
    fit(method, make_data(0, 1, 16), train={**TRAIN, "epochs": 2}, optim=OPTIM, schedule={"name": "cosine"})
    # Relations over the gathered batch, the gradient summed back to each rank's rows and DDP's averaging give the
    # one-process gradient exactly (per-rank relations would end about 1.0 away here).
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in method.student.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=f"rank {rank} {key}")


def test_every_method_keeps_all_ranks_identical(tmp_path):
    names = [n for n in METHODS.names() if {"classification", "*"} & set(METHODS.get(n).tasks)]
    run_worker("methods", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    assert (
        a.pop("sync_bn_error")
        == b.pop("sync_bn_error")
        == ("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernel); set it to false")
    )
    assert sorted(a) == sorted(names)
    for name in names:
        # Parameters by DDP's all-reduce, buffers (BN statistics, CRD banks, DWA state) by the epoch-end broadcast or
        # the method's own all-gathered updates: a rank left out of either would differ here.
        assert a[name] == b[name], name


def test_resume_under_ddp_is_bit_identical(tmp_path):
    run_worker("resume", tmp_path)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in got["straight"].items():
            assert torch.equal(value, got["resumed"][key]), f"rank {rank} {key}"
    # Each rank resumed its own CRD sampling stream: the checkpoint holds every rank's RNG and method state.
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rank_states"]) == 2
    assert not torch.equal(ckpt["rank_states"][0]["extra"]["crd_rng"], ckpt["rank_states"][1]["extra"]["crd_rng"])


def test_a_failing_rank_stops_every_rank_quickly(tmp_path):
    proc, elapsed = torchrun(str(WORKER), "fault", str(tmp_path), timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected fault on rank 1" in output
    # Rank 0 was training (50 epochs ahead of it); it must leave with the peer's failure, not wait for it.
    assert "Connection closed by peer" in output or "exitcode  : -15" in output
    # torchrun names the rank that failed first, not the one that fell over its absence.
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)", output, re.DOTALL)
    assert elapsed < 90, f"took {elapsed:.0f}s"


def test_torchrun_cli_trains_and_both_ranks_refuse_an_existing_run(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "kdforge", "train", "--config", "configs/smoke/vanilla.yaml", "--out", str(out)]
    args += ["data.train_subset=256", "data.test_subset=101", "data.batch_size=32", "train.epochs=1"]
    args += ["train.device=cpu", "train.progress=false"]
    proc, _ = torchrun(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # The saved weights, evaluated by one process on the whole test set, give what the two ranks reported.
    from kdforge.api import evaluate_checkpoint

    assert evaluate_checkpoint(out)["top1"] == pytest.approx(summary["final_top1"])
    before = (out / "summary.json").stat().st_mtime_ns
    proc, _ = torchrun(*args)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"kdforge: error (rank {rank}/2): {out} already holds a run" in proc.stderr
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_torchrun_with_nonfinite_skip_trains(tmp_path):
    # Regression: `torchrun ... train.nonfinite=skip` died on its first step with "'bool' object has no attribute
    # 'all_reduce_sum'" (update_step's `distributed` flag shadowed the module). The skip verdict is agreed over ranks.
    out = tmp_path / "run"
    args = ["-m", "kdforge", "train", "--config", "configs/smoke/vanilla.yaml", "--out", str(out)]
    args += ["data.train_subset=128", "data.test_subset=51", "data.batch_size=32", "train.epochs=1"]
    args += ["train.device=cpu", "train.progress=false", "train.nonfinite=skip"]
    proc, _ = torchrun(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["skipped_steps"] == 0 and record["step"] == 2  # 128 images / (2 ranks x 32)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_a_signal_on_one_rank_stops_all_after_the_same_step_and_resumes_exactly(tmp_path):
    run_worker("stop", tmp_path)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 1 got SIGTERM at its third step; the ranks agree at the next log point (log_every=2) and both stop there.
    assert a["message"].startswith("stopped with the other ranks in epoch 1 after step 4")
    assert b["message"].startswith("stopped by SIGTERM in epoch 1 after step 4")
    ckpt = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2  # the resumed run finished; its metrics hold both epochs once
    lines = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    for got in (a, b):
        assert got["stopped"] == got["straight"]  # bit-identical to the run that was never stopped


def test_two_nodes_through_torchrun_rendezvous(tmp_path):
    # Two torchrun agents on this machine stand in for two nodes of one process each: rank 1 then has LOCAL_RANK 0,
    # and the run must still be written once, by global rank 0, through c10d rendezvous as on a cluster.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "kdforge-test"]
    cmd += ["-m", "kdforge", "train", "--config", "configs/smoke/vanilla.yaml", "--out", str(out)]
    cmd += ["data.train_subset=128", "data.test_subset=51", "data.batch_size=32", "train.epochs=1"]
    cmd += ["train.device=cpu", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert sum(stdout.count("run directory:") for stdout, _ in outputs) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    from kdforge.api import evaluate_checkpoint

    assert evaluate_checkpoint(out)["top1"] == pytest.approx(summary["final_top1"])


def test_segmentation_metrics_are_exact_and_methods_keep_ranks_identical_under_ddp(tmp_path):
    names = [n for n in METHODS.names() if {"segmentation", "*"} & set(METHODS.get(n).tasks)]
    run_worker("segmentation", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # The confusion matrix of each rank's shard, all-reduced, is the one process's: every metric equal exactly.
    assert a["sharded"] == b["sharded"] == a["single"], (a["sharded"], a["single"])
    for name in names:
        assert a[name] == b[name], name


def test_detection_ap_is_exact_and_methods_keep_ranks_identical_under_ddp(tmp_path):
    names = [n for n in METHODS.names() if {"detection", "*"} & set(METHODS.get(n).tasks)]
    run_worker("detection", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 0 gathers both shards' images, orders them by id and scores them: the one process's AP, exactly.
    assert a["sharded"] == a["single"] and a["single"]["AR100"] > 0, (a["sharded"], a["single"])
    assert b["sharded"] == a["sharded"] and b["single"] == a["single"]  # every rank gets rank 0's metrics
    for name in names:
        assert a[name] == b[name], name


def test_enhancement_metrics_match_one_process_and_methods_keep_ranks_identical_under_ddp(tmp_path):
    names = [n for n in METHODS.names() if {"enhancement", "*"} & set(METHODS.get(n).tasks)]
    run_worker("enhancement", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # Per-image PSNR/SSIM sums and the count are all-reduced in float64: the one process's means up to summation
    # order, on every rank, and every image counted once.
    assert a["sharded"] == b["sharded"]
    assert a["sharded"]["num_images"] == a["single"]["num_images"] == 37 + 37 // 2
    for key in ("psnr", "ssim"):
        assert a["sharded"][key] == pytest.approx(a["single"][key], rel=1e-12, abs=1e-12), key
    assert len(names) >= 5
    for name in names:
        assert a[name] == b[name], name


def test_hashing_map_is_exact_and_methods_keep_ranks_identical_under_ddp(tmp_path):
    names = [n for n in METHODS.names() if {"hashing", "*"} & set(METHODS.get(n).tasks)]
    run_worker("hashing", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 0 gathers both shards' query and database codes (the teacher's too), orders them by index and scores
    # them; one sum shares the numbers: the one process's mAPs, exactly, on both ranks.
    assert a["sharded"] == a["single"] and "map_teacher_db" in a["single"], (a["sharded"], a["single"])
    assert b["sharded"] == a["sharded"]
    for name in names:
        assert a[name] == b[name], name


def test_oriented_map_is_exact_and_methods_keep_ranks_identical_under_ddp(tmp_path):
    names = [n for n in METHODS.names() if {"oriented_detection", "*"} & set(METHODS.get(n).tasks)]
    run_worker("oriented", tmp_path, *names)
    a = json.loads((tmp_path / "rank0.json").read_text())
    b = json.loads((tmp_path / "rank1.json").read_text())
    # Counts summed, matched detections gathered to rank 0 and ordered by image id: the one process's mAP, exactly.
    # (an untrained detector, five detections per image: a few still match, so the equality compares real matches)
    assert a["sharded"] == a["single"] and a["single"]["mAP50"] > 0, (a["sharded"], a["single"])
    assert b["sharded"] == a["sharded"] and b["single"] == a["single"]  # every rank gets rank 0's metrics
    for name in names:
        assert a[name] == b[name], name
