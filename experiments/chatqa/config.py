"""ChatQA mini-reproduction on CPU (2 shared cores): a ~20-minute run.

Sub-corpus: the first 120 embedded-corpus documents of 100–1000 words, cut into ~50-word chunks so a
chunk fits MiniLM's 96-token window; 4 dialogues per document, answers of at most 25 words, 15 % of
follow-ups unanswerable, 20 % of the documents held out for test (no validation split: nothing is
tuned). Retriever: all-MiniLM-L6-v2, query tower fine-tuned for 100 steps of 16 pairs (context tower
frozen, which keeps one index for every MiniLM arm). Generator: a 1.4M-parameter Llama (d 128,
2 layers) with the shipped 4096-piece tokenizer, stage 1 = 100 steps × 16, stage 2 = 150 steps × 8.

  python -m experiments.chatqa.run --config=experiments/chatqa/config.py --workdir=/tmp/jaxllm_chatqa
"""
from jaxllm.methods import chatqa


def get_config():
    return chatqa.config_dict(
        model={"preset": "tiny", "vocab_size": 4096, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
               "d_ff": 384, "max_len": 512},
        corpus={"min_words": 100, "max_words": 1000, "max_documents": 120},
        data={"chunk_words": 50, "dialogues_per_doc": 4, "max_answer_words": 25, "unanswerable_prob": 0.15,
              "val_fraction": 0.0, "test_fraction": 0.2, "seed": 0},
        retriever={"steps": 100, "batch_size": 16, "hard_negatives": 1, "temperature": 0.05, "max_query_len": 64,
                   "max_context_len": 96, "train_context_tower": False, "log_every": 10, "seed": 0,
                   "optimizer": {"learning_rate": 3e-5, "warmup_steps": 15, "min_lr_ratio": 0.1, "weight_decay": 0.01}},
        stage1_examples=1600,
        stage1={"steps": 100, "batch_size": 16, "max_len": 256, "log_every": 25, "seed": 0,
                "optimizer": {"learning_rate": 2e-3, "warmup_steps": 15, "min_lr_ratio": 0.1, "weight_decay": 0.01}},
        stage2_data={"top_k": 2, "extra_ranked": 4, "gold_in_context": True, "unanswerable_fraction": 0.1,
                     "stage1_fraction": 0.2},
        stage2={"steps": 150, "batch_size": 8, "max_len": 320, "log_every": 25, "seed": 0,
                "optimizer": {"learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.01}},
        rag={"top_k": 2, "max_prompt_len": 320, "max_new_tokens": 40, "token_budget": 512, "max_seqs": 32,
             "num_blocks": 1024},
    )
