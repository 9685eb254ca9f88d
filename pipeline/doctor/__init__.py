"""`python -m pipeline doctor`: whether this machine can run the configured protocol
(`report`), and with `--gpu-check` a bounded acceptance of a GPU node (`gpu_check`). The
command is `command`; this package's `__init__` imports nothing, so that the child processes
it starts (`cuda_probe`, `worker`) load only what they use."""
