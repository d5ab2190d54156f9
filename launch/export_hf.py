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

_SOURCE = flags.DEFINE_string("source", None, "Model: jaxllm model dir, launch.train workdir or HF folder.")
_OUTPUT = flags.DEFINE_string("output", None, "HF folder to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer folder or tokenizer.model file, 'default' for the "
                                 "shipped one ('' = the one the source carries).")
flags.mark_flags_as_required(["source", "output"])


def export(source: str, output: str, tokenizer: str = "") -> None:
    """Write the HF folder of `source` to `output`. FileNotFoundError when neither the source nor
    `tokenizer` provides a tokenizer."""
    cfg, params = model_format.load_model(source)
    tok = model_format.load_tokenizer(source, tokenizer)
    tokenizer_lib.check_vocab(tok, cfg.vocab_size)
    hf.save(output, cfg, params, tokenizer=tok)


def main(argv):
    common.start(argv)
    export(_SOURCE.value, _OUTPUT.value, _TOKENIZER.value)
    print(f"wrote HF folder {_OUTPUT.value}")


if __name__ == "__main__":
    common.run(main)
