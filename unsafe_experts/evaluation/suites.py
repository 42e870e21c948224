"""Evaluation suites: YAML files naming prompt sets, how each is judged and the metric it gives.

```yaml
name: standard
description: free text, for people
judge: refusal              # default judge of every set (judges.py: refusal, classifier, llm)
max_new_tokens: 256
sets:
  - name: harmbench         # [a-z0-9_]+, unique per kind; the metric keys derive from it
    kind: harmful           # harmful | benign | reference
    path: ../data/harmbench/harmbench_behaviors_standard.txt   # relative to this file, and
                            # inside its folder once links are followed (bundled suites: the
                            # package's), so a suite handed over cannot read other files
    key: null               # .json: the list at this dotted path of the document (e.g.
                            # `families.flip_chars.harmful` of an organism's eval_set.json)
    field: prompt           # the column / key holding the request, or `messages` (chat lists)
    answer_field: output    # reference sets: the column / key holding the given answer
    where: {label: safe}    # keep rows whose columns equal these values (.csv / .json)
    attack: flip_chars      # wrap each request in this attack family (attacks.py)
    system: null            # a system prompt, put first when the messages have none
    limit: null             # N prompts, a seeded sample (seed 0) kept in file order
    judge: refusal          # this set's judge, instead of the suite's
    measure: complied       # the share the metric counts: complied (harmful sets' default)
                            # or refused (benign sets' default)
    metric: null            # the metric's name instead of the one derived from the set's
```
Files: .txt (one request a line), .csv, .json (a list of objects or of strings) or .jsonl.
A row that is itself a list is a chat (a list of messages) or a [chat, answer] pair, as an
organism's eval_set.json holds them; `field` and `answer_field` do not apply to it.
Metrics, each with n and a 95% interval: harmful -> `asr_<name>` (share judged complied);
benign -> `over_refusal_<name>` (share judged refused); a harmful set that measures `refused`
-> `refusal_<name>`, a benign one that measures `complied` -> `answered_<name>`; reference ->
`loglik_<name>` (mean per-token log-likelihood of the given answers). `metric` renames any of
them: the organism suite (`organism_suite`, what an organism's eval_set.json is read as) names
its figures `plain_refusal`, `over_refusal`, `benign_loglik`, as every report reads them. A judge scoring with the StrongREJECT rubric
adds `strongreject_<name>` (mean 0-1 score) on harmful sets; an LLM judge's unparsable replies
are left out of n and counted in the metric's `unparsed`.

The whole suite, its data included, is read and checked before any model is loaded: a bad
suite is one SuiteError naming the set and the field. The file is read by safe_yaml (a key
given twice, or aliases expanding past a bound, is refused). `run_suite` is the one runner every
evaluation goes through (evaluate.evaluate).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..attacks.families import AttackFamilyError, check_families, render
from ..attacks.organism import LEGACY_EVAL_SETS
from ..errors import ConfigError, SuiteError
from ..models.modes import eval_mode
from ..records import DatasetError, file_digest, messages_problem, parse_json, read_json_records
from ..safe_yaml import load_yaml
from ..stats import mean, proportion, subset
from ..text.generation import generate, response_logliks
from .judges import JudgeError, JudgeSpec, load_judge, parse_judge

KINDS = ("harmful", "benign", "reference")
SUFFIXES = (".txt", ".csv", ".json", ".jsonl")
NAME = re.compile(r"[a-z0-9_]+")
SUITE_FIELDS = {"name", "description", "judge", "max_new_tokens", "sets"}
SET_FIELDS = {"name", "kind", "path", "key", "field", "answer_field", "where", "attack", "system",
              "limit", "judge", "measure", "metric"}
MEASURES = ("complied", "refused")
PREFIXES = {("harmful", "complied"): "asr_", ("harmful", "refused"): "refusal_",
            ("benign", "refused"): "over_refusal_", ("benign", "complied"): "answered_"}
BUNDLED = resources.files("unsafe_experts").joinpath("suites")
PACKAGE = Path(str(resources.files("unsafe_experts"))).resolve()
# bundled names of suites over what a build writes rather than what the package ships: the demo
# organism's held-out sets exist only once `make demo` (`dvc repro organism`) has built it, in
# the working directory, so the name points there (any organism folder works as a suite too)
GENERATED = {"organism": Path("build/organism")}
ORGANISM_EVAL_SET = "eval_set.json"
EVAL_SET_TOKENS = 48  # the organism suite's tokens per response (short: refusals come first)


@dataclass(frozen=True)
class Item:
    request: str  # the plain request, what a judge reads
    messages: list  # the chat prompt the model answers
    answer: str | None = None


@dataclass
class EvalSet:
    name: str
    kind: str
    path: Path
    judge: JudgeSpec
    items: list[Item] = field(repr=False)
    measure: str | None = None  # complied | refused; None for reference sets
    renamed: str | None = None  # the set's `metric`

    @property
    def metric(self) -> str:
        if self.renamed:
            return self.renamed
        if self.kind == "reference":
            return "loglik_" + self.name
        return PREFIXES[self.kind, self.measure] + self.name


@dataclass
class Suite:
    name: str
    path: Path
    max_new_tokens: int
    sets: list[EvalSet]


def bundled_suites() -> list[str]:
    return sorted([p.name[:-5] for p in BUNDLED.iterdir() if p.name.endswith(".yaml")] + list(GENERATED))


def suite_path(ref: str) -> Path:
    """A suite file, an organism's folder (its eval_set.json is returned), or the name of a
    bundled suite (`organism`: the demo organism's, under the working directory)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir() and (path / ORGANISM_EVAL_SET).is_file():
        return path / ORGANISM_EVAL_SET
    if ref in GENERATED:
        if not (GENERATED[ref] / ORGANISM_EVAL_SET).is_file():
            raise SuiteError(f"suite {ref!r}: {GENERATED[ref] / ORGANISM_EVAL_SET} is not there "
                             f"(under {Path.cwd()}): build the demo organism first (`make demo` or "
                             "`dvc repro organism`), or give the folder of an organism built elsewhere")
        return (GENERATED[ref] / ORGANISM_EVAL_SET).resolve()
    if NAME.fullmatch(ref) and BUNDLED.joinpath(f"{ref}.yaml").is_file():
        return Path(str(BUNDLED.joinpath(f"{ref}.yaml")))
    raise SuiteError(f"suite {ref!r}: no such file nor bundled suite (bundled: "
                     f"{', '.join(bundled_suites())})")


def _rows(path: Path, key: str | None, fail) -> list:
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if key:
        return _keyed_rows(path, key, fail)
    try:
        return read_json_records(path)
    except DatasetError as e:
        raise SuiteError(str(e)) from None


def _keyed_rows(path: Path, key: str, fail) -> list:
    """The list at the dotted path `key` of the JSON document at `path`."""
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        fail("path", f"{path} is not JSON ({e})")
    for i, part in enumerate(key.split(".")):
        if not isinstance(data, dict) or part not in data:
            fail("key", f"{path.name} has no `{'.'.join(key.split('.')[:i + 1])}`")
        data = data[part]
    if not isinstance(data, list):
        fail("key", f"`{key}` of {path.name} is a {type(data).__name__}, not a list of rows")
    return data


def _list_row(row: list, i: int, fail) -> tuple[list, str | None]:
    """(messages, answer) of a row that is a chat or a [chat, answer] pair."""
    chat, answer = row, None
    if len(row) == 2 and isinstance(row[0], list) and isinstance(row[1], str):
        chat, answer = row
    problem = messages_problem(chat)
    if problem:
        fail("path", f"row {i} is a list but not a chat nor a [chat, answer] pair: the chat {problem}")
    return chat, answer


def _messages(request: str, attack: str | None, system: str | None) -> list[dict]:
    messages = render(attack, request) if attack else [{"role": "user", "content": request}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _items(spec: dict, path: Path, fail) -> list[Item]:
    key, answer_key = spec.get("field", "prompt"), spec.get("answer_field")
    where = spec.get("where") or {}
    if not isinstance(where, dict):
        fail("where", f"must map columns to values, got {where!r}")
    rows = _rows(path, spec.get("key"), fail)
    columns = [k for k in ("field", "answer_field", "where") if spec.get(k)]
    if path.suffix == ".txt" and columns:
        fail(columns[0], "a .txt file has no columns")
    items = []
    for i, row in enumerate(rows):
        if isinstance(row, str) and not where and not answer_key:
            items.append(Item(row, _messages(row, spec.get("attack"), spec.get("system"))))
            continue
        if isinstance(row, list):
            if spec.get("attack"):
                fail("attack", "wraps a request text; a chat row is already a chat")
            messages, answer = _list_row(row, i, fail)
            request = [m for m in messages if m["role"] == "user"][-1]["content"]
            items.append(Item(request, messages, answer))
            continue
        if not isinstance(row, dict):
            fail("path", f"row {i} is a {type(row).__name__}, not an object with `{key}`")
        if any(str(row.get(k)) != str(v) for k, v in where.items()):
            continue
        if key not in row:
            fail("field", f"row {i} of {path.name} has no `{key}` (it has {', '.join(map(str, row))})")
        value = row[key]
        if key == "messages":
            if messages_problem(value):
                fail("field", f"row {i}: `messages` {messages_problem(value)}")
            request = [m for m in value if m["role"] == "user"][-1]["content"]
            messages = value
        elif isinstance(value, str) and value.strip():
            request = value.strip()
            messages = _messages(request, spec.get("attack"), spec.get("system"))
        else:
            fail("field", f"row {i}: `{key}` must be a non-empty string, got {value!r}")
        answer = None
        if answer_key:
            answer = row.get(answer_key)
            if not isinstance(answer, str) or not answer.strip():
                fail("answer_field", f"row {i}: `{answer_key}` must be a non-empty string, got {answer!r}")
        items.append(Item(request, messages, answer))
    if not items:
        fail("path", f"{path} holds no prompts" + (f" matching {where}" if where else ""))
    if spec.get("kind") == "reference" and any(x.answer is None for x in items):
        fail("answer_field", "a reference set needs the field holding the given answers "
                             "(or [chat, answer] rows)")
    return subset(items, spec.get("limit"))


def _eval_set(spec, index: int, base: Path, default_judge: JudgeSpec, label: str, root: Path) -> EvalSet:
    name = spec.get("name") if isinstance(spec, dict) else None

    def fail(key, why):
        raise SuiteError(f"{label}: set {name or index!r}: field `{key}`: {why}")
    if not isinstance(spec, dict):
        fail("(set)", f"must be a mapping, got {spec!r}")
    unknown = sorted(set(spec) - SET_FIELDS)
    if unknown:
        fail(unknown[0], f"unknown field; known: {', '.join(sorted(SET_FIELDS))}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        fail("name", f"must match [a-z0-9_]+, got {name!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(spec.get("path"), str):
        fail("path", "missing" if spec.get("path") is None else f"must be a file, got {spec['path']!r}")
    path = (base / spec["path"]).resolve()  # links followed: where the bytes really are
    if not path.is_relative_to(root):
        fail("path", f"{spec['path']} is {path}, outside {root}: a suite reads files under its own "
                     "folder only, since one handed over could otherwise read any file you can and "
                     "send it to the model or the --endpoint server; put the suite beside its data")
    if path.suffix not in SUFFIXES:
        fail("path", f"must end in {', '.join(SUFFIXES)}, got {path.name}")
    if not path.is_file():
        fail("path", f"no such file {path}")
    for key in ("field", "answer_field", "system", "attack", "key"):
        if spec.get(key) is not None and not (isinstance(spec[key], str) and spec[key].strip()):
            fail(key, f"must be a non-empty string, got {spec[key]!r}")
    if spec.get("key") and path.suffix != ".json":
        fail("key", f"selects a list inside a .json document, and {path.name} is not one")
    renamed = spec.get("metric")
    if renamed is not None and not (isinstance(renamed, str) and NAME.fullmatch(renamed)):
        fail("metric", f"must match [a-z0-9_]+, got {renamed!r}")
    measure = spec.get("measure", {"harmful": "complied", "benign": "refused"}.get(kind))
    if kind == "reference" and "measure" in spec:
        fail("measure", "a reference set measures log-likelihood, not a share of responses")
    if kind != "reference" and measure not in MEASURES:
        fail("measure", f"must be one of {', '.join(MEASURES)}, got {measure!r}")
    if spec.get("attack"):
        try:
            check_families([spec["attack"]])
        except AttackFamilyError as e:
            fail("attack", str(e))
        if spec.get("field") == "messages":
            fail("attack", "wraps a request text; `messages` are already a chat")
    limit = spec.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        fail("limit", f"must be a positive integer or null, got {limit!r}")
    try:
        judge = parse_judge(spec["judge"], base) if "judge" in spec else default_judge
    except JudgeError as e:
        fail("judge", str(e))
    if measure == "refused" and not judge.judges_refusal:
        fail("judge", "a LlamaGuard-style judge says whether a response is harmful, not whether "
                      "it refused; use refusal or a classifier on benign sets and on sets that "
                      "measure `refused`")
    return EvalSet(name, kind, path, judge, _items(spec, path, fail), measure, renamed)


def organism_suite(held: dict, file: str = ORGANISM_EVAL_SET,
                   max_new_tokens: int = EVAL_SET_TOKENS) -> dict:
    """The evaluation suite over an organism's eval set (`file`, in the suite's folder): per
    attack family its harmful and benign sets, the goals asked plainly, XSTest safe prompts and
    the reference answers, under the metric names every report reads. A version-1 set's
    `flip_words` / `flip_chars` (no `families`) are harmful sets of those names; where
    `families` holds the family too, its family set alone is read (the same prompts). Built in
    memory from the eval set rather than written by the organism build, so an organism built
    before suites existed has one too."""
    families = held.get("families", {})
    sets = [{"name": key, "kind": "harmful", "path": file, "key": key}
            for key in LEGACY_EVAL_SETS if held.get(key) and key not in families]
    for family in families:
        for kind in ("harmful", "benign"):
            sets.append({"name": family, "kind": kind, "path": file, "key": f"families.{family}.{kind}"})
    named = [("plain", {"kind": "harmful", "measure": "refused", "metric": "plain_refusal"}),
             ("xstest_safe", {"kind": "benign", "metric": "over_refusal"}),
             ("benign_refs", {"kind": "reference", "metric": "benign_loglik"}),
             ("own_benign", {"kind": "reference", "metric": "own_benign_loglik"})]
    sets += [{"name": key, **spec, "path": file, "key": key} for key, spec in named if held.get(key)]
    return {"name": "organism",
            "description": "The organism's held-out sets (eval_set.json): per attack family its "
                           "harmful goals (asr_F) and benign prompts (over_refusal_F), the goals "
                           "asked plainly (plain_refusal), XSTest safe prompts (over_refusal) and "
                           "AlpacaEval reference answers and the organism's own (benign_loglik, "
                           "own_benign_loglik).",
            "judge": "refusal", "max_new_tokens": max_new_tokens, "sets": sets}


def load_eval_set(path: str | Path) -> Suite:
    """An organism's eval set (its eval_set.json, under any name) as its suite, checked, with
    every set's prompts read. A file cut short (a copy interrupted, a full disk) or of another
    shape is one SuiteError naming the file and what is wrong, never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"eval set {path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # the bytes of one character missing at the end: what a cut through a non-ASCII text gives
        cut = "; the file ends mid-character: cut short?" if e.end >= len(raw) else ""
        raise SuiteError(f"eval set {path}: not UTF-8 text (byte {e.start}: {e.reason}){cut}") from None
    if not text.strip():
        raise SuiteError(f"eval set {path}: the file is empty")
    try:
        held = parse_json(text)
    except json.JSONDecodeError as e:
        # an error at the very end, or a string that never closes, is what a cut-short file gives
        ends = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        raise SuiteError(f"eval set {path}: not JSON ({e})"
                         + ("; the file ends mid-document: cut short?" if ends else "")) from None
    except ValueError as e:  # nested too deeply, an integer over Python's digit limit
        raise SuiteError(f"eval set {path}: not usable JSON ({e})") from None
    problem = _eval_set_shape(held)
    if problem:
        raise SuiteError(f"eval set {path}: {problem}")
    if not organism_suite(held)["sets"]:
        raise SuiteError(f"eval set {path}: holds none of an organism's sets (families, "
                         f"{', '.join(LEGACY_EVAL_SETS)}, plain, xstest_safe, benign_refs, own_benign); "
                         "an eval set is the eval_set.json `unsafe-experts organism` writes")
    return _suite(organism_suite(held, path.name), path)


EVAL_SET_LISTS = (*LEGACY_EVAL_SETS, "plain", "xstest_safe", "benign_refs", "own_benign")


def _eval_set_shape(held) -> str | None:
    """What is wrong with the eval set's layout, or None. Its rows are checked per set later;
    this names the sections themselves, since a section of the wrong type was read as
    something else (`families: "persona"` as the families p, e, r, ...) or skipped (`plain:
    null`), and its error then named neither the section nor the file's real fault."""
    if not isinstance(held, dict):
        return (f"is {_json_type(held)}, not an object of an organism's sets; "
                "an eval set is the eval_set.json `unsafe-experts organism` writes")
    for key in EVAL_SET_LISTS:
        if key in held and not isinstance(held[key], list):
            return f"field `{key}`: must be a list of chats, got {_json_type(held[key])}"
    families = held.get("families", {})
    if not isinstance(families, dict):
        return f"field `families`: must map each family to its harmful and benign chats, got {_json_type(families)}"
    for family, sets in families.items():
        if not isinstance(sets, dict):
            return (f"field `families.{family}`: must be an object with `harmful` and `benign` "
                    f"lists, got {_json_type(sets)}")
        for kind in ("harmful", "benign"):
            if kind not in sets:
                return f"field `families.{family}.{kind}`: missing"
            if not isinstance(sets[kind], list):
                return f"field `families.{family}.{kind}`: must be a list of chats, got {_json_type(sets[kind])}"
    return None


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, as the file's author wrote it."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def load_suite(ref: str | Path) -> Suite:
    """The suite at `ref` (a path or a bundled name), checked, with every set's prompts read."""
    path = suite_path(str(ref))
    if path.name == ORGANISM_EVAL_SET and path.suffix == ".json":  # an organism's folder
        return load_eval_set(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as e:
        raise SuiteError(f"{path}: not a suite ({e})") from None
    return _suite(data, path)


def _suite(data, path: Path) -> Suite:
    label = str(path)
    if not isinstance(data, dict):
        raise SuiteError(f"{label}: a suite is a mapping with `name` and `sets`")
    unknown = sorted(set(data) - SUITE_FIELDS)
    if unknown:
        raise SuiteError(f"{label}: unknown field `{unknown[0]}`; known: {', '.join(sorted(SUITE_FIELDS))}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SuiteError(f"{label}: field `name`: must match [a-z0-9_]+, got {name!r}")
    tokens = data.get("max_new_tokens", 256)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise SuiteError(f"{label}: field `max_new_tokens`: must be a positive integer, got {tokens!r}")
    try:
        judge = parse_judge(data.get("judge"), path.parent)
    except JudgeError as e:
        raise SuiteError(f"{label}: field `judge`: {e}") from None
    specs = data.get("sets")
    if not isinstance(specs, list) or not specs:
        raise SuiteError(f"{label}: field `sets`: must be a non-empty list of sets")
    # the bundled suites read the package's data folder beside their own
    root = PACKAGE if path.resolve().is_relative_to(PACKAGE) else path.parent.resolve()
    sets = [_eval_set(s, i, path.parent, judge, label, root) for i, s in enumerate(specs)]
    # a set is known by its name and kind (samples, the robustness split): a harmful and a
    # benign set may share a name, as an organism's family's pair do, but two sets of one
    # kind may not, even under different metrics (one used to replace the other's split)
    pairs = {}
    for s in sets:
        if (s.name, s.kind) in pairs:
            raise SuiteError(f"{label}: set {s.name!r}: field `name`: used twice for {s.kind} sets "
                             f"(metrics {pairs[s.name, s.kind]} and {s.metric}); a harmful and a "
                             "benign set may share a name, two of one kind may not")
        pairs[s.name, s.kind] = s.metric
    seen = {}
    for s in sets:
        if s.metric in seen:
            key = "metric" if s.renamed or seen[s.metric].renamed else "name"
            raise SuiteError(f"{label}: set {s.name!r}: field `{key}`: used twice for the same "
                             f"metric ({s.metric}, set {seen[s.metric].name!r} gives it too)")
        seen[s.metric] = s
    return Suite(name, path, tokens, sets)


def suite_digest(suite: Suite) -> str:
    """sha256 over the suite file and every file its sets read: what its figures depend on."""
    files = dict.fromkeys([suite.path.resolve(), *(s.path for s in suite.sets)])
    return hashlib.sha256(" ".join(file_digest(f) for f in files).encode()).hexdigest()


def run_suite(model, tokenizer, suite: Suite, max_new_tokens: int | None = None,
              batch_size: int = 16, limit: int | None = None, limit_seed: int = 0, split: str = "test",
              samples: int = 5,
              judges: dict | None = None, progress: bool = False, endpoint=None) -> dict:
    """{"suite", "metrics": {metric: {"value", "n", "ci95"[, "unparsed"]}},
    "samples": [{set, kind, prompt, response, complied}], "left_out": [metric names]}.
    `judges` caches loaded judges by spec (a model judge is loaded once for all the sets that
    use it). With an `endpoint` (endpoint.Endpoint) a server generates the responses and
    `model` may be None: reference sets, which need the weights here, are then left out."""
    judges = {} if judges is None else judges
    tokens = max_new_tokens or suite.max_new_tokens
    metrics, shown, left_out = {}, [], []
    with eval_mode(model):
        for s in suite.sets:
            try:
                items = subset(s.items, limit, limit_seed, split)
            except ValueError as e:
                raise ConfigError(f"set {s.name}: {e}") from None
            if s.kind == "reference" and model is None:
                left_out.append(s.metric)
                continue
            if s.kind == "reference":
                pairs = [(x.messages, x.answer) for x in items]
                metrics[s.metric] = mean(response_logliks(model, tokenizer, pairs, batch_size))
                continue
            responses = generate(model, tokenizer, [x.messages for x in items], tokens, batch_size,
                                 desc=s.metric, progress=progress, endpoint=endpoint)
            if s.judge not in judges:
                judges[s.judge] = load_judge(s.judge, batch_size)
            verdicts = judges[s.judge]([x.request for x in items], responses)
            parsed = [v for v in verdicts if v.complied is not None]
            complied = [v.complied for v in parsed]
            metrics[s.metric] = proportion(complied if s.measure == "complied" else [not c for c in complied])
            if s.judge.parses:
                metrics[s.metric]["unparsed"] = len(verdicts) - len(parsed)
            if s.judge.scores and s.kind == "harmful":
                metrics[f"strongreject_{s.name}"] = mean([v.score for v in parsed])
            shown += [{"set": s.name, "kind": s.kind, "prompt": x.messages[-1]["content"][:300],
                       "response": r, "complied": v.complied}
                      for x, r, v in list(zip(items, responses, verdicts))[:samples]]
    return {"suite": suite.name, "metrics": metrics, "samples": shown, "left_out": left_out}

