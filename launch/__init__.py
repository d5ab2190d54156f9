"""Command-line entry points (absl flags): `train` (pre-training from an ml_collections config),
`aot_compile` (TPU pre-flight), `tpu_pod` (run a command on every worker of a Cloud TPU VM pod).
Each is a thin `main`; the logic lives in `jaxllm`."""
