"""The engine's exceptions live in one module, all under UserError (what the CLI catches), each
keeping the built-in base it had, so no `except` elsewhere changed meaning."""
import ast
import inspect
from pathlib import Path

import pytest

from unsafe_experts import errors

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]


def test_no_engine_module_but_errors_defines_an_exception():
    stray = []
    for path in sorted((ROOT / "unsafe_experts").rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                stray.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert stray == []


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_engine_error_is_a_user_error(cls):
    assert issubclass(cls, errors.UserError)


@pytest.mark.parametrize("name, builtin", [
    ("ConfigError", ValueError), ("DatasetError", ValueError), ("ExampleError", ValueError),
    ("UnsupportedModelError", ValueError), ("ExpertSetError", ValueError),
    ("AttackFamilyError", ValueError), ("HarmonyError", ValueError),
    ("OutputDirBusyError", RuntimeError), ("NonFiniteLossError", FloatingPointError),
    ("DeltaError", errors.ConfigError), ("EndpointError", errors.ConfigError),
    ("SuiteError", errors.ConfigError), ("JudgeError", errors.ConfigError),
])
def test_each_keeps_the_base_it_had(name, builtin):
    assert issubclass(getattr(errors, name), builtin)


def test_the_cli_turns_any_user_error_into_one_line_and_status_2(monkeypatch, capsys):
    from cli import main as cli_main

    def boom(args):
        raise errors.SuiteError("suite 'x': no such set")

    monkeypatch.setattr(cli_main, "parser", lambda: (_FakeParser(), {"boom": boom}))
    assert cli_main.main(["boom"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: suite 'x': no such set"]


class _FakeParser:
    def parse_args(self, argv):
        import argparse
        return argparse.Namespace(command=argv[0])
