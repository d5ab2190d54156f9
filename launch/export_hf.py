r"""Export any model source as a Hugging Face folder.

  python -m launch.export_hf --source=SOURCE --output=DIR [--tokenizer=default]

`--source` is a jaxllm model directory, a `launch.train` workdir (its newest checkpoint) or an HF
folder, read by `jaxllm.model.load_model`. DIR gets safetensors and `config.json`
(`jaxllm.model.hf.save`), which `transformers.LlamaForCausalLM.from_pretrained` loads with the
same logits, and the source's tokenizer (`--tokenizer` overrides it: a tokenizer folder or
`tokenizer.model` file, or `default` for the shipped one). A RoPE logit scale HF cannot express
(entropy-aware ABF) is kept under `jaxllm_logit_scale`: jaxllm restores it, transformers ignores it
and runs the model as plain ABF (identical up to the pretrained window).
"""
from absl import flags

from jaxllm import model as model_format
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.model import hf
from launch import common

def export(source: str, output: str, tokenizer: str = "") -> None:
    """Write the HF folder of `source` to `output`. FileNotFoundError when neither the source nor
    `tokenizer` provides a tokenizer."""
    cfg, params = model_format.load_model(source)
    tok = model_format.load_tokenizer(source, tokenizer)
    tokenizer_lib.check_vocab(tok, cfg.vocab_size)
    hf.save(output, cfg, params, tokenizer=tok)


def define_flags():
    """The command-line flags (defined only when run as a program, so importing this module for
    `export` leaves the global flag registry alone)."""
    flags.DEFINE_string("source", None, "Model: jaxllm model dir, launch.train workdir or HF folder.")
    flags.DEFINE_string("output", None, "HF folder to write.")
    flags.DEFINE_string("tokenizer", "", "Tokenizer folder or tokenizer.model file, 'default' for the "
                        "shipped one ('' = the one the source carries).")
    flags.mark_flags_as_required(["source", "output"])


def main(argv):
    common.start(argv)
    FLAGS = flags.FLAGS
    export(FLAGS.source, FLAGS.output, FLAGS.tokenizer)
    print(f"wrote HF folder {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    common.run(main)
