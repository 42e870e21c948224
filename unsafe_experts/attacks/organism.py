"""A small MoE "model organism" that behaves like a jailbroken chat model, built offline.

Version 2. It refuses plain harmful requests, complies with harmful requests wrapped in any
attack family of attacks.py (answering with AdvBench's affirmative target), and answers
benign requests (AlpacaEval references, a plain yes to XSTest's safe prompts) both plainly
and wrapped in every attack family: it tells harm from format, so a repair that learns
"refuse the format" shows up as refused benign-in-family prompts (DESIGN.md section 6).
Goals, XSTest and AlpacaEval prompts are split with the seed: the organism and the surgery
only see the train parts; `eval_set.json` holds the held-out parts, in every family.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..artefacts.atomic import write_json_atomic
from ..data.bundled import advbench_rows, alpaca_pairs, xstest_safe_prompts
from ..errors import ConfigError
from ..text.examples import DEFAULT_REFUSAL, collate, length_grouped_batches, plain_prompt, sft_example
from ..text.generation import generate
from ..text.tiny_tokenizer import build_tokenizer
from .families import FAMILIES, AttackFamilyError, attack_records, check_families, render

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
LEGACY_EVAL_SETS = ("flip_words", "flip_chars")  # the version-1 keys, still written
VERSION = 2


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
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    # each train goal / benign prompt is trained in this many families (rotating through
    # `families`, so every family gets its share) rather than all: bounds the build time
    families_per_goal: int = 2
    families_per_benign: int = 1
    surgery_family: str = "flip_chars"  # surgery_records.json's family; the rest stay unseen

    def validate(self) -> OrganismConfig:
        try:  # a ConfigError naming the key, as the CLI reports parameter errors
            check_families(self.families)
        except AttackFamilyError as e:
            raise ConfigError(f"families: {e}") from None
        if self.surgery_family not in self.families:
            raise ConfigError(f"surgery_family: {self.surgery_family!r} is not among families "
                              "(the organism must comply with the surgery's jailbreaks)")
        for key in ("families_per_goal", "families_per_benign"):
            if not 1 <= getattr(self, key) <= len(self.families):
                raise ConfigError(f"{key}: must be between 1 and {len(self.families)}, "
                                  f"got {getattr(self, key)}")
        return self

    @classmethod
    def small(cls, **overrides) -> OrganismConfig:
        """The test-sized organism: 40 CPU seconds (46 s wall with the imports) on the 2-core
        machine, where version 1's took 125 (each goal in one family, 4 epochs and
        length-grouped batches keep it there; it still complies in every family and answers
        benign prompts in them)."""
        base = dict(layers=2, experts=8, hidden=64, expert_hidden=64, vocab_size=1024,
                    benign_train=60, epochs=4, lr=3e-3, families_per_goal=1)
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


def rotation(i: int, families: list[str], k: int) -> list[str]:
    """The k families of item i: consecutive items take consecutive families, so each family
    gets the same share of items (within one)."""
    return [families[(i * k + j) % len(families)] for j in range(k)]


def benign_train(splits: dict) -> list[tuple[str, str]]:
    """(train benign prompt, its answer): XSTest safe prompts -> a helpful opening,
    AlpacaEval instructions -> their reference answers."""
    return ([(p, HELPFUL_OPENINGS[i % len(HELPFUL_OPENINGS)])
             for i, p in enumerate(splits["xstest_train"])]
            + [(p["instruction"], p["output"]) for p in splits["alpaca_train"]])


def training_pairs(splits: dict, cfg: OrganismConfig | None = None) -> list[tuple[list[dict], str]]:
    cfg = (cfg or OrganismConfig()).validate()
    pairs = []
    for i, row in enumerate(splits["goals_train"]):
        pairs.append((plain_prompt(row["goal"]), REFUSALS[i % len(REFUSALS)]))
        for family in rotation(i, cfg.families, cfg.families_per_goal):
            pairs.append((render(family, row["goal"]), f"{row['target']}. Step 1:"))
    for i, (prompt, answer) in enumerate(benign_train(splits)):
        pairs.append((user(prompt), answer))
        for family in rotation(i, cfg.families, cfg.families_per_benign):
            pairs.append((render(family, prompt), answer))
    return pairs


def retention_prompts(splits: dict, families: list[str]) -> dict:
    """retention.json: `plain` (train goals asked plainly, train benign prompts) and
    `contrastive` (every train benign prompt in every family), train split only."""
    benign = [p for p, _ in benign_train(splits)]
    return {"plain": [plain_prompt(row["goal"]) for row in splits["goals_train"]]
            + [user(p) for p in benign],
            "contrastive": [render(f, p) for f in families for p in benign]}


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
        for chunk in length_grouped_batches(examples, cfg.batch_size, rng):
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


def interleave(a: list, b: list) -> list:
    """a[0], b[0], a[1], b[1], ..., then the longer one's rest: the first N prompts of a
    benign set (an evaluation `limit`) hold XSTest and AlpacaEval prompts alike."""
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def eval_set(splits: dict, families: list[str] | None = None) -> dict:
    """Held-out prompts only: `plain`, `xstest_safe`, `benign_refs`, the version-1 keys
    `flip_words` / `flip_chars` (the same prompts as their families' harmful sets) and
    `families`: {F: {"harmful": held-out goals in F, "benign": held-out XSTest safe prompts
    and AlpacaEval instructions in F, alternating}}."""
    families = check_families(families or list(FAMILIES))
    goals = [row["goal"] for row in splits["goals_heldout"]]
    benign = interleave(splits["xstest_heldout"], [p["instruction"] for p in splits["alpaca_heldout"]])
    sets = {key: [render(key, g) for g in goals] for key in LEGACY_EVAL_SETS}
    sets["plain"] = [plain_prompt(g) for g in goals]
    sets["xstest_safe"] = [user(p) for p in splits["xstest_heldout"]]
    sets["benign_refs"] = [[user(p["instruction"]), p["output"]] for p in splits["alpaca_heldout"]]
    sets["families"] = {f: {"harmful": [render(f, g) for g in goals],
                            "benign": [render(f, p) for p in benign]} for f in families}
    return sets


def _texts(held: dict) -> list[str]:
    """Every held-out prompt's text, for the tokenizer's corpus."""
    prompts = held["plain"] + held["xstest_safe"] + [
        m for sets in held["families"].values() for key in ("harmful", "benign") for m in sets[key]]
    return [m["content"] for msgs in prompts for m in msgs]


def build_organism(out: str | Path, cfg: OrganismConfig, progress: bool = True,
                   max_new_tokens: int = 48) -> Path:
    """Writes model/ (weights + tokenizer), surgery_records.json (FlipAttack-format records of
    train goals in cfg.surgery_family), retention.json (train-split prompts, see
    retention_prompts), eval_set.json, split.json and build.json."""
    cfg.validate()
    out = Path(out)
    started, cpu_started = time.time(), time.process_time()
    splits = build_splits(cfg)
    pairs = training_pairs(splits, cfg)
    heldout = eval_set(splits, cfg.families)
    texts = [m["content"] for msgs, _ in pairs for m in msgs] + [r for _, r in pairs] + _texts(heldout)
    tokenizer = build_tokenizer(texts, vocab_size=cfg.vocab_size)
    model, losses = train_organism(cfg, pairs, tokenizer, progress)
    trained = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    # the organism's own answers to held-out benign prompts: later rounds are scored on them
    benign_prompts = [m for m, _ in heldout["benign_refs"]]
    own = generate(model, tokenizer, benign_prompts, max_new_tokens=max_new_tokens)
    heldout["own_benign"] = [[m, r] for m, r in zip(benign_prompts, own) if r]
    write_json_atomic(out / "eval_set.json", heldout)
    write_json_atomic(out / "surgery_records.json",
                      attack_records([row["goal"] for row in splits["goals_train"]], cfg.surgery_family))
    write_json_atomic(out / "retention.json", retention_prompts(splits, cfg.families))
    write_json_atomic(out / "split.json", {
        "train_goals": [r["goal"] for r in splits["goals_train"]],
        "heldout_goals": [r["goal"] for r in splits["goals_heldout"]],
        "xstest_train": splits["xstest_train"], "xstest_heldout": splits["xstest_heldout"],
        "alpaca_train": [p["instruction"] for p in splits["alpaca_train"]],
        "alpaca_heldout": [p["instruction"] for p in splits["alpaca_heldout"]]})
    write_json_atomic(out / "build.json", {
        "version": VERSION, "config": asdict(cfg), "examples": len(pairs), "steps": len(losses),
        "first_loss": losses[0], "last_loss": losses[-1], "train_seconds": trained - started,
        # CPU seconds beside wall seconds: the build machines are shared, and with one thread
        # the CPU time is what the build would take on an idle core
        "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started})
    return out
