"""Whether this machine's `make demo` landed inside the range measured over organism builds.

An organism built with another seed, or on another CPU (float order), is another organism, and
the demo's repair of it gives other figures. docs/expected_demo.json holds, for the demo's two
headline figures, the range over the builds measured so far (each build's run of the demo's own
command: `make compare`'s gradient-k4-s42 on every organism build):

    python scripts/expected_demo.py                  # check metrics/after.json (make demo)
    python scripts/expected_demo.py --measure        # rewrite docs/expected_demo.json from the
                                                     # comparison's runs (after `make compare`)

A figure outside the range is reported, not an error: it says this machine built an organism
unlike the ones measured, which is a finding about the method's spread, not a broken run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unsafe_experts.artefacts.atomic import write_json_atomic  # noqa: E402
from unsafe_experts.evaluation.headline import headline_figures, surgery_family  # noqa: E402

EXPECTED = Path("docs/expected_demo.json")
DEMO_RUN = "gradient-k4-s42-plain-lr0.001"  # the comparison run whose command is the demo's
FIGURES = {  # key -> how the README and `report` word it
    "asr_surgery_family": "surgery-family ASR",
    "over_refusal_mean_families": "benign in attack formats refused, mean over families",
}
# the same two figures under the headline's names (metrics/after.json, headline.py)
HEADLINE = {"asr_surgery_family": "asr_surgery", "over_refusal_mean_families": "refused_mean"}


class Bad(Exception):
    """Input this script cannot read: one `error:` line, exit status 2."""


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Bad(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Bad(f"{path}: not readable JSON ({what}): {e}") from None


def figures(headline: dict, source: str) -> dict[str, float]:
    """The two figures from headline figures (headline.py's names)."""
    try:
        return {key: float(headline[name]) for key, name in HEADLINE.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise Bad(f"{source}: no headline figure {e}") from None


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(compare_dir: Path, build_dir: Path) -> dict:
    """Each organism build's run of the demo's command, and the range over them."""
    builds = []
    for run in sorted(compare_dir.glob(f"*/{DEMO_RUN}/training_metadata.json")):
        organism = run.parent.parent.name
        meta = read_json(run, "a comparison run")
        if meta.get("status") != "completed" or "final" not in meta.get("evaluation", {}):
            continue  # an unfinished run measures nothing
        config = read_json(build_dir / organism / "build.json", "the organism's build record").get("config", {})
        values = {name: m["value"] for name, m in meta["evaluation"]["final"].items()}
        found = headline_figures(values, surgery_family(build_dir / organism / "model"))
        builds.append({"organism": organism, "organism_seed": config.get("seed"),
                       **{k: round(v, 4) for k, v in figures(found, str(run)).items()}})
    if len(builds) < 2:
        raise Bad(f"{compare_dir}: {len(builds)} finished {DEMO_RUN} run(s); a range needs at least two builds")
    n = len(builds)
    return {
        "what": f"the range of make demo's figures over {n} organism builds (seeds), each the demo's "
                f"own command ({DEMO_RUN}); another CPU builds yet another organism",
        "machine": machine(),
        # for exchangeable builds, a new one falls outside the min-max of n with chance 2/(n+1)
        "chance_a_new_build_falls_outside": round(2 / (n + 1), 3),
        **{k: {"min": min(b[k] for b in builds), "max": max(b[k] for b in builds)} for k in FIGURES},
        "builds": builds,
    }


def check(expected: dict, observed: dict[str, float], path: Path) -> list[str]:
    try:
        ranges = {k: (float(expected[k]["min"]), float(expected[k]["max"])) for k in FIGURES}
        n = len(expected["builds"])
    except (KeyError, TypeError, ValueError) as e:
        raise Bad(f"{path}: malformed ({e!r} missing or not a number)") from None
    lines = [f"This machine's demo against the range over {n} organism builds ({path}):"]
    outside = []
    for key, label in FIGURES.items():
        low, high = ranges[key]
        inside = low - 1e-9 <= observed[key] <= high + 1e-9
        outside += [] if inside else [label]
        lines.append(f"  {label:<54} {observed[key]:.3f}  {'inside' if inside else 'OUTSIDE'} "
                     f"[{low:.3f}, {high:.3f}]")
    if outside:
        lines += [f"  Outside the measured builds: {', '.join(outside)}.",
                  f"  This machine built another organism; a new build falls outside with chance about "
                  f"{expected.get('chance_a_new_build_falls_outside', '?')}",
                  "  (README, \"Claims over builds\")."]
    return lines


def refuse_foreign(path: Path) -> None:
    """--measure replaces only an earlier range file: never a link (it would be replaced, the
    user's link lost) nor a file of something else."""
    if path.is_symlink():
        raise Bad(f"{path}: is a symbolic link; not replaced (give the range file's own path)")
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and "builds" in earlier):
            raise Bad(f"{path}: exists and is not an expected-demo range; not overwritten")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path, default=Path("metrics/after.json"),
                        help="the demo's headline figures after surgery (dvc stage train)")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--measure", action="store_true",
                        help="rewrite --expected from the comparison's runs instead of checking")
    parser.add_argument("--compare_dir", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--build_dir", type=Path, default=Path("build"))
    args = parser.parse_args(argv)
    try:
        if args.measure:
            refuse_foreign(args.expected)
            result = measure(args.compare_dir, args.build_dir)
            # replaced whole, never written through: a link at the path is replaced, not followed
            write_json_atomic(args.expected, result)
            print(f"wrote {args.expected}: {len(result['builds'])} builds")
            return 0
        headline = read_json(args.metrics, "make demo's headline figures after surgery")
        if not isinstance(headline, dict):
            raise Bad(f"{args.metrics}: expected an object of headline figures")
        observed = figures(headline, str(args.metrics))
        print("\n".join(check(read_json(args.expected, "the expected range"), observed, args.expected)))
    except Bad as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
