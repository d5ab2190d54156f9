r"""ChatQA mini-reproduction: multi-turn retrieval arms and a tiny two-stage RAG model.

  python -m experiments.chatqa.run --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa

A. Retrieval (test split, answerable turns >= 2, recall@1/@5 of the gold chunk among all chunks):
   BM25 (`bm25s`) on the full-history query, the last turn and the oracle rewrite; all-MiniLM-L6-v2
   untuned on the last turn, the full history and the oracle rewrite; MiniLM with its query tower
   fine-tuned (InfoNCE, in-batch + 1 hard negative from the gold chunk's document) on full-history
   queries of the training dialogues, on the full history and on the rewrite. All queries are the
   same "user: ..." texts (`chatqa_retriever.turn_query`), cut to the same token budget.
B. RAG (test split, every turn, gold history): a tiny Llama after stage 1 only (instruction blend) and
   after stage 1 + stage 2 (context-enhanced: top-k chunks from the fine-tuned retriever + dialogue
   → answer, unanswerable → REFUSAL), both answering through the engine with the fine-tuned
   retriever's top-k chunks: exact match / F1 on answerable turns, refusal accuracy on unanswerable
   ones, and their average with the answered rate (ChatQA's unanswerable metric).

Writes results.json, results.md and the PNG plots next to this file (--out); the SFT checkpoints and
metrics.jsonl go under --workdir (delete it to rerun from scratch: fit resumes from checkpoints).
"""
from __future__ import annotations

import json
import pathlib
import time
import warnings

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxllm.data.tasks import conv_qa
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.methods import chatqa, chatqa_retriever, retrieval

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "SFT checkpoints and metrics go here.")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent), "results.json / .md / .png go here.")
flags.mark_flags_as_required(["config", "workdir"])

KS = (1, 5)
DEPTHS = (("2", 2, 2), ("3", 3, 3), ("4-5", 4, 5))
ARMS = (  # (name, retriever, query mode)
    ("BM25, last turn", "bm25", "last"),
    ("BM25, full history", "bm25", "history"),
    ("BM25, oracle rewrite", "bm25", "rewrite"),
    ("MiniLM, last turn", "minilm", "last"),
    ("MiniLM, full history", "minilm", "history"),
    ("MiniLM, oracle rewrite", "minilm", "rewrite"),
    ("fine-tuned MiniLM, full history", "tuned", "history"),
    ("fine-tuned MiniLM, oracle rewrite", "tuned", "rewrite"),
)


class Timer:
    """Wall time of each named phase."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, name: str):
        timer = self

        class Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()
                print(f"[{time.perf_counter() - timer.start:7.1f}s] {name} ...", flush=True)

            def __exit__(self, *exc):
                timer.phases[name] = round(time.perf_counter() - self.t0, 1)
                print(f"[{time.perf_counter() - timer.start:7.1f}s] {name}: {timer.phases[name]} s", flush=True)

        return Phase()


def bm25_ids(chunk_texts, queries, k: int) -> np.ndarray:
    """Top-k chunk ids per query by BM25 (bm25s defaults: Lucene variant, k1 1.5, b 0.75; English
    stop words removed)."""
    import bm25s

    model = bm25s.BM25()
    model.index(bm25s.tokenize(list(chunk_texts), stopwords="en", show_progress=False), show_progress=False)
    ids, _ = model.retrieve(bm25s.tokenize(list(queries), stopwords="en", show_progress=False), k=k,
                            show_progress=False, n_threads=1)
    return np.asarray(ids)


def recall_table(ids_QK: np.ndarray, items, gold_Q: np.ndarray) -> dict:
    """recall@k overall and by 1-based turn number."""
    turn_Q = np.asarray([t + 1 for _, t in items])
    out = {f"recall@{k}": retrieval.recall_at_k(ids_QK, gold_Q, k) for k in KS}
    for label, lo, hi in DEPTHS:
        sel = (turn_Q >= lo) & (turn_Q <= hi)
        out[f"turn {label}"] = {"n": int(sel.sum()),
                                **{f"recall@{k}": retrieval.recall_at_k(ids_QK[sel], gold_Q[sel], k) for k in KS}}
    return out


def plot(results: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["retrieval"]["arms"]
    names = list(arms)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(names))
    for j, k in enumerate(KS):
        ax.bar(x + (j - 0.5) * 0.38, [arms[n][f"recall@{k}"] for n in names], 0.38, label=f"recall@{k}")
    ax.set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=7.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall (test, answerable turns >= 2)")
    r = results["retrieval"]
    ax.set_title(f"Multi-turn retrieval, {r['n_queries']} follow-up turns, {r['n_chunks']} chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "chatqa_retrieval.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in names:
        if name.startswith("BM25, full") or name.startswith("MiniLM") or name.startswith("fine-tuned"):
            axes[0].plot([d[0] for d in DEPTHS], [arms[name][f"turn {d[0]}"]["recall@1"] for d in DEPTHS], "o-",
                         label=name)
    axes[0].set_xlabel("turn number")
    axes[0].set_ylabel("recall@1")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=6.5)
    axes[0].set_title("recall@1 by turn depth")
    hist = results["retriever_training"]["history"]
    axes[1].plot([h["step"] for h in hist], [h["loss"] for h in hist], label="InfoNCE loss")
    axes[1].plot([h["step"] for h in hist], [h["accuracy"] for h in hist], label="in-batch accuracy")
    axes[1].set_xlabel("retriever step")
    axes[1].legend(fontsize=7)
    axes[1].set_title("query-tower fine-tuning")
    for stage in ("stage1", "stage2"):
        h = results["sft"][stage]["history"]
        offset = 0 if stage == "stage1" else results["sft"]["stage1"]["history"][-1]["step"]
        axes[2].plot([offset + r["step"] for r in h], [r["nll_loss"] for r in h], "o-", label=stage)
    axes[2].set_xlabel("SFT step (stage 2 continues stage 1)")
    axes[2].set_ylabel("answer-token NLL")
    axes[2].legend(fontsize=7)
    axes[2].set_title("two-stage tuning")
    fig.tight_layout()
    fig.savefig(out / "chatqa_training.png", dpi=120)
    plt.close(fig)

    rag = results["rag"]
    metrics = ("exact_match", "f1", "answered", "refusal_accuracy", "unanswerable_avg")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(metrics))
    for j, model in enumerate(rag):
        ax.bar(x + (j - 0.5) * 0.38, [rag[model]["metrics"][m] for m in metrics], 0.38, label=model)
    ax.set_xticks(x, metrics, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Tiny RAG (test, top-k from the fine-tuned retriever)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "chatqa_rag.png", dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    r = results["retrieval"]
    lines = [f"### A. Retrieval: test split, answerable turns >= 2 ({r['n_queries']} queries, index of "
             f"{r['n_chunks']} chunks)", "",
             f"In {r['gold_is_previous_gold']:.0%} of these turns the previous turn was answered from the same "
             "gold chunk.", "",
             "| retriever, query | recall@1 | recall@5 | R@1 turn 2 | R@1 turn 3 | R@1 turns 4-5 |",
             "|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        depth = " | ".join(f"{a[f'turn {d[0]}']['recall@1']:.3f} (n={a[f'turn {d[0]}']['n']})" for d in DEPTHS)
        lines.append(f"| {name} | {a['recall@1']:.3f} | {a['recall@5']:.3f} | {depth} |")
    t = results["retriever_training"]
    lines += ["", f"Fine-tuning: {t['pairs']} training pairs, {t['steps']} steps × {t['batch_size']}, "
              f"loss {t['history'][0]['loss']:.3f} → {t['history'][-1]['loss']:.3f} (window means), "
              f"{t['seconds']:.0f} s.", ""]
    lines += ["### B. Tiny RAG: test split, every turn, gold history, top-"
              f"{results['config']['rag']['top_k']} chunks from the fine-tuned retriever", "",
              "| model | EM | F1 | answered (answerable) | refusal acc. (unanswerable) | avg | gold chunk in context |",
              "|---|---|---|---|---|---|---|"]
    for model, v in results["rag"].items():
        m = v["metrics"]
        lines.append(f"| {model} | {m['exact_match']:.3f} | {m['f1']:.3f} | {m['answered']:.3f} | "
                     f"{m['refusal_accuracy']:.3f} | {m['unanswerable_avg']:.3f} | {m['gold_in_context']:.3f} |")
    m = next(iter(results["rag"].values()))["metrics"]
    lines += ["", f"{int(m['n_answerable'])} answerable and {int(m['n_unanswerable'])} unanswerable test turns.", "",
              "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in results["wall_time_s"].items()), ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)
    warnings.filterwarnings("ignore", message=".*exceeded .* tokens and were truncated")
    config = _CONFIG.value
    cfg = chatqa.from_dict(config.to_dict())
    workdir, out = pathlib.Path(_WORKDIR.value), pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    devices = jax.devices()[:1]

    with timer("data"):
        documents = chatqa.load_documents(cfg.corpus)
        data = conv_qa.generate(documents, cfg.data)
        texts = [c.text for c in data.chunks]
        tokenizer = Tokenizer.default()
    print(f"{len(documents)} documents, {len(texts)} chunks; dialogues "
          f"{ {s: len(v) for s, v in data.dialogues.items()} }", flush=True)

    rc = cfg.retriever
    with timer("index (MiniLM)"):
        encoder = chatqa.load_encoder(cfg.encoder_path)
        index_emb = chatqa_retriever.tower_encoder(encoder, {"context": encoder.params}, "context",
                                         rc.max_context_len).encode(texts)
        untuned = chatqa_retriever.Retriever.build(encoder, texts, max_query_len=rc.max_query_len,
                                         max_context_len=rc.max_context_len, context_emb_ND=index_emb)
    items = chatqa.follow_up_turns(data, "test")
    gold = np.asarray([d.turns[t].gold_chunk for d, t in items])
    arms: dict[str, dict] = {}

    with timer("BM25 arms"):
        for name, kind, mode in ARMS:
            if kind == "bm25":
                queries = [chatqa_retriever.turn_query(d, t, mode, encoder, rc.max_query_len) for d, t in items]
                arms[name] = recall_table(bm25_ids(texts, queries, max(KS)), items, gold)
    with timer("untuned MiniLM arms"):
        for name, kind, mode in ARMS:
            if kind == "minilm":
                _, ids = chatqa.retrieval_recall(untuned, items, mode, KS)
                arms[name] = recall_table(ids, items, gold)

    pairs = chatqa_retriever.retrieval_pairs(data.dialogues["train"], encoder, rc.max_query_len)
    with timer("retriever fine-tuning"):
        fit = chatqa_retriever.fit_retriever(encoder, pairs, data.chunks, rc, workdir / "retriever",
                                             context_emb_ND=index_emb)
    with timer("fine-tuned MiniLM arms"):  # a trained context tower re-embeds the chunks
        tuned = chatqa_retriever.Retriever.build(encoder, texts, dual_params=fit.params, max_query_len=rc.max_query_len,
                                       max_context_len=rc.max_context_len,
                                       context_emb_ND=None if rc.train_context_tower else index_emb)
        for name, kind, mode in ARMS:
            if kind == "tuned":
                _, ids = chatqa.retrieval_recall(tuned, items, mode, KS)
                arms[name] = recall_table(ids, items, gold)
    for name, a in arms.items():
        print(f"{name:38s} R@1 {a['recall@1']:.3f}  R@5 {a['recall@5']:.3f}", flush=True)

    with timer("stage-1 SFT"):
        stage1 = chatqa.stage1_examples(cfg, documents, data, tokenizer)
        rows1 = chatqa.encode_examples(tokenizer, stage1, cfg.stage1.max_len, system=cfg.system_prompt)
        sft1 = chatqa.fit_sft(cfg.model, rows1, cfg.stage1, workdir / "sft1", devices=devices)
    with timer("stage-2 data (retrieval for training turns)"):
        stage2 = chatqa.stage2_examples(cfg, data, tuned, stage1)
        rows2 = chatqa.encode_examples(tokenizer, stage2, cfg.stage2.max_len, system=cfg.system_prompt)
    with timer("stage-2 SFT"):
        sft2 = chatqa.fit_sft(cfg.model, rows2, cfg.stage2, workdir / "sft2", params=sft1.state.params, devices=devices)

    rag = {}
    engine = chatqa.make_engine(cfg.model, sft1.state.params, cfg.rag)
    for label, fit_result in (("stage-1 only", sft1), ("stage 1 + stage 2", sft2)):
        with timer(f"RAG eval: {label}"):
            engine.set_params(fit_result.state.params)
            metrics, outputs = chatqa.evaluate_rag(cfg, engine, tokenizer, tuned, data, "test")
        all_items = chatqa_retriever.dialogue_turns(data.dialogues["test"])
        samples = [{"question": d.turns[t].question, "reference": d.turns[t].answer, "answer": o.answer,
                    "chunk_ids": list(o.chunk_ids)} for (d, t), o in list(zip(all_items, outputs))[:12]]
        rag[label] = {"metrics": metrics, "samples": samples}
        print(label, {k: round(v, 3) for k, v in metrics.items()}, flush=True)

    results = {
        "config": config.to_dict(),
        "data": {"documents": len(documents), "chunks": len(texts),
                 "dialogues": {s: len(v) for s, v in data.dialogues.items()},
                 "turns": {s: len(chatqa_retriever.dialogue_turns(v)) for s, v in data.dialogues.items()}},
        "retrieval": {"n_queries": len(items), "n_chunks": len(texts), "arms": arms,
                      # How often the previous turn's answer came from the very gold chunk (history helps).
                      "gold_is_previous_gold": float(np.mean([d.turns[t - 1].gold_chunk == d.turns[t].gold_chunk
                                                              for d, t in items]))},
        "retriever_training": {"pairs": len(pairs), "steps": rc.steps, "batch_size": rc.batch_size,
                               "history": fit.history, "seconds": timer.phases["retriever fine-tuning"]},
        "sft": {"stage1": {"examples": len(stage1), "row_tokens": int(rows1["tokens"].shape[1]),
                           "history": sft1.history},
                "stage2": {"examples": len(stage2), "refusal_targets": sum(e.answer == chatqa.REFUSAL for e in stage2),
                           "row_tokens": int(rows2["tokens"].shape[1]), "history": sft2.history}},
        "rag": rag,
        "wall_time_s": {**timer.phases, "total": round(time.perf_counter() - timer.start, 1)},
        "jax": jax.__version__, "device": str(jax.devices()[0]),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    app.run(main)
