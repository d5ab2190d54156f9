"""TPU pre-flight: compile the training step for a TPU topology from this host and report memory.

  python -m launch.aot_compile --model=llama2_7b --topology=v5p:8x8x4 --mesh=fsdp:-1 \
      --batch=256 --seq_len=4096 --remat=full
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a described topology needs no local chip

from absl import flags  # noqa: E402

from jaxllm.model import presets  # noqa: E402
from jaxllm.train import aot  # noqa: E402
from launch import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", "model preset name")
flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5p:8x8x4, v5e:16x16, v4:4x4x4")
flags.DEFINE_string("mesh", "fsdp:-1", "mesh spec over (data, fsdp, tensor)")
flags.DEFINE_integer("batch", 8, "global batch size (sequences)")
flags.DEFINE_integer("seq_len", 512, "sequence length")
flags.DEFINE_string("remat", "full", "rematerialisation policy: none, full, dots, dots_no_batch")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype (params stay float32)")
flags.DEFINE_bool("scan_layers", True, "stack layers under one lax.scan")


def main(argv):
    del argv
    cfg = presets.get(FLAGS.model, remat=FLAGS.remat, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                      max_len=max(FLAGS.seq_len, presets.get(FLAGS.model).max_len))
    report = aot.compile_train_step(cfg, FLAGS.topology, FLAGS.mesh, FLAGS.batch, FLAGS.seq_len)
    print(f"{FLAGS.model}: {cfg.num_params() / 1e9:.2f}B params, batch {FLAGS.batch} x {FLAGS.seq_len}, "
          f"remat {FLAGS.remat}, compute {FLAGS.dtype}")
    print(report.summary())


if __name__ == "__main__":
    common.run(main)
