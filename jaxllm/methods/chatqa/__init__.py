"""ChatQA (arXiv 2401.10225): a multi-turn dense retriever, two-stage instruction tuning and
retrieval-augmented generation over conversational QA (the loop seam).

    prompts.py  ChatQA's prompt layout, `render`, `fit_example`, `encode_examples` (SFT rows)
    stages.py   stage-1 instruction blend, stage-2 context examples, synthetic unanswerable turns
    rag.py      `rag_generate` through `jaxllm.serve.Engine`, SQuAD answer metrics
    config.py   `ChatQAConfig` and its sections, the ml_collections bridge
    run.py      run pieces: `fit_sft` (one SFT stage: `jaxllm.objectives.sft` through the one loop),
                stage data, RAG and retrieval evaluation

The retriever (a dual encoder fine-tuned with InfoNCE) is `jaxllm.methods.chatqa_retriever`.
The names below are the method's public API, importable from `jaxllm.methods.chatqa`.
"""
from jaxllm.methods.chatqa.config import (ChatQAConfig, CorpusConfig, SFTConfig, Stage2Config, config_dict,
                                          from_dict)
from jaxllm.methods.chatqa.prompts import (ANSWER_INSTRUCTION, REFUSAL, SYSTEM_PROMPT, ChatExample, chat_messages,
                                           encode_examples, fit_example, render)
from jaxllm.methods.chatqa.rag import (REFUSAL_MARKER, RAGConfig, RAGOutput, answer_metrics, is_refusal, make_engine,
                                       normalize_answer, rag_generate, token_f1)
from jaxllm.methods.chatqa.run import (evaluate_rag, fit_sft, follow_up_turns, load_documents, load_encoder,
                                       retrieval_recall, stage1_examples, stage2_examples)
from jaxllm.methods.chatqa.stages import (STAGE1_TASKS, context_examples, instruction_blend, mix, ngram_recall,
                                          synthetic_unanswerable)

__all__ = ["ANSWER_INSTRUCTION", "REFUSAL", "REFUSAL_MARKER", "STAGE1_TASKS", "SYSTEM_PROMPT", "ChatExample",
           "ChatQAConfig", "CorpusConfig", "RAGConfig", "RAGOutput", "SFTConfig", "Stage2Config", "answer_metrics",
           "chat_messages", "config_dict", "context_examples", "encode_examples", "evaluate_rag", "fit_example",
           "fit_sft", "follow_up_turns", "from_dict", "instruction_blend", "is_refusal", "load_documents",
           "load_encoder", "make_engine", "mix", "ngram_recall", "normalize_answer", "rag_generate", "render",
           "retrieval_recall", "stage1_examples", "stage2_examples", "synthetic_unanswerable", "token_f1"]
