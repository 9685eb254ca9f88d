"""The paper's results from the finished runs: what `python -m pipeline aggregate` writes.

Each module imports only those listed before it:

- `table`: the one table model (`Table`, `TableFile`), rendered to markdown, LaTeX and CSV;
- `stats`: Welch's t intervals of differences; best / tied / worse per cell;
- `runs`: the grid's finished runs (`results/runs/`) and the published numbers;
- `cells`: runs grouped per dataset x architecture x optimizer, labels, the paper's claim;
- `table1`, `differences` (and the standing), `table2`: the tables of `results/tables/`;
- `summary`: `results/summary.json` for `dvc metrics`;
- `figures`: `results/figures/` and the per-cell CSVs for `dvc plots`;
- `mlflow_export`: every MLflow run in `results/mlflow_runs.csv`.

The hyperparameters of each cell were chosen by the tune stage on validation accuracy, or
pinned; the test set never chooses anything. Every table and figure takes the optimizers of
`params["optimizers"]`, whatever their keys: a key without a label is shown as itself, one
without a style gets a look of its own; the paper's claim stays about VSGD against SGD, Adam
and AdamW.
"""
