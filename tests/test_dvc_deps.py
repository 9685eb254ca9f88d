"""Every DVC stage declares the code it runs: each module its command imports (directly or
not, function-level imports included) is covered by one of the stage's `deps`, so that a
change to it makes `dvc repro` run the stage again."""

from pathlib import Path

import grimp
import pytest
import yaml

from pipeline.__main__ import COMMANDS
from pipeline.contract import RUN_MODULE
from pipeline.step_timing import TIMED_TRAINING

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_modules(cmd: str) -> set[str]:
    """The project modules `python -m pipeline <command> ...` runs: the CLI, the command's
    module (imported by name from COMMANDS), everything they import, what the runs it starts
    run (`python -m RUN_MODULE`, where the stage runs specs through `pipeline.execute`), and
    the packages Python runs on the way (each module's parent `__init__`)."""
    words = cmd.split()
    assert words[:3] == ["python", "-m", "pipeline"], cmd
    graph = grimp.build_graph("pipeline", "vsgd")
    start = {"pipeline.__main__", COMMANDS[words[3]][0]}
    modules = set(start)
    for module in start:
        modules |= graph.find_upstream_modules(module)
    if "pipeline.execute" in modules:
        modules |= {RUN_MODULE} | graph.find_upstream_modules(RUN_MODULE)
    return modules | {
        ".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)
    }


def module_path(module: str) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (ROOT / path).is_dir() else f"{path}.py"


def uncovered(stage: dict) -> list[str]:
    deps = [d.replace("${item}", "x") for d in stage.get("deps", [])]
    return sorted(
        path
        for path in map(module_path, command_modules(stage["cmd"]))
        if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_one_of_its_deps(name):
    stage = STAGES[name].get("do", STAGES[name])
    assert uncovered(stage) == [], f"dvc.yaml stage {name}: add these to its deps"


def test_a_missing_dep_is_found():
    """The check itself: a stage that leaves out a module it imports is caught."""
    stage = dict(STAGES["aggregate"])
    stage["deps"] = [d for d in stage["deps"] if d != "vsgd/outputs.py" and d != "vsgd"]
    assert "vsgd/outputs.py" in uncovered(stage)


def test_the_timing_stage_reruns_when_a_timed_training_key_changes():
    """The timing stage's result depends on the training keys a timed step is built with
    (`pipeline.step_timing.TIMED_TRAINING`); each must be one of its params, or changing it
    leaves Table 2's timings stale."""
    params = STAGES["timing"]["params"]
    missing = [
        k for k in TIMED_TRAINING if f"training.{k}" not in params and "training" not in params
    ]
    assert missing == [], f"dvc.yaml stage timing: add training.{missing} to its params"
