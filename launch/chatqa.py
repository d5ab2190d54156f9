r"""ChatQA from an ml_collections config file (`jaxllm.methods.chatqa.config_dict`), one stage per call:

  python -m launch.chatqa --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa --stage=retriever
  python -m launch.chatqa --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa --stage=sft1
  python -m launch.chatqa --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa --stage=sft2
  python -m launch.chatqa --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa --stage=eval

(`--stage=all` runs the four in order; any field can be overridden, e.g. `--config.retriever.steps=500`.)

  retriever  fine-tunes the dual encoder on the training dialogues' multi-turn queries
             → workdir/retriever/params (orbax) and workdir/retriever/history.json
  sft1       stage-1 SFT on the instruction blend → workdir/sft1 (config.json + tokenizer of the model,
             checkpoints, metrics.jsonl: a `jaxllm.model.load_model` source)
  sft2       stage-2 context-enhanced SFT from the stage-1 params, contexts retrieved by the fine-tuned
             retriever → workdir/sft2
  eval       recall@1/@5 of the fine-tuned retriever on test follow-up turns (full-history queries) and
             RAG answer metrics of every SFT stage present → workdir/eval.json

The corpus, dialogues and examples are regenerated deterministically from the config in every stage.
SFT stages resume from their newest good checkpoint; on SIGTERM they save one and exit with 143.
All logic lives in `jaxllm.methods.chatqa`.
"""
import json
import pathlib
import signal
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

from jaxllm.data.tasks import conv_qa
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import chatqa, chatqa_retriever, retrieval
from jaxllm.model import load_model, record_model
from launch import common

STAGES = ("retriever", "sft1", "sft2", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "ChatQA config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Stage outputs go here.")
_STAGE = flags.DEFINE_enum("stage", None, STAGES + ("all",), "Which stage to run.")
flags.mark_flags_as_required(["config", "workdir", "stage"])


def _retriever_dir(workdir: pathlib.Path) -> pathlib.Path:
    return (workdir / "retriever" / "params").absolute()


def load_retriever(cfg: chatqa.ChatQAConfig, workdir: pathlib.Path, encoder, texts) -> chatqa_retriever.Retriever:
    """The fine-tuned retriever of the `retriever` stage over `texts`."""
    path = _retriever_dir(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"no fine-tuned retriever at {path}: run --stage=retriever first")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), retrieval.dual_from_encoder(encoder)[1])
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path, abstract)
    return chatqa_retriever.Retriever.build(encoder, texts, dual_params=params, max_query_len=cfg.retriever.max_query_len,
                                  max_context_len=cfg.retriever.max_context_len)


def _sft_params(cfg: chatqa.ChatQAConfig, workdir: pathlib.Path, stage: str):
    """The params of an SFT stage's newest checkpoint (`load_model` of its workdir)."""
    model_cfg, params = load_model(workdir / stage)
    if model_cfg != cfg.model:
        raise ValueError(f"{workdir / stage} holds a different model than config.model: {model_cfg} vs {cfg.model}")
    return params


def run_stage(stage: str, cfg: chatqa.ChatQAConfig, workdir: pathlib.Path) -> bool:
    """Runs one stage; returns False when an SFT stage stopped early on SIGTERM."""
    documents = chatqa.load_documents(cfg.corpus)
    data = conv_qa.generate(documents, cfg.data)
    texts = [c.text for c in data.chunks]
    tokenizer = Tokenizer.default()
    print(f"[{stage}] {len(documents)} documents, {len(texts)} chunks, dialogues "
          f"{ {s: len(v) for s, v in data.dialogues.items()} }", flush=True)

    if stage == "retriever":
        encoder = chatqa.load_encoder(cfg.encoder_path)
        pairs = chatqa_retriever.retrieval_pairs(data.dialogues["train"], encoder, cfg.retriever.max_query_len)
        fit = chatqa_retriever.fit_retriever(encoder, pairs, data.chunks, cfg.retriever, workdir / "retriever")
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(_retriever_dir(workdir), fit.params, force=True)
        (workdir / "retriever" / "history.json").write_text(json.dumps(fit.history, indent=1))
        return True

    if stage == "sft1":
        examples = chatqa.stage1_examples(cfg, documents, data, tokenizer)
        rows = chatqa.encode_examples(tokenizer, examples, cfg.stage1.max_len, system=cfg.system_prompt)
        print(f"[sft1] {len(examples)} instruction examples of <= {rows['tokens'].shape[1]} tokens", flush=True)
        record_model(workdir / "sft1", cfg.model, tokenizer)
        return not chatqa.fit_sft(cfg.model, rows, cfg.stage1, workdir / "sft1").preempted

    encoder = chatqa.load_encoder(cfg.encoder_path)
    retriever = load_retriever(cfg, workdir, encoder, texts)
    if stage == "sft2":
        stage1 = chatqa.stage1_examples(cfg, documents, data, tokenizer)
        examples = chatqa.stage2_examples(cfg, data, retriever, stage1)
        rows = chatqa.encode_examples(tokenizer, examples, cfg.stage2.max_len, system=cfg.system_prompt)
        print(f"[sft2] {len(examples)} examples ({sum(e.answer == chatqa.REFUSAL for e in examples)} refusals) of "
              f"<= {rows['tokens'].shape[1]} tokens", flush=True)
        params = _sft_params(cfg, workdir, "sft1")
        record_model(workdir / "sft2", cfg.model, tokenizer)
        return not chatqa.fit_sft(cfg.model, rows, cfg.stage2, workdir / "sft2", params=params).preempted

    items = chatqa.follow_up_turns(data, "test")
    recall, _ = chatqa.retrieval_recall(retriever, items, "history")
    results = {"retrieval": {"n": len(items), **recall}, "rag": {}}
    print(f"[eval] fine-tuned retriever, full history, {len(items)} test follow-ups: {recall}", flush=True)
    engine = None
    for sft in ("sft1", "sft2"):
        if not (workdir / sft / "checkpoints").is_dir():
            continue
        params = _sft_params(cfg, workdir, sft)
        if engine is None:
            engine = chatqa.make_engine(cfg.model, params, cfg.rag)
        engine.set_params(params)
        metrics, _ = chatqa.evaluate_rag(cfg, engine, tokenizer, retriever, data, "test")
        results["rag"][sft] = metrics
        print(f"[eval] {sft}: {metrics}", flush=True)
    (workdir / "eval.json").write_text(json.dumps(results, indent=1))
    return True


def main(argv):
    common.start(argv)
    warnings.filterwarnings("ignore", message=".*exceeded .* tokens and were truncated")
    cfg = chatqa.from_dict(_CONFIG.value.to_dict())
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    for stage in STAGES if _STAGE.value == "all" else (_STAGE.value,):
        if not run_stage(stage, cfg, workdir):
            sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    common.run(main)
