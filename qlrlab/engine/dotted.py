"""Dotted keys into nested mappings: ``optimizer.damping.initial`` addresses ``d["optimizer"]["damping"]["initial"]``.

Setting a key that does not exist is an error with close matches (typos are caught), except that
setting ``X.name`` of a component to a different name replaces the whole component by
``{"name": value}`` (a component swap).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any


def _set_path(
    data: dict[str, Any],
    parts: list[str],
    value: Any,
    *,
    strict: bool,
    root: str = "",
) -> None:
    """Set ``data[parts[0]][parts[1]]... = value``.

    With ``strict``, a missing intermediate or leaf key is an error (with close matches), except
    that setting ``name`` of a component replaces the component by ``{"name": value}``.
    """
    node: Any = data
    walked: list[str] = [root] if root else []
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise KeyError(f"{'.'.join(walked)} is not a mapping; cannot set {'.'.join(parts)}")
        if part not in node or node[part] is None:
            if strict and part not in node:
                raise KeyError(_unknown_key_msg(part, node, walked))
            # e.g. optimizer.curvature is None and we set optimizer.curvature.name
            if parts[i + 1] != "name" and strict:
                raise KeyError(
                    f"{'.'.join([*walked, part])} is null; set {'.'.join([*walked, part])}.name "
                    "first to choose a component"
                )
            node[part] = {}
        node = node[part]
        walked.append(part)
    leaf = parts[-1]
    if not isinstance(node, dict):
        raise KeyError(f"{'.'.join(walked)} is not a mapping; cannot set {leaf!r} in it")
    if leaf == "name" and "name" in node and node["name"] != value:
        node.clear()
        node["name"] = value
        return
    if strict and leaf not in node and node:
        raise KeyError(_unknown_key_msg(leaf, node, walked))
    node[leaf] = value


def _unknown_key_msg(key: str, node: Mapping[str, Any], walked: list[str]) -> str:
    where = ".".join(walked) or "the spec"
    close = difflib.get_close_matches(key, [str(k) for k in node], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown key {'.'.join([*walked, key])!r}{hint}; {where} has: {', '.join(map(str, node))}"
    )


def _get_path(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node
