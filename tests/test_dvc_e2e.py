"""The real `dvc repro` end to end, in a temporary git repository, on synthetic data at the
`ci` budget (evaluating 8 images rather than 32) over the whole grid (2 datasets x 3 archs x
5 optimizers: the four built-ins and `torch.optim:RAdam` named by import path; SGD and VSGD
tuned over their lr grids, SGD's with a value that diverges; Adam, AdamW and RAdam pinned):

1. the first `dvc repro` prepares, tunes (30 grid points, validation only, the diverging
   points recorded as diverged and never chosen), trains all 30 runs with the chosen values
   and writes tables and figures, RAdam in every one, its MLflow runs naming its class and
   torch's version;
2. a second `dvc repro` trains nothing;
3. changing one optimizer's lr retrains exactly that optimizer's runs; changing it back
   trains nothing (the earlier results are reused from the store), and editing a bookkeeping
   key (`training.log_every`) trains nothing;
4. a broken params.yaml fails with every problem listed, no traceback, nothing started;
5. Ctrl-C in the middle of training keeps the finished runs; the next `dvc repro` trains the
   rest only.

The lr-change, bookkeeping-key, grid-change and Ctrl-C scenarios are `extended`
(VSGD_EXTENDED=1): the default suite covers their paths with smaller tests (tests/test_grid.py,
test_results.py's reuse from the store, test_tune.py, test_interrupt.py's real `dvc repro`
killed mid-training).
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# What the pipeline needs from the project; everything else stays out of the sandbox.
PROJECT_FILES = [
    "vsgd",
    "pipeline",
    "params.yaml",
    "dvc.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
]
# Both datasets; the architectures are ConvMixer alone by default (the slowest ones would
# triple the suite's time; every architecture trains in tests/test_trainer.py). The whole
# grid: VSGD_E2E_ARCHS=vgg,convmixer,resnext.
ARCHS = os.environ.get("VSGD_E2E_ARCHS", "convmixer").split(",")
CELLS = 2 * len(ARCHS)  # runs per optimizer
OPTIMIZERS = 5  # sgd, adam, adamw, vsgd and the imported RAdam
GRID = OPTIMIZERS * CELLS
# An optimizer of another package (here torch itself: no new dependency), by import path.
RADAM = (
    '  radam: {class: "torch.optim:RAdam", lr: 0.001, betas: [0.9, 0.999], eps: 1.0e-8,\n'
    "          weight_decay: 0.0}"
)
TUNING = 5 * CELLS  # SGD: 3 lrs per cell, VSGD: 2
# An lr just below float32's largest value: the first update sends the linear head's weights
# to ~1e37, so the logits of step 2 overflow and its loss is not finite.
DIVERGING = "3.0e+38"
STAGE_TIMEOUT = 240

pytestmark = pytest.mark.slow


def sh(repo, *cmd, check=True, timeout=STAGE_TIMEOUT):
    proc = subprocess.run(
        cmd, cwd=repo, capture_output=True, text=True, timeout=timeout, env=_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        OMP_NUM_THREADS="1",
        # the stages call `python` and `dvc`: this interpreter's environment
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def set_param(repo, pattern, replacement):
    path = repo / "params.yaml"
    text, n = re.subn(pattern, replacement, path.read_text(), count=1, flags=re.M)
    assert n == 1, f"{pattern!r} not found in params.yaml"
    path.write_text(text)


def started(output):
    return sorted(set(re.findall(r"^\[([^\]]+)\] start$", output, flags=re.M)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    set_param(repo, r"^preset: null", "preset: ci")
    set_param(repo, r"^archs: \[vgg, convmixer, resnext\]", f"archs: [{', '.join(ARCHS)}]")
    set_param(
        repo,
        r"^optimizers: \[sgd, adam, adamw, vsgd\]",
        "optimizers: [sgd, adam, adamw, vsgd, radam]",
    )
    set_param(repo, r"^optimizer:$", "optimizer:\n" + RADAM)
    set_param(
        repo,
        r"^      sgd: \{grid: \{lr: \[0\.05, 0\.1\]\}\}",
        f"      sgd: {{grid: {{lr: [0.05, 0.1, {DIVERGING}]}}}}",
    )
    # Evaluations of 8 images instead of the ci preset's 32 (test set and tuning validation
    # split): nothing asserted here depends on their size, and 32 Tiny ImageNet images cost a
    # ConvMixer about 1.2 s of one core per evaluation, two per run.
    set_param(
        repo,
        r"^               test_limit: 32, eval_batch_size: 32,",
        "               test_limit: 8, eval_batch_size: 32,",
    )
    set_param(
        repo,
        r"^    tune: \{budget: 1\.0, validation_size: 32\}",
        "    tune: {budget: 1.0, validation_size: 8}",
    )
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "sandbox")
    return repo


@pytest.fixture(scope="module")
def first(repo):
    return sh(repo, "dvc", "repro", timeout=2 * STAGE_TIMEOUT)


def test_first_repro_trains_the_whole_grid(repo, first):
    out = first.stdout
    assert f"tune: {TUNING} runs in the grid, 0 done, 0 reused, {TUNING} to run" in out, out[-3000:]
    assert f"train: {GRID} runs in the grid, 0 done, 0 reused, {GRID} to run" in out, out[-3000:]
    assert len(started(out)) == GRID + TUNING
    runs = sorted(p.parent.name for p in (repo / "results" / "runs").glob("*/metrics.json"))
    assert len(runs) == GRID


def test_tuning_chose_on_validation_and_never_a_diverged_lr(repo, first):
    selected = yaml.safe_load((repo / "results/tuning/selected.yaml").read_text())
    rows = list(csv.DictReader((repo / "results/tuning/tuning.csv").open()))
    assert len(rows) == TUNING
    for r in rows:
        chosen = selected[r["dataset"]][r["arch"]][r["optimizer"]]
        assert (r["chosen"] == "True") == (chosen == {"lr": float(r["lr"])}), r
        if float(r["lr"]) > 1e30:
            assert r["diverged"] == "True" and r["chosen"] == "False", r
    for ds in ("cifar100", "tinyimagenet"):
        for arch in ARCHS:
            assert set(selected[ds][arch]) == {"sgd", "vsgd"}  # Adam, AdamW pinned
            assert selected[ds][arch]["sgd"]["lr"] in (0.05, 0.1)
    # No tuning run ever evaluated the test set: nothing there to choose by.
    tuning = [
        json.loads(p.read_text())
        for p in (repo / "results/store").glob("*/metrics.json")
        if json.loads(p.read_text())["name"].startswith("tune-")
    ]
    assert len(tuning) == TUNING
    for m in tuning:
        assert m["test_acc"] is None and m["test_loss"] is None, m
        assert (m["diverged"] is not None) == (m["lr"] > 1e30), m
        if m["diverged"]:
            assert m["diverged"]["step"] == 2 and m["steps_done"] == 2, m
        else:
            assert m["val_acc"] is not None
    # The chosen values are the ones the final runs trained.
    for p in (repo / "results/runs").glob("*/metrics.json"):
        m = json.loads(p.read_text())
        if m["optimizer"] in ("sgd", "vsgd"):
            assert m["lr"] == selected[m["dataset"]][m["arch_key"]][m["optimizer"]]["lr"]
    for ext in ("png", "svg"):
        assert (repo / "results/figures" / f"sensitivity.{ext}").stat().st_size > 10_000


def test_tables_and_figure_contain_every_cell(repo, first):
    table1 = (repo / "results" / "tables" / "table1.md").read_text()
    rows = [
        line
        for line in table1.splitlines()
        if line.startswith(("| CIFAR-100 |", "| Tiny ImageNet |"))
    ][:CELLS]
    assert len(rows) == CELLS
    for row in rows:
        assert row.count("(n=1)") == OPTIMIZERS, row  # one seed in every optimizer's cell
    assert len(list(csv.DictReader((repo / "results/tables/table1.csv").open()))) == GRID
    table2 = (repo / "results" / "tables" / "table2.md").read_text()
    # (a) ratios to SGD and (b) seconds per step from the timing stage, (c) the runs' own
    rows2 = [
        line
        for line in table2.splitlines()
        if line.startswith(("| CIFAR-100 |", "| Tiny ImageNet |"))
    ]
    assert len(rows2) == 3 * CELLS and not any("–" in row for row in rows2), table2
    timed = list(csv.DictReader((repo / "results/timing/timing.csv").open()))
    assert len(timed) == GRID and len({(r["device"], r["device_name"]) for r in timed}) == 1
    assert all(float(r["ratio_to_sgd"]) == 1.0 for r in timed if r["optimizer"] == "sgd")
    # VSGD's beta1.csv travelled from every VSGD run into its cell's curve and the figure
    assert len(list((repo / "results/beta1").glob("*.csv"))) == CELLS
    for name in (
        "figures/test_acc.png",
        "figures/test_acc.svg",
        "figures/beta1.png",
        "figures/beta1.svg",
        "summary.json",
        "tables/table1.tex",
        "tables/table2.csv",
    ):
        assert (repo / "results" / name).stat().st_size > 0, name
    exported = list(csv.DictReader((repo / "results" / "mlflow_runs.csv").open()))
    assert len(exported) == GRID + TUNING  # the tuning runs are tracked too
    shown = sh(repo, "dvc", "metrics", "show").stdout
    assert "results/summary.json" in shown and "results/runs.json" in shown


def test_the_imported_optimizer_is_in_every_table_and_tracked_with_its_package(repo, first):
    import importlib.metadata

    from mlflow.tracking import MlflowClient

    tables = repo / "results" / "tables"
    header = next(
        line
        for line in (tables / "table1.md").read_text().splitlines()
        if line.startswith("| dataset")
    )
    assert "radam" in header, header  # its own column, next to the built-ins
    for name in ("table1.csv", "table2.csv", "differences.csv", "standing.csv"):
        rows = list(csv.DictReader((tables / name).open()))
        assert any("radam" in json.dumps(row).lower() for row in rows), name
    # its curves reach the figure's data, one per cell
    assert len(list((repo / "results" / "curves").glob("*_radam.csv"))) == CELLS
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "vsgd-repro"]
    runs = client.search_runs([experiment.experiment_id], "params.`optimizer.name` = 'radam'")
    assert len(runs) == CELLS
    torch_version = importlib.metadata.version("torch")
    for run in runs:
        assert run.data.params["optimizer.class"] == "torch.optim:RAdam"
        assert run.data.params["optimizer.package"] == f"torch=={torch_version}"


def test_second_repro_trains_nothing(repo, first):
    before = {p: p.stat().st_mtime_ns for p in (repo / "results/runs").glob("*/metrics.json")}
    out = sh(repo, "dvc", "repro").stdout
    assert started(out) == []  # not even the diverged tuning runs are retried
    assert "train: " not in out and "tune: " not in out  # the stages did not even run
    after = {p: p.stat().st_mtime_ns for p in (repo / "results/runs").glob("*/metrics.json")}
    assert after == before


@pytest.mark.extended
def test_lr_change_retrains_only_that_optimizer(repo, first):
    set_param(repo, r"^  adam: \{lr: 0\.001", "  adam: {lr: 0.002")
    out = sh(repo, "dvc", "repro").stdout
    assert (
        f"train: {GRID} runs in the grid, {GRID - CELLS} done, 0 reused, {CELLS} to run; "
        f"{CELLS} left "
        "the grid (results kept in results/store" in out
    ), out[-3000:]
    retrained = started(out)
    assert len(retrained) == CELLS and all("-adam-" in name for name in retrained), retrained
    runs = list((repo / "results" / "runs").iterdir())
    assert len(runs) == GRID
    assert len(list((repo / "results" / "store").glob("*/metrics.json"))) == GRID + CELLS + TUNING


@pytest.mark.extended
def test_lr_changed_back_trains_nothing(repo, first):
    """The grid comes back to results it had: they are reused from the store, not retrained,
    and the view shows exactly the grid again."""
    set_param(repo, r"^  adam: \{lr: 0\.002", "  adam: {lr: 0.001")
    out = sh(repo, "dvc", "repro").stdout
    assert started(out) == [], out[-3000:]
    assert (
        f"train: {GRID} runs in the grid, {GRID - CELLS} done, {CELLS} reused, 0 to run; "
        f"{CELLS} left "
        "the grid" in out
    ), out[-3000:]
    shown = {p.parent.name for p in (repo / "results/runs").glob("*/metrics.json")}
    grid = set(
        re.findall(
            r"^  ((?!tune-)\S+)$",
            sh(repo, sys.executable, "-m", "pipeline", "validate").stdout,
            flags=re.M,
        )
    )
    assert shown == grid and len(grid) == GRID


@pytest.mark.extended
def test_editing_a_bookkeeping_key_trains_nothing(repo, first):
    set_param(
        repo,
        r"^    training: \{eval_every: 2, checkpoint_every: 2, log_every: 1,",
        "    training: {eval_every: 2, checkpoint_every: 2, log_every: 2,",
    )
    out = sh(repo, "dvc", "repro").stdout
    assert started(out) == [], out[-3000:]
    assert f"train: {GRID} runs in the grid, {GRID} done, 0 reused, 0 to run" in out, out[-3000:]


@pytest.mark.extended
def test_changing_one_optimizers_grid_retunes_and_retrains_only_it(repo, first):
    before = yaml.safe_load((repo / "results/tuning/selected.yaml").read_text())
    set_param(
        repo,
        r"^      vsgd: \{grid: \{lr: \[0\.05, 0\.1\]\}\}",
        "      vsgd: {grid: {lr: [0.05, 0.2]}}",
    )
    out = sh(repo, "dvc", "repro").stdout
    assert (
        f"tune: {TUNING} runs in the grid, {TUNING - CELLS} done, 0 reused, {CELLS} to run" in out
    ), out[-3000:]
    names = started(out)
    tuned = [n for n in names if n.startswith("tune-")]
    assert len(tuned) == CELLS and all("-vsgd-lr0.2-" in n for n in tuned), names
    assert all("-vsgd-" in n for n in names), names  # retrained: VSGD cells whose lr changed
    selected = yaml.safe_load((repo / "results/tuning/selected.yaml").read_text())
    changed = sum(
        selected[ds][arch]["vsgd"] != before[ds][arch]["vsgd"]
        for ds in selected
        for arch in selected[ds]
    )
    assert len(names) - len(tuned) == changed  # the cells whose choice moved, only
    assert all(
        selected[ds][arch]["sgd"] == before[ds][arch]["sgd"]
        for ds in selected
        for arch in selected[ds]
    )


def test_bad_params_fail_with_every_problem_listed(repo, first):
    good = (repo / "params.yaml").read_text()
    try:
        set_param(repo, r"^    tau1: 0\.81|tau1: 0\.81", "tau1: 1.5")
        set_param(repo, r"^archs: \[", "archs: [convmixr, ")
        set_param(repo, r"^  eval_every: 500", "  eval_evry: 500")
        proc = sh(repo, "dvc", "repro", check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "invalid configuration" in text
        assert "optimizer.vsgd.tau1: 1.5 is outside (0.5, 1]" in text
        assert "archs[0]: convmixr is not allowed (did you mean 'convmixer'?)" in text
        assert "training.eval_evry: unknown key (did you mean 'eval_every'?)" in text
        assert "Traceback" not in text
        assert started(text) == []
        direct = sh(repo, sys.executable, "-m", "pipeline", "validate", check=False)
        assert direct.returncode == 78 and "Traceback" not in direct.stderr
    finally:
        (repo / "params.yaml").write_text(good)


@pytest.mark.extended
def test_interrupted_repro_keeps_finished_runs_and_completes(repo, first):
    """Ctrl-C in the middle of the train stage, then `dvc repro` again: the runs finished
    before the Ctrl-C are kept, the next repro trains only the others and a run interrupted
    after a checkpoint resumes from it."""
    set_param(repo, r"^  adam: \{lr: 0\.001,", "  adam: {lr: 0.0005,")
    # Longer CIFAR-100 Adam runs (checkpoint every 2 iterations at the ci budget), so a run
    # is reliably caught between a checkpoint and its end. (Adam is pinned at the ci budget:
    # its lr in params.yaml is the one its runs train.)
    iterations = 60  # long enough that the Tiny ImageNet run ends while it is midway
    set_param(
        repo,
        r"^experiments: \[\]",
        f"experiments: [{{match: {{dataset: cifar100, optimizer: adam}}, "
        f"schedule: {{iterations: {iterations}, step_size: 20}}}}]",
    )
    log = repo / "interrupted.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )

    def ready(text):
        """A run has finished, and another one is now past its step-2 checkpoint (written
        before step 3 is logged) with at least 6 steps to go."""
        done = re.search(r"^\[[^\]]+\] done$", text, flags=re.M)
        last = dict(re.findall(rf"^\[([^\]]+)\] step (\d+)/{iterations} ", text, flags=re.M))
        return done and any(3 <= int(step) <= iterations - 6 for step in last.values())

    try:
        deadline = time.monotonic() + STAGE_TIMEOUT
        while not ready(log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    # What is on disk decides: a run can be stopped by the Ctrl-C while exiting, after its
    # result was written (then the executor reports it killed, yet it is done).
    specs = {
        spec["name"]: (path.parent, spec)
        for path in (repo / "results/store").glob("*/spec.json")
        for spec in [json.loads(path.read_text())]
    }
    sgd = {
        name: entry
        for name, entry in specs.items()
        if "-adam-" in name and entry[1]["optimizer"]["lr"] == 0.0005
    }
    assert len(sgd) == CELLS
    finished = {name for name, (d, _) in sgd.items() if (d / "metrics.json").exists()}
    reported = set(re.findall(r"^\[([^\]]+)\] done$", text, flags=re.M))
    assert reported <= finished and 0 < len(finished) < CELLS, text[-3000:]
    assert "] FAILED" not in text, text[-3000:]  # stopped runs are not reported as failed
    assert f"train: interrupted; {len(finished)} of {CELLS} runs finished and kept" in text, text[
        -3000:
    ]
    shown = {p.name for p in (repo / "results/runs").iterdir() if "-adam-" in p.name}
    assert shown == finished  # the view shows what finished, nothing half-done
    checkpointed = {
        name
        for name in sgd.keys() - finished
        if (repo / sgd[name][1]["checkpoint"] / "checkpoint.pt").exists()
    }
    assert checkpointed, text[-3000:]  # the run caught midway

    again = sh(repo, "dvc", "repro").stdout
    assert (
        f"{GRID - CELLS + len(finished)} done, 0 reused, {CELLS - len(finished)} to run" in again
    ), again[-3000:]
    assert set(started(again)) == sgd.keys() - finished, again[-3000:]
    for name in checkpointed:
        assert re.search(
            rf"^\[{name}\] .*resuming {name} from its checkpoint at step "
            rf"[1-9]\d*/",
            again,
            flags=re.M,
        ), again[-3000:]
        assert f"[{name}] step 1/" not in again  # continued, not started over
    assert len(list((repo / "results/runs").glob("*/metrics.json"))) == GRID
