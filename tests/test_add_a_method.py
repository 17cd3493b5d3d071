"""Adding a method is one method file plus one smoke YAML: a throwaway method, registered in a fresh pytest process
from a file outside the repository, passes every test that is parametrised over the method registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

METHOD_FILE = '''
"""A throwaway method for tests/test_add_a_method.py: KD with a label-smoothed cross-entropy."""

from __future__ import annotations

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("throwaway_kd")
class ThrowawayKD(Method):
    """``L = CE(z_s, y) + w·τ²·KL(p_t ‖ p_s)``, Hinton et al. 2015, for the registry test only."""

    family = "logit"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network (2015)"
    summary = "test-only"
    standard_pairs = False  # no generated pair configs: declared here, nowhere else
    teacher_cacheable = True

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 1.0):
        super().__init__(student, teacher)
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        logits = self.student(batch.input)
        ce = cross_entropy(logits, batch.target)
        kd = self.kd_weight * kd_loss(logits, self.teacher_outputs(batch), self.temperature)
        return StepOutput(ce + kd, {"ce": ce, "kd": kd}, logits)
'''

SMOKE_FILE = """\
model: {name: resnet8}
teacher: {name: resnet8, checkpoint: runs/smoke/vanilla}
method: {name: throwaway_kd, temperature: 4.0, kd_weight: 1.0}
data: {name: embedded, batch_size: 64, train_subset: 512, test_subset: 200, num_workers: 0}
optim: {name: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
schedule: {name: cosine, warmup_epochs: 0.5}
train: {epochs: 2, seed: 0}
"""

# The registry-parametrised tests (every test whose parameters come from METHODS.names()).
REGISTRY_TESTS = ["tests/test_methods.py", "tests/test_checkpoint_roundtrip.py", "tests/test_configs_files.py"]


# heavy (make test-all): a second pytest process collecting the registry-wide files, about a minute on 2 cores
@pytest.mark.heavy
def test_a_throwaway_method_passes_every_registry_parametrised_test(tmp_path):
    (tmp_path / "throwaway_kd.py").write_text(METHOD_FILE)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "throwaway_kd.yaml").write_text(SMOKE_FILE)
    # `-p throwaway_kd` imports the method file before collection, so the registry holds it when the tests are
    # parametrised; `-k` keeps the tests of the throwaway method (and the vanilla teacher run its smoke test needs).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env["KDFORGE_EXTRA_SMOKE_DIRS"] = str(tmp_path / "smoke")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "throwaway_kd", "-p", "no:cacheprovider", "-k", "throwaway_kd"]
    proc = subprocess.run(cmd + REGISTRY_TESTS, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Every registry-parametrised test ran for it (none skipped except the standard pairs it declares it lacks).
    lines = [line for line in out.splitlines() if " passed" in line]
    assert lines, out[-2000:]
    passed = int(lines[-1].split(" passed")[0].split()[-1])
    assert passed >= 6, out[-2000:]
    assert "1 skipped" in lines[-1], lines[-1]  # test_every_method_has_configs_for_the_standard_pairs[throwaway_kd]
