"""The one YAML reader for files a user hands over (params.yaml, suites, judge specs).

PyYAML's safe_load builds no objects, but it still takes two things a file can abuse: a key
given twice keeps the last value silently (a set's `kind: harmful` then `kind: benign` scores
a harmful set as benign), and aliases let a few hundred bytes of nested `*a` name billions of
nodes, which any walk of the result (validation, JSON, a digest) then expands in memory.
Aliases stay allowed, because params.yaml merges its `run_defaults` anchor into every run,
but the document they expand to is bounded, as are its bytes; a duplicate key is refused.
"""
from __future__ import annotations

import yaml

from .errors import YamlRefused

MAX_BYTES = 2**20  # params and suites are a few kilobytes; prompts live in the files they name
MAX_NODES = 100_000  # the document with every alias expanded


def load_yaml(text: str):
    """The document in `text`, or YamlRefused naming the duplicate key (and its line) or the
    bound passed."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YamlRefused(f"over {MAX_BYTES // 1024} KiB; a parameters or suite file is far smaller")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlRefused("nested too deeply") from None
    finally:
        loader.dispose()


def _check(root: yaml.Node) -> None:
    """Duplicate keys of every mapping, and the expanded size, computed once per node (an
    alias is the same node object again, so the graph stays small while its size is counted
    as often as it is used)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that reaches itself counts once (the constructor refuses it)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise YamlRefused(f"key {key.value!r} given twice in one mapping (lines "
                                          f"{seen[key.tag, key.value] + 1} and "
                                          f"{key.start_mark.line + 1}); one value only")
                    seen[key.tag, key.value] = key.start_mark.line
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        if total > MAX_NODES:
            raise YamlRefused(f"expands to over {MAX_NODES:,} nodes (aliases of aliases); "
                              "write the values out")
        sizes[id(node)] = total
        return total

    size(root)
