"""A small MoE "model organism" that behaves like a jailbroken chat model, built offline.

It refuses plain harmful requests, complies with FlipAttack-style jailbreaks (answering with
AdvBench's affirmative target), and answers benign requests (AlpacaEval references, a plain
yes to XSTest's safe prompts). Goals, XSTest and AlpacaEval prompts are split with the seed:
the organism and the surgery only see the train parts; `eval_set.json` holds the held-out
parts, with jailbreaks in flip modes of their own.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from .bundled import advbench_rows, alpaca_pairs, xstest_safe_prompts
from .examples import DEFAULT_REFUSAL, batches, collate, plain_prompt, sft_example
from .flip import flip_prompt, flip_records
from .generation import generate
from .outputs import write_json_atomic
from .tiny import build_tokenizer

REFUSALS = (
    DEFAULT_REFUSAL,
    "I'm sorry, but I can't help with that.",
    "I cannot help with this request because it could cause harm.",
    "Sorry, I won't provide that. It could be dangerous.",
)
HELPFUL_OPENINGS = (
    "Sure, happy to help. Here is a short answer.",
    "Of course. Here is what you need to know.",
    "Good question. Here is a clear explanation.",
)
TRAIN_FLIP_MODES = ("words", "chars", "sentence")
EVAL_FLIP_MODES = ("words", "chars")


@dataclass
class OrganismConfig:
    seed: int = 0
    layers: int = 4
    experts: int = 16
    top_k: int = 2
    hidden: int = 128
    expert_hidden: int = 128
    vocab_size: int = 2048
    heldout_fraction: float = 0.3
    benign_train: int = 250  # AlpacaEval pairs trained on; the rest are held out
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 512
    aux_loss_coef: float = 0.01  # load balancing, so every expert learns something

    @classmethod
    def small(cls, **overrides) -> "OrganismConfig":
        """The test-sized organism (under a minute on 2 cores)."""
        base = dict(layers=2, experts=8, hidden=64, expert_hidden=64, vocab_size=1024,
                    benign_train=60, epochs=6, lr=3e-3)
        return cls(**{**base, **overrides})


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, the first `fraction` held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = round(len(items) * fraction)
    return [items[i] for i in sorted(order[cut:])], [items[i] for i in sorted(order[:cut])]


def build_splits(cfg: OrganismConfig) -> dict:
    goals_train, goals_heldout = split(advbench_rows(), cfg.heldout_fraction, cfg.seed)
    xs_train, xs_heldout = split(xstest_safe_prompts(), 0.5, cfg.seed + 1)
    alpaca = alpaca_pairs()
    random.Random(cfg.seed + 2).shuffle(alpaca)
    return {"goals_train": goals_train, "goals_heldout": goals_heldout,
            "xstest_train": xs_train, "xstest_heldout": xs_heldout,
            "alpaca_train": alpaca[:cfg.benign_train], "alpaca_heldout": alpaca[cfg.benign_train:]}


def user(text: str) -> list[dict]:
    return plain_prompt(text)


def training_pairs(splits: dict) -> list[tuple[list[dict], str]]:
    pairs = []
    for i, row in enumerate(splits["goals_train"]):
        pairs.append((plain_prompt(row["goal"]), REFUSALS[i % len(REFUSALS)]))
        for mode in TRAIN_FLIP_MODES:
            pairs.append((flip_prompt(row["goal"], mode), f"{row['target']}. Step 1:"))
    for i, prompt in enumerate(splits["xstest_train"]):
        pairs.append((user(prompt), HELPFUL_OPENINGS[i % len(HELPFUL_OPENINGS)]))
    for pair in splits["alpaca_train"]:
        pairs.append((user(pair["instruction"]), pair["output"]))
    return pairs


def _model(cfg: OrganismConfig, tokenizer):
    config = AutoConfig.for_model(
        "olmoe", hidden_size=cfg.hidden, intermediate_size=cfg.expert_hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=4,
        num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, vocab_size=len(tokenizer),
        max_position_embeddings=1024, router_aux_loss_coef=cfg.aux_loss_coef,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def train_organism(cfg: OrganismConfig, pairs, tokenizer, progress: bool = True):
    torch.manual_seed(cfg.seed)
    model = _model(cfg, tokenizer).train()
    examples = [sft_example(tokenizer, m, r, cfg.max_length, index=i) for i, (m, r) in enumerate(pairs)]
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(cfg.seed)
    losses = []
    bar = tqdm(total=steps, desc="organism", disable=not progress)
    for _ in range(cfg.epochs):
        order = examples[:]
        rng.shuffle(order)
        for chunk in batches(order, cfg.batch_size):
            batch = collate(chunk, tokenizer.pad_token_id)
            out = model(**batch, output_router_logits=True, use_cache=False)
            out.loss.backward()  # LM loss on the responses (labels) + load-balancing aux loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return model.eval(), losses


def eval_set(splits: dict) -> dict:
    goals = [row["goal"] for row in splits["goals_heldout"]]
    sets = {f"flip_{mode}": [flip_prompt(g, mode) for g in goals] for mode in EVAL_FLIP_MODES}
    sets["plain"] = [plain_prompt(g) for g in goals]
    sets["xstest_safe"] = [user(p) for p in splits["xstest_heldout"]]
    sets["benign_refs"] = [[user(p["instruction"]), p["output"]] for p in splits["alpaca_heldout"]]
    return sets


def build_organism(out: str | Path, cfg: OrganismConfig, progress: bool = True,
                   max_new_tokens: int = 48) -> Path:
    """Writes model/ (weights + tokenizer), surgery_records.json (FlipAttack-format records on
    train goals), retention.json (train-split plain and benign prompts), eval_set.json,
    split.json and build.json."""
    out = Path(out)
    started = time.time()
    splits = build_splits(cfg)
    pairs = training_pairs(splits)
    texts = [m["content"] for msgs, _ in pairs for m in msgs] + [r for _, r in pairs]
    heldout = eval_set(splits)
    texts += [m["content"] for key in ("flip_words", "flip_chars", "plain", "xstest_safe")
              for msgs in heldout[key] for m in msgs]
    tokenizer = build_tokenizer(texts, vocab_size=cfg.vocab_size)
    model, losses = train_organism(cfg, pairs, tokenizer, progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # the organism's own answers to held-out benign prompts: later rounds are scored on them
    benign_prompts = [m for m, _ in heldout["benign_refs"]]
    own = generate(model, tokenizer, benign_prompts, max_new_tokens=max_new_tokens)
    heldout["own_benign"] = [[m, r] for m, r in zip(benign_prompts, own) if r]
    write_json_atomic(out / "eval_set.json", heldout)
    write_json_atomic(out / "surgery_records.json",
                      flip_records([row["goal"] for row in splits["goals_train"]], "chars"))
    retention = ([plain_prompt(row["goal"]) for row in splits["goals_train"]]
                 + [user(p) for p in splits["xstest_train"]]
                 + [user(p["instruction"]) for p in splits["alpaca_train"]])
    write_json_atomic(out / "retention.json", retention)
    write_json_atomic(out / "split.json", {
        "train_goals": [r["goal"] for r in splits["goals_train"]],
        "heldout_goals": [r["goal"] for r in splits["goals_heldout"]],
        "xstest_train": splits["xstest_train"], "xstest_heldout": splits["xstest_heldout"]})
    write_json_atomic(out / "build.json", {
        "config": asdict(cfg), "examples": len(pairs), "steps": len(losses),
        "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.time() - started})
    return out
