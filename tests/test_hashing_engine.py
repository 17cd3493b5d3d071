"""Hashing through the engine: the evaluator's database pass (and the teacher's), the retrieval datasets and their
loaders, the methods brcd / code_kd / contrastive_code_kd against the pure losses, and a short run end to end."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from cases import make_batch, make_method
from PIL import Image

from kdforge.data import build_data
from kdforge.data.hashing import HashingLoader, eval_view
from kdforge.engine.evaluation import evaluate
from kdforge.errors import ConfigError, DataError
from kdforge.losses.hashing import (
    brcd_loss,
    cibhash_loss,
    cluster_bit_mask,
    contrastive_code_kd,
    hash_codes_ste,
    kmeans,
    nearest_center,
)
from kdforge.methods import Progress, create_method
from kdforge.models.dense.hashing import binary_codes
from kdforge.ops.retrieval import evaluate_retrieval, mean_average_precision, precision_recall_by_radius
from kdforge.registry import TASKS
from kdforge.tasks.base import EVALUATED_SPLIT

P = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _task(**kw):
    return TASKS.get("hashing")(bits=16, **kw)


def _images(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    # class-dependent brightness, so an untrained network's codes already carry some label information
    images = (torch.rand(n, 3, size, size, generator=g) * 120 + labels[:, None, None, None] * 40).to(torch.uint8)
    return images, labels


def _loaders(rank: int = 0, world: int = 1, batch: int = 7) -> HashingLoader:
    qi, ql = _images(23, 0)
    di, dl = _images(61, 1)
    common = {"image_size": 16, "rank": rank, "world_size": world}
    database = HashingLoader(di, dl, batch, train=False, **common)
    return HashingLoader(qi, ql, batch, train=False, extra_splits={"database": database}, **common)


def _codes(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return binary_codes(net.eval()(eval_view(images, 16)))


# ---------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_encodes_the_database_and_matches_a_direct_computation():
    task = _task(topk=20)
    torch.manual_seed(0)
    net = task.build_model("hash_resnet8")
    got = evaluate(net, _loaders(), task=task)
    qi, ql = _images(23, 0)
    di, dl = _images(61, 1)
    want = mean_average_precision(_codes(net, qi), _codes(net, di), ql, dl, 20)
    assert got["map"] == pytest.approx(want, abs=1e-12) and got["map@20"] == got["map"]
    assert 0.0 < got["map"] <= 1.0 and "map_teacher_db" not in got  # a bare network has no teacher


def test_task_pr_curve_adds_precision_and_recall_at_every_radius_to_the_evaluation():
    torch.manual_seed(0)
    net = _task().build_model("hash_resnet8")
    plain, got = (
        evaluate(net, _loaders(), task=_task(topk=20)),
        evaluate(net, _loaders(), task=_task(topk=20, pr_curve=True)),
    )
    assert not any(k.startswith("pr_") for k in plain) and got["map"] == plain["map"]
    qi, ql = _images(23, 0)
    di, dl = _images(61, 1)
    precision, recall = precision_recall_by_radius(evaluate_retrieval(_codes(net, qi), _codes(net, di), ql, dl, 20))
    assert len(precision) == 17  # radii 0..16 of 16-bit codes
    for r in range(17):
        assert got[f"pr_recall@{r}"] == pytest.approx(float(recall[r]), abs=1e-12)
        p = float(precision[r])
        assert (math.isnan(got[f"pr_precision@{r}"]) and math.isnan(p)) or got[f"pr_precision@{r}"] == pytest.approx(p)
    assert got["pr_recall@16"] == pytest.approx(1.0)  # radius b retrieves the whole database


def test_a_method_with_a_teacher_also_reports_student_queries_against_the_teacher_database():
    task = _task(topk=None)
    torch.manual_seed(0)
    student, teacher = task.build_model("hash_resnet8"), task.build_model("hash_resnet14", hidden=8)
    method = create_method("code_kd", student, teacher, task=task)
    got = evaluate(method, _loaders(), task=task)
    qi, ql = _images(23, 0)
    di, dl = _images(61, 1)
    s_q, s_d, t_d = _codes(student, qi), _codes(student, di), _codes(teacher, di)
    assert got["map"] == pytest.approx(mean_average_precision(s_q, s_d, ql, dl), abs=1e-12)
    assert got["map_teacher_db"] == pytest.approx(mean_average_precision(s_q, t_d, ql, dl), abs=1e-12)
    assert got["map_teacher_db"] != got["map"]
    off = evaluate(method, _loaders(), task=_task(topk=None, teacher_database=False))
    assert "map_teacher_db" not in off and off["map"] == got["map"]


def test_two_ranks_of_the_loaders_with_a_summing_reducer_equal_one_process():
    """Every rank encodes its shard of queries and database (rank r takes r, r + 2, ...); gathered to rank 0,
    ordered by index, scored there and summed back, both ranks hold the one-process metrics exactly."""
    task = _task(topk=15)
    torch.manual_seed(0)
    net = task.build_model("hash_resnet8").eval()
    single = evaluate(net, _loaders(), task=task)
    evaluators = [task.evaluator(), task.evaluator()]
    for rank, ev in enumerate(evaluators):
        queries = _loaders(rank, 2, batch=4)
        for split, loader in ((EVALUATED_SPLIT, queries), ("database", queries.extra_splits["database"])):
            for batch in loader:
                with torch.no_grad():
                    ev.update_batch(task.predict(net(batch.input)), batch, split)
    states = {}

    class Rank:
        def __init__(self, r):
            self.r = r

        def gather(self, obj):
            states[self.r] = obj
            return [states[0], states[1]] if self.r == 0 else None

        def sum(self, t):
            sums[self.r] = t
            return t

    sums = {}
    other = evaluators[1].compute(Rank(1))  # rank 1 first: its state is in place when rank 0 gathers
    mine = evaluators[0].compute(Rank(0))
    assert mine == single
    assert set(other) == set(single) and all(v == 0.0 for v in other.values())  # its share of the sum: zeros
    assert {k: mine[k] + other[k] for k in mine} == single


def test_an_evaluator_that_needs_a_database_says_so_on_a_loader_without_one():
    task = _task()
    qi, ql = _images(8, 0)
    with pytest.raises(ConfigError, match="database"):
        evaluate(task.build_model("hash_resnet8"), HashingLoader(qi, ql, 4, train=False, image_size=16), task=task)


def test_the_default_update_batch_is_update_with_task_targets_and_one_split_only():
    ev = TASKS.get("classification")(num_classes=4).evaluator()
    batch = make_batch(make_method("vanilla"), "classification")
    logits = torch.randn(len(batch), 4, generator=torch.Generator().manual_seed(0))
    ref = TASKS.get("classification")(num_classes=4).evaluator()
    ref.update(logits, batch.task_targets)
    ev.update_batch(logits, batch)
    assert ev.compute() == ref.compute()
    with pytest.raises(ValueError, match="database"):
        ev.update_batch(logits, batch, "database")


# ---------------------------------------------------------------------------------------------------- data


def test_training_batches_hold_two_views_on_channels_and_redraw_on_resume():
    images, labels = _images(40, 2)
    loader = HashingLoader(images, labels, 8, train=True, image_size=16, seed=3)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    b = batches[2]
    assert b.input.shape == (8, 6, 16, 16) and torch.equal(b.targets, labels[b.index])
    assert not torch.equal(b.input[:, :3], b.input[:, 3:])  # two different augmentations
    loader.set_epoch(1, start_batch=2)
    again = next(iter(loader))
    assert torch.equal(again.input, b.input) and torch.equal(again.index, b.index)
    plain = HashingLoader(images, labels, 8, train=True, image_size=16, seed=3, augment=False)
    p = next(iter(plain))
    assert torch.equal(p.input[:, :3], p.input[:, 3:])
    assert torch.equal(p.input[:, :3], eval_view(images[p.index], 16))


def test_evaluation_shards_show_every_image_once():
    seen = torch.cat([b.index for r in range(3) for b in _loaders(r, 3, batch=4)])
    assert sorted(seen.tolist()) == list(range(23))


@pytest.mark.slow
def test_cifar10_hash_protocol_on_the_embedded_subset():
    data = build_data("cifar10_hash", batch_size=16, eval_batch_size=64, train_subset=600, test_subset=100)
    db = data.test.extra_splits["database"]
    assert db.num_samples == 600 and data.num_train == 600  # 60 per class < 500: the whole (sub)set trains
    assert data.test.num_samples == 100 and torch.bincount(data.test.labels).tolist() == [10] * 10
    assert next(iter(data.train)).input.shape == (16, 6, 32, 32)
    full = build_data("cifar10_hash")
    assert (full.num_train, full.test.num_samples, full.test.extra_splits["database"].num_samples) == (
        5000,
        1000,
        10000,
    )
    assert torch.bincount(full.train.labels).tolist() == [500] * 10
    sup = build_data("cifar10_hash_sup", train_subset=200, test_subset=50)
    assert (sup.num_train, sup.test.num_samples, sup.test.extra_splits["database"].num_samples) == (200, 50, 11950)


def _write_lists(root, n_db: int = 5):
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    (root / "train.txt").write_text("".join(f"im{i}.png 1 0 1\n" for i in range(4)))
    (root / "test.txt").write_text("im4.png 0 1 0\nim5.png 1 0 0\n")
    (root / "database.txt").write_text("".join(f"im{6 + i}.png {i % 2} 1 0\n" for i in range(n_db)))


def test_hash_list_dataset_reads_multi_hot_lists(tmp_path):
    _write_lists(tmp_path)
    data = build_data("hash_list", root=str(tmp_path), batch_size=2, eval_batch_size=4, image_size=16)
    assert data.num_classes == 3 and data.num_train == 4
    b = next(iter(data.test))
    assert b.input.shape == (2, 3, 16, 16) and b.targets.shape == (2, 3)
    task = _task(topk=None)
    result = evaluate(task.build_model("hash_resnet8"), data.test, task=task)
    assert 0.0 <= result["map"] <= 1.0
    (tmp_path / "database.txt").write_text("im6.png 0 1 0\nmissing.png 1 0 0\n")
    with pytest.raises(DataError, match="missing.png"):
        build_data("hash_list", root=str(tmp_path), image_size=16)
    with pytest.raises(DataError, match="data.root"):
        build_data("hash_list")


# ---------------------------------------------------------------------------------------------------- methods


def _outputs(method, batch):
    method.eval()  # fixed BN statistics, so the recomputation below sees the same outputs
    out = method(batch, P)
    with torch.no_grad():
        h_i, h_j = method.task.train_outputs(method.student, batch.input)
        t_i, t_j = (binary_codes(t) for t in method.task.train_outputs(method.teacher, batch.input))
    return out, h_i, h_j, t_i, t_j


@pytest.mark.parametrize(("kind", "relaxation"), [("mse", "ste"), ("cosine", "tanh")])
def test_code_kd_is_cibhash_plus_the_code_matching_loss_of_both_views(kind, relaxation):
    method = make_method("code_kd", "hashing", kind=kind, relaxation=relaxation, kd_weight=0.5)
    out, h_i, h_j, t_i, t_j = _outputs(method, make_batch(method, "hashing"))
    base = cibhash_loss(h_i, h_j)
    torch.testing.assert_close(out.losses["contrastive"], base["contrastive"])
    torch.testing.assert_close(out.losses["kl"], base["kl"])

    def codes(h):
        p = 1 / (1 + np.exp(-h.double().numpy()))
        return np.sign(p - 0.5) if relaxation == "ste" else 2 * p - 1

    def dist(s, t):
        t = t.double().numpy()
        if kind == "mse":
            return ((s - t) ** 2).mean()
        return (1 - (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))).mean()

    want = 0.5 * (dist(codes(h_i), t_i) + dist(codes(h_j), t_j)) / 2
    assert float(out.losses["code_kd"]) == pytest.approx(want, rel=1e-5)


def test_contrastive_code_kd_is_the_infonce_of_both_views():
    method = make_method("contrastive_code_kd", "hashing", temperature=0.5, symmetric=False)
    out, h_i, h_j, t_i, t_j = _outputs(method, make_batch(method, "hashing"))
    want = 0.0
    for h, t in ((h_i, t_i), (h_j, t_j)):
        s = np.sign(1 / (1 + np.exp(-h.double().numpy())) - 0.5)
        tt = t.double().numpy()
        logits = (s / np.linalg.norm(s, axis=1, keepdims=True)) @ (tt / np.linalg.norm(tt, axis=1, keepdims=True)).T
        logits = logits / 0.5
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        want += -np.mean(np.diag(logp)) / 2
    assert float(out.losses["contrastive_kd"]) == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(
        out.losses["contrastive_kd"],
        (
            contrastive_code_kd(hash_codes_ste(h_i)[1], t_i, 0.5, False)
            + contrastive_code_kd(hash_codes_ste(h_j)[1], t_j, 0.5, False)
        )
        / 2,
    )


def _brcd(**params):
    return make_method("brcd", "hashing", num_clusters=3, n_init=2, **params)


def test_brcd_before_clustering_records_teacher_codes_and_uses_the_plain_contrastive_term():
    method = _brcd()
    batch = make_batch(method, "hashing")
    out, h_i, _h_j, t_i, t_j = _outputs(method, batch)
    want = brcd_loss(hash_codes_ste(h_i)[1], t_i, t_j, false_negatives=False, false_positives=False)
    torch.testing.assert_close(out.losses["brcd"], want)
    assert set(out.losses) == {"contrastive", "kl", "brcd"}
    assert torch.equal(method.recorded_codes[batch.index], t_i)
    assert not method.clustered


def _fill_and_cluster(method):
    """Recorded teacher codes for training indices 0..59 (three noisy prototypes), 60..63 never recorded."""
    g = torch.Generator().manual_seed(0)
    protos = torch.where(torch.rand(3, 16, generator=g) < 0.5, -1.0, 1.0)
    flip = torch.where(torch.rand(60, 16, generator=g) < 0.1, -1.0, 1.0)
    method.recorded_codes[:60] = protos[torch.arange(60) % 3] * flip
    method.on_epoch_start(0)
    assert not method.clustered  # cluster_epochs = 1: epoch 0 only records
    method.on_epoch_start(1)
    assert method.clustered
    assert (method.assign[:60] >= 0).all() and (method.assign[60:] == -1).all()


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"use_mask": False},
        {"false_positives": False},
        {"false_negatives": False, "false_positives": False},
        {"reference_all_zero_mask": True},
        {"aug_cluster_from_masked": True, "alpha": 0.5},
    ],
)
def test_brcd_after_clustering_is_brcd_loss_with_kmeans_clusters_and_the_mask(switches):
    method = _brcd(**switches)
    _fill_and_cluster(method)
    seen = method.recorded_codes.abs().sum(1) > 0
    codes = torch.sign(method.recorded_codes[seen])
    res = kmeans(codes, 3, seed=0, n_init=2)
    mask = cluster_bit_mask(codes, res.assign, 3, 0.5, reference_bug=switches.get("reference_all_zero_mask", False))
    assert torch.equal(method.assign[seen], res.assign) and torch.equal(method.centers[:3], res.centers)
    assert torch.equal(method.mask[:3], mask)
    if switches.get("reference_all_zero_mask"):
        assert not mask.any()
    batch = make_batch(method, "hashing", seed=5)  # indices recorded above
    out, h_i, _h_j, t_i, t_j = _outputs(method, batch)
    cluster = method.assign[batch.index]
    assert (cluster >= 0).all()
    use_mask = switches.get("use_mask", True)
    rows = mask[cluster] if use_mask else None
    fp = switches.get("false_positives", True)
    aug = None
    if fp:
        t_assign = t_j * rows if switches.get("aug_cluster_from_masked") and rows is not None else t_j
        aug = nearest_center(t_assign, res.centers)
    want = brcd_loss(
        hash_codes_ste(h_i)[1], t_i, t_j, cluster=cluster, aug_cluster=aug, mask_rows=rows,
        alpha=switches.get("alpha", 0.8), false_negatives=switches.get("false_negatives", True), false_positives=fp,
    )  # fmt: skip
    torch.testing.assert_close(out.losses["brcd"], want)


def test_brcd_state_survives_a_state_dict_round_trip_and_ablation_switches_reach_the_loss():
    method = _brcd()
    _fill_and_cluster(method)
    fresh = _brcd()
    fresh.load_state_dict(copy.deepcopy(method.state_dict()))
    assert fresh.clustered and int(fresh.k) == 3
    batch = make_batch(method, "hashing", seed=6)
    torch.testing.assert_close(_outputs(fresh, batch)[0].loss, _outputs(method, batch)[0].loss)
    off = _brcd(task_loss=False, brcd_weight=2.0)
    out = _outputs(off, batch)[0]
    assert set(out.losses) == {"brcd"}


def test_brcd_rejects_a_run_too_short_to_cluster_and_a_non_hashing_task():
    with pytest.raises(ConfigError, match="cluster_epochs"):
        make_method("brcd", "hashing", cluster_epochs=2)  # the test context has 2 epochs
    with pytest.raises(ConfigError, match="hashing"):
        make_method("brcd", "classification")


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_short_distillation_run_reports_both_maps_and_kdforge_eval_prints_map(tmp_path, capsys):
    from kdforge.api import run
    from kdforge.config import config_from_dict

    data = {"name": "cifar10_hash", "batch_size": 32, "eval_batch_size": 128, "train_subset": 96, "test_subset": 20}
    train = {"epochs": 2, "progress": False, "seed": 0, "device": "cpu"}
    task = {"name": "hashing", "bits": 16, "topk": 50, "pr_curve": True}
    common = {"task": task, "data": data, "train": train}
    teacher = run(
        config_from_dict({**common, "model": {"name": "hash_resnet8"}, "method": {"name": "vanilla"}}),
        "train",
        tmp_path / "t",
    )
    assert 0 < teacher.history[-1]["test_map"] <= 1
    cfg = {
        **common,
        "model": {"name": "hash_resnet8"},
        "teacher": {"name": "hash_resnet8", "checkpoint": str(tmp_path / "t")},
        "method": {"name": "brcd", "num_clusters": 4, "n_init": 2},
    }
    result = run(config_from_dict(cfg), "distill", tmp_path / "s")
    last = result.history[-1]
    assert 0 < last["test_map"] <= 1 and 0 < last["test_map_teacher_db"] <= 1
    assert last["test_pr_recall@16"] == pytest.approx(1.0)  # task.pr_curve: radius b retrieves everything
    # summary.json keeps the teacher-database mAP of a distillation run; a run without a teacher has none, and the
    # report's table shows it in a column of its own, "—" where a row has none
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["final_map_teacher_db"] == last["test_map_teacher_db"]
    assert "final_map_teacher_db" not in json.loads((tmp_path / "t" / "summary.json").read_text())
    from kdforge.report.table import build_groups, markdown_table, scan_runs

    (group,) = build_groups(scan_runs(tmp_path))
    header, _, teacher_row, brcd_row = markdown_table(group).splitlines()
    assert "| final map | final map_teacher_db |" in header
    assert teacher_row.split(" | ")[5] == "—" and brcd_row.split(" | ")[5] == f"{last['test_map_teacher_db']:.4f}"
    from kdforge.engine.checkpoint import load_checkpoint

    assert int(load_checkpoint(tmp_path / "s" / "last.pt")["method"]["k"]) == 4  # clustered at epoch 2's start
    from kdforge.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "s"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["map"] == pytest.approx(last["test_map"])  # student.pt holds the last epoch's weights
    assert printed["pr_precision@0"] == pytest.approx(last["test_pr_precision@0"], nan_ok=True)
    assert (
        main(
            ["eval", "--checkpoint", str(tmp_path / "s"), "--pictures", "3", "--pictures-out", str(tmp_path / "r.png")]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "map" in table and "pr_recall" not in table  # 2 x 17 curve points stay in --json
    assert Image.open(tmp_path / "r.png").size[1] > 3 * 32  # three query rows
    (tmp_path / "pics").mkdir()  # a folder holds the picture under its usual name
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "s"), "--pictures", "1", "--pictures-out", str(tmp_path / "pics")])
        == 0
    )
    assert Image.open(tmp_path / "pics" / "retrieval.png").size[1] < Image.open(tmp_path / "r.png").size[1]  # 1 row


def test_export_writes_an_encoder_that_emits_the_binary_codes(tmp_path):
    from kdforge.export import export_student

    task = _task()
    torch.manual_seed(0)
    net = task.build_model("hash_resnet8").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    overrides = {
        "task": {"name": "hashing", "bits": 16},
        "model": {"name": "hash_resnet8"},
        "data": {"name": "cifar10_hash"},
    }
    result = export_student(
        tmp_path / "model.pt", tmp_path / "export", formats="torchscript", overrides=overrides, profile=False
    )
    assert result.checks[0]["status"] == "ok", result.checks
    scripted = torch.jit.load(str(result.files["torchscript"]))
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = scripted(x)
        want = task.predict(net(x))
    assert codes.shape == (5, 16) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes, want)
