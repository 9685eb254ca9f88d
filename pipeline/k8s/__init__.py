"""Kubernetes, for the kubernetes executor (`pipeline.executors.kubernetes`) and the commands
around it (docs/kubernetes.md):

- `schema`: params.yaml's `executor.kubernetes` keys, defaults and validation;
- `render`: run spec -> Job (names, ownership labels), and `python -m pipeline render-jobs`;
- `access`: the launcher's API rights (the Role in k8s/base/launcher-rbac.yaml);
- `client`: connecting, what API errors say, calls retried within the outage budget;
- `preflight`: what would fail every Job, found before the first is submitted;
- `status`: what a Job's status says; `pods`: a run's pods, why one cannot start, its log;
- `jobs`: this pipeline's Jobs, those of an earlier grid, `python -m pipeline jobs`.

Nothing is imported here: `schema` and `render` must load without the kubernetes client.
"""
