"""TPU pre-flight: compile the training step or the engine step for a TPU topology from this host
and report per-chip memory (needs libtpu: `pip install -e ".[tpu]"`).

  python -m launch.aot_compile --model=llama2_7b --topology=v5p:8x8x4 --mesh=fsdp:-1 \
      --batch=256 --seq_len=4096 --remat=full --attention=splash
  python -m launch.aot_compile --job=serve --model=llama2_7b --topology=v5e:2x2 --mesh=tensor:4 \
      --num_blocks=2048
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a described topology needs no local chip

from absl import app, flags  # noqa: E402

from jaxllm.model import presets  # noqa: E402
from jaxllm.train import aot  # noqa: E402
from launch import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("job", "train", ["train", "serve"], "what to compile: the training step or the engine step")
flags.DEFINE_string("model", "tiny", "model preset name")
flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5p:8x8x4, v5e:16x16, v4:4x4x4")
flags.DEFINE_string("mesh", "fsdp:-1", "mesh spec over (data, fsdp, tensor); serving uses tensor only")
flags.DEFINE_string("attention", "xla", "attention kernel: xla, splash, flash (training); xla, ragged (serving: "
                    "the Pallas ragged_paged_attention kernel)")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype (training params stay float32; serving weights use it)")
flags.DEFINE_integer("batch", None, "global batch size (sequences); default: one sequence per data-parallel device")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per step (training)")
flags.DEFINE_integer("seq_len", 512, "sequence length (training)")
flags.DEFINE_string("remat", "full", "rematerialisation policy: none, full, dots, dots_no_batch (training)")
flags.DEFINE_bool("scan_layers", True, "stack layers under one lax.scan")
flags.DEFINE_integer("num_blocks", 1024, "KV pool blocks (serving)")
flags.DEFINE_integer("block_size", 16, "tokens per KV block (serving)")
flags.DEFINE_integer("token_budget", 256, "tokens per engine pass (serving)")
flags.DEFINE_integer("max_seqs", 64, "sequences per engine pass (serving)")
flags.DEFINE_integer("context_len", 4096, "longest context a pass reads (serving)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.job == "serve":
        from jaxllm.serve import aot as serve_aot
        from jaxllm.serve.paged_attention import paged_attention
        from jaxllm.serve.ragged_attention import ragged_paged_attention
        serve_attention = {"xla": paged_attention, "ragged": ragged_paged_attention}
        if FLAGS.attention not in serve_attention:
            raise app.UsageError(f"--attention={FLAGS.attention!r} for serving; choices: {sorted(serve_attention)}")
        cfg = presets.get(FLAGS.model, dtype=FLAGS.dtype, param_dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                          max_len=max(FLAGS.context_len, presets.get(FLAGS.model).max_len))
        report = serve_aot.compile_serve_step(cfg, FLAGS.topology, FLAGS.mesh, num_blocks=FLAGS.num_blocks,
                                              block_size=FLAGS.block_size, token_budget=FLAGS.token_budget,
                                              max_seqs=FLAGS.max_seqs, context_len=FLAGS.context_len,
                                              attention=serve_attention[FLAGS.attention])
        print(f"{FLAGS.model}: {cfg.num_params() / 1e9:.2f}B params ({FLAGS.dtype}), pass of {FLAGS.token_budget} "
              f"tokens / {FLAGS.max_seqs} sequences, contexts up to {FLAGS.context_len}")
        print(report.summary())
        return
    cfg = presets.get(FLAGS.model, remat=FLAGS.remat, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers,
                      attention=FLAGS.attention, max_len=max(FLAGS.seq_len, presets.get(FLAGS.model).max_len))
    batch = FLAGS.batch
    if batch is None:  # one sequence per data-parallel device: always divisible
        from jaxllm.parallel import make_mesh
        mesh = make_mesh(FLAGS.mesh, devices=aot.topology_devices(FLAGS.topology))
        batch = mesh.shape["data"] * mesh.shape["fsdp"] * FLAGS.grad_accum
    report = aot.compile_train_step(cfg, FLAGS.topology, FLAGS.mesh, batch, FLAGS.seq_len, grad_accum=FLAGS.grad_accum)
    print(f"{FLAGS.model}: {cfg.num_params() / 1e9:.2f}B params, batch {batch} x {FLAGS.seq_len} "
          f"(grad_accum {FLAGS.grad_accum}), remat {FLAGS.remat}, compute {FLAGS.dtype}, attention {FLAGS.attention}")
    print(report.summary())


if __name__ == "__main__":
    common.run(main)
