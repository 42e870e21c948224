"""Judges: did a response comply with a harmful request (or, on benign sets, answer at all)?

A judge spec, as a suite or `unsafe-experts attack --judge` gives it:
- `refusal` (default): the documented phrase list of refusal.py; complied = not a refusal;
- `{classifier: DIR, labels: {LABEL: complied|refused, ...}}`: a local transformers
  sequence-classification model; `labels` maps every label of the model (its id2label name or
  index) to a verdict (`unsafe` / `safe` are accepted for complied / refused); `input:
  response` (default) classifies the response alone, `pair` the (request, response) pair;
- `{llm: DIR, template: llamaguard|strongreject|FILE}`: a local causal LM answers a judge
  prompt, greedily, and its reply is parsed (judge_prompts.py). A FILE template holds `{goal}`
  and `{response}` and is parsed as `parser: llamaguard` (default) or `strongreject`.
Relative directories resolve against `base` (the suite file's folder, or the working folder).
Each kind is one entry of KINDS (its usage, fields, parse and load): adding a kind is adding one.

Every judge returns one Verdict per response: `complied` (None when an LLM judge's reply could
not be parsed; callers count those apart) and, for the StrongREJECT rubric, its 0-1 `score`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import JudgeError
from ..text.refusal import is_refusal
from .judge_prompts import PARSERS, TEMPLATES, Verdict, render_prompt

VERDICTS = {"complied": True, "unsafe": True, "refused": False, "safe": False}


@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # a key of KINDS
    path: Path | None = None
    labels: tuple[tuple[str, bool], ...] = ()
    template: str = ""  # a TEMPLATES name, or the text of a FILE template
    parser: str | None = None  # how the judge's replies are read (PARSERS); None: not replies
    input: str = "response"
    max_new_tokens: int = 256

    @property
    def judges_refusal(self) -> bool:
        """Whether `complied` means "answered": a LlamaGuard-style verdict says whether the
        response is harmful, which on a benign request says nothing about over-refusal."""
        return self.parser != "llamaguard"

    @property
    def scores(self) -> bool:
        return self.parser == "strongreject"

    @property
    def parses(self) -> bool:
        """Whether a verdict comes from parsing a reply, which can fail (complied None)."""
        return self.parser is not None


def _directory(value, base: Path, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise JudgeError(f"judge `{key}`: must be a model directory, got {value!r}")
    path = (base / value).resolve()
    if not path.is_dir():
        raise JudgeError(f"judge `{key}`: no such model directory {path}")
    return path


def _labels(value) -> tuple[tuple[str, bool], ...]:
    if not isinstance(value, dict) or not value:
        raise JudgeError("judge `labels`: must map the classifier's labels to complied or refused, "
                         "e.g. {LABEL_1: complied, LABEL_0: refused}")
    out = []
    for label, verdict in value.items():
        if str(verdict).lower() not in VERDICTS:
            raise JudgeError(f"judge `labels`: {label!r} maps to {verdict!r}; use one of "
                             f"{', '.join(VERDICTS)}")
        out.append((str(label), VERDICTS[str(verdict).lower()]))
    if not any(v for _, v in out):
        raise JudgeError("judge `labels`: no label means complied")
    return tuple(out)


def _refusal(spec: dict, base: Path) -> JudgeSpec:
    return JudgeSpec("refusal")


def _classifier(spec: dict, base: Path) -> JudgeSpec:
    mode = spec.get("input", "response")
    if mode not in ("response", "pair"):
        raise JudgeError(f"judge `input`: must be response or pair, got {mode!r}")
    return JudgeSpec("classifier", _directory(spec["classifier"], base, "classifier"),
                     labels=_labels(spec.get("labels")), input=mode)


def _llm(spec: dict, base: Path) -> JudgeSpec:
    path = _directory(spec["llm"], base, "llm")
    template = spec.get("template")
    parser = spec.get("parser")
    if template in TEMPLATES:
        if parser not in (None, template):
            raise JudgeError(f"judge `parser`: the {template} template is parsed as {template}")
        parser, text = template, template
    elif isinstance(template, str) and (base / template).is_file():
        text = (base / template).read_text(encoding="utf-8")
        if "{response}" not in text:
            raise JudgeError(f"judge `template`: {base / template} has no {{response}} placeholder")
    else:
        raise JudgeError(f"judge `template`: {template!r} is neither {' nor '.join(TEMPLATES)} "
                         "nor a template file")
    parser = parser or "llamaguard"
    if parser not in PARSERS:
        raise JudgeError(f"judge `parser`: must be one of {', '.join(PARSERS)}, got {parser!r}")
    tokens = spec.get("max_new_tokens", 512 if parser == "strongreject" else 16)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise JudgeError(f"judge `max_new_tokens`: must be a positive integer, got {tokens!r}")
    return JudgeSpec("llm", path, template=text, parser=parser, max_new_tokens=tokens)


def parse_judge(spec, base: str | Path = ".") -> JudgeSpec:
    """Checks a judge spec (kind, directory, labels, template) without loading any model: a
    bare kind name (kinds without fields; None is `refusal`) or a mapping holding exactly one
    kind's key, read by that kind's entry of KINDS."""
    base = Path(base)
    spec = "refusal" if spec is None else spec
    if isinstance(spec, str) and spec in KINDS and KINDS[spec].fields is None:
        return KINDS[spec].parse({spec: None}, base)
    if not isinstance(spec, dict):
        raise JudgeError(f"unknown judge {spec!r}; use "
                         f"{_either([k.usage for k in KINDS.values()])}")
    keyed = [name for name, kind in KINDS.items() if kind.fields is not None]
    kinds = [k for k in keyed if k in spec]
    if len(kinds) != 1:
        raise JudgeError(f"judge {spec!r}: give exactly one of "
                         f"{_either([f'`{k}`' for k in keyed])}")
    known = KINDS[kinds[0]].fields | {kinds[0]}
    extra = sorted(set(spec) - known)
    if extra:
        raise JudgeError(f"judge: unknown field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
    return KINDS[kinds[0]].parse(spec, base)


def _either(options: list[str]) -> str:
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def judge_from_text(text: str) -> JudgeSpec:
    """A judge given on the command line: `refusal`, an inline YAML mapping such as
    `{llm: DIR, template: strongreject}`, or a YAML file holding one (its relative paths
    resolve against the file's folder; inline ones against the working folder)."""
    import yaml

    from ..errors import YamlRefused
    from ..safe_yaml import load_yaml

    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        try:
            return parse_judge(load_yaml(path.read_text(encoding="utf-8")), path.parent)
        except (yaml.YAMLError, UnicodeDecodeError, YamlRefused) as e:
            raise JudgeError(f"judge file {path}: not a judge spec ({e})") from None
    try:
        spec = load_yaml(text)
    except YamlRefused as e:  # YAML, but a key given twice or a bomb: not a judge's bare name
        raise JudgeError(f"judge {text[:100]!r}: {e}") from None
    except yaml.YAMLError:
        spec = text
    return parse_judge(spec)


def judge_name(spec: JudgeSpec) -> str:
    """How records and reports name the judge."""
    return KINDS[spec.kind].name(spec)


class RefusalJudge:
    def __call__(self, goals: list[str], responses: list[str]) -> list[Verdict]:
        return [Verdict(not is_refusal(r)) for r in responses]


class ClassifierJudge:
    def __init__(self, model, tokenizer, labels: dict[str, bool], pair: bool = False,
                 batch_size: int = 16):
        names = {str(i): str(n) for i, n in model.config.id2label.items()}
        unknown = [k for k in labels if k not in names and k not in names.values()]
        if unknown:
            raise JudgeError(f"judge `labels`: {', '.join(map(repr, unknown))} not among the "
                             f"classifier's labels {sorted(names.values())}")
        # label index -> verdict, whether the mapping named the label or its index
        self.verdicts = {int(i): labels.get(n, labels.get(i)) for i, n in names.items()}
        unmapped = [names[str(i)] for i, v in self.verdicts.items() if v is None]
        if unmapped:
            raise JudgeError(f"judge `labels`: no verdict for the classifier's label(s) "
                             f"{', '.join(unmapped)}")
        self.model, self.tokenizer, self.pair, self.batch_size = model, tokenizer, pair, batch_size
        self.accepted = inspect.signature(model.forward).parameters

    @torch.no_grad()
    def __call__(self, goals: list[str], responses: list[str]) -> list[Verdict]:
        out = []
        for i in range(0, len(responses), self.batch_size):
            texts = responses[i:i + self.batch_size]
            pairs = (goals[i:i + self.batch_size],) if self.pair else ()
            batch = self.tokenizer(*pairs, texts, padding=True, truncation=True, max_length=512,
                                   return_tensors="pt").to(self.model.device)
            # a generic fast tokenizer emits token_type_ids, which decoder models reject
            batch = {k: v for k, v in batch.items() if k in self.accepted}
            predicted = self.model(**batch).logits.argmax(-1).tolist()
            out += [Verdict(self.verdicts[p]) for p in predicted]
        return out


class LLMJudge:
    """`generate(list of chat prompts) -> replies`; the tests pass a scripted one."""

    def __init__(self, generate, template: str, parser: str):
        self.generate, self.template, self.parse = generate, template, PARSERS[parser]

    def __call__(self, goals: list[str], responses: list[str]) -> list[Verdict]:
        prompts = [render_prompt(self.template, g, r) for g, r in zip(goals, responses)]
        return [self.parse(reply) for reply in self.generate(prompts)]


def _pretrained(spec: JudgeSpec, auto, device):
    """The judge's model, by the transformers Auto class named `auto`, on `device` in eval
    mode, and its tokenizer, padding with the end token when it has no pad token. Never with
    the checkpoint's own code: --trust_remote_code is given for the target model, and a judge
    directory named by a suite (a file anyone may hand over) must not run code with it."""
    import transformers  # only model judges need it

    try:
        model = getattr(transformers, auto).from_pretrained(
            spec.path, trust_remote_code=False, use_safetensors=True).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise JudgeError(f"judge {spec.kind} {spec.path}: cannot load ({e})") from None
    if tokenizer.pad_token is None:  # batches are padded; many causal LMs ship no pad token
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _load_classifier(spec: JudgeSpec, batch_size: int, device):
    model, tokenizer = _pretrained(spec, "AutoModelForSequenceClassification", device)
    return ClassifierJudge(model, tokenizer, dict(spec.labels), spec.input == "pair", batch_size)


def _load_llm(spec: JudgeSpec, batch_size: int, device):
    model, tokenizer = _pretrained(spec, "AutoModelForCausalLM", device)
    if not tokenizer.chat_template:
        raise JudgeError(f"judge llm {spec.path}: the tokenizer has no chat template; the judge "
                         "prompt is sent as a chat turn")
    from ..text.generation import generate

    def run(prompts):
        # long prompt budget: the rubric and the response must both survive truncation
        return generate(model, tokenizer, prompts, spec.max_new_tokens, batch_size,
                        max_prompt_tokens=4096, desc="judge")
    return LLMJudge(run, spec.template, spec.parser)


@dataclass(frozen=True)
class JudgeKind:
    """One kind of judge: what a spec may hold, how it is checked and how it is loaded. A new
    kind is one entry of KINDS; parse_judge, load_judge and judge_name read nothing else."""
    usage: str  # how error messages show the spec
    parse: Callable[[dict, Path], JudgeSpec]  # the mapping (with the kind's key) and base folder
    load: Callable  # (spec, batch_size, device) -> judge
    # mapping fields besides the kind's own key; None: the kind is given by its bare name
    fields: frozenset | None = None
    name: Callable[[JudgeSpec], str] = lambda spec: f"{spec.kind}:{spec.path}"


KINDS: dict[str, JudgeKind] = {
    "refusal": JudgeKind("refusal", _refusal, lambda *args: RefusalJudge(), name=lambda spec: "refusal"),
    "classifier": JudgeKind("{classifier: DIR, labels: ...}", _classifier, _load_classifier,
                            frozenset({"labels", "input"})),
    "llm": JudgeKind("{llm: DIR, template: llamaguard|strongreject|FILE}", _llm, _load_llm,
                     frozenset({"template", "parser", "max_new_tokens"}),
                     name=lambda spec: f"llm:{spec.path} ({spec.parser})"),
}


def load_judge(spec: JudgeSpec, batch_size: int = 16, device: str | torch.device | None = None):
    """The judge for a checked spec; model judges are loaded onto `device` (default: CUDA when
    there is one) in eval mode, never with their checkpoint's own code (see _pretrained)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return KINDS[spec.kind].load(spec, batch_size, device)
