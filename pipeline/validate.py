"""`python -m pipeline validate`: check params.yaml (every problem at once) and list the runs
of its grid: the tune stage's and the train stage's (a tuned cell the tune stage has not
chosen for yet is listed with its pinned values)."""

from .config import add_params_arguments, load_params
from .plan import PINNED, plan


def add_arguments(parser):
    add_params_arguments(parser)


def run(args) -> int:
    params = load_params(args.params, args.set)
    planned = plan(params, PINNED)
    print(
        f"params OK (preset: {params.get('preset') or 'none'}): "
        f"{len(planned.tuning)} tuning runs, {len(planned.final)} runs in the grid"
    )
    for spec in planned.tuning + planned.final:
        print(f"  {spec['name']}")
    if planned.undecided:
        print(
            f"({len(planned.undecided)} tuned cells are listed with their pinned values "
            "until the tune stage has chosen theirs)"
        )
    return 0
