"""One CLI convention: every command is a module of cli/ with add_parser(sub) and run(args), and
cli/main.py's COMMANDS table registers each such module (adding a command = one module + one
table entry)."""
import ast
from pathlib import Path

from cli.main import COMMANDS, parser

ROOT = Path(__file__).resolve().parents[1]


def defines_add_parser(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(isinstance(node, ast.FunctionDef) and node.name == "add_parser" for node in tree.body)


def test_every_command_module_has_add_parser_and_run():
    for command in COMMANDS:
        assert callable(getattr(command, "add_parser", None)), command.__name__
        assert callable(getattr(command, "run", None)), command.__name__


def test_every_cli_module_that_adds_a_parser_is_in_the_table():
    modules = {f"cli.{p.stem}" for p in sorted((ROOT / "cli").glob("*.py")) if defines_add_parser(p)}
    assert modules == {command.__name__ for command in COMMANDS}


def test_each_module_adds_one_command_and_each_command_has_its_run():
    p, handlers = parser()
    assert list(handlers) == list(p._subparsers._group_actions[0].choices)
    assert list(handlers.values()) == [command.run for command in COMMANDS]
