"""Every exception the engine raises for something the user can fix, in one place.

`UserError` is the base the CLI catches (one `error:` line, exit status 2). Each class keeps the
built-in base it always had (ValueError, RuntimeError, FloatingPointError), so an `except
ValueError` anywhere still catches what it caught before.
"""
from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix: a bad flag, record, file, model or budget."""


class ConfigError(UserError, ValueError):
    """A run parameter, flag or file named by one is wrong."""


class DatasetError(UserError, ValueError):
    """A record of a jailbreak or retention file is missing a field or malformed."""


class ExampleError(UserError, ValueError):
    """A record cannot become a training example (e.g. nothing of it fits the length limit)."""


class UnsupportedModelError(UserError, ValueError):
    """A model class whose routers and experts the engine does not know."""


class ExpertSetError(UserError, ValueError):
    """An expert list names a layer or expert the model does not have."""


class AttackFamilyError(UserError, ValueError):
    """An attack family name that is not in the table."""


class HarmonyError(UserError, ValueError):
    """Messages the harmony rendering cannot express for the surgery (a role it has no use for)."""


class OutputDirBusyError(UserError, RuntimeError):
    """Another run holds the output folder's lock."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A NaN or inf loss: the run stops before any update is made from it."""


class DeltaError(ConfigError):
    """A delta checkpoint whose base is missing or differs from the one it was written against."""


class YamlRefused(ConfigError):
    """A user's YAML file refused before it is built: a key given twice, too large, or
    expanding past the bound once its aliases are followed (safe_yaml.py)."""


class EndpointError(ConfigError):
    """An OpenAI-compatible server that cannot be reached or answers out of form."""


class SuiteError(ConfigError):
    """An evaluation suite file that names a missing set, judge or metric."""


class JudgeError(ConfigError):
    """A judge spec that cannot be parsed or loaded."""
