"""Short text for reports: a phrase for a set of layers, one line for a long text.

A report names what was tracked in a phrase a person reads at a glance
(``"90 MLP projections in 30 blocks (mlp.gate_proj, mlp.up_proj, mlp.down_proj)"``) rather
than listing 90 module names; the full names stay in the stored stages and in ``studies.json``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["describe_layers", "one_line", "record_meta"]

#: ``<prefix>.<block number>.<role>``: the first dotted number in a module name is its block.
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<role>.+)$")
_MLP = ("mlp", "ffn", "feed_forward", "c_fc", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
_ATTENTION = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key")


def _kind(roles: Sequence[str]) -> str:
    """``"MLP projections"``, ``"attention projections"`` or ``"layers"`` for block roles."""

    def has(role: str, words: tuple[str, ...]) -> bool:
        parts = set(re.split(r"[._]", role)) | set(role.split("."))
        return any(w in parts for w in words)

    if roles and all(has(r, _MLP) and not has(r, _ATTENTION) for r in roles):
        return "MLP projections"
    if roles and all(has(r, _ATTENTION) and not has(r, _MLP) for r in roles):
        return "attention projections"
    return "layers"


def describe_layers(names: Sequence[str], max_roles: int = 6) -> str:
    """A phrase for tracked layers: how many, of what kind, in how many blocks.

    Module names ``<prefix>.<block>.<role>`` (``model.layers.7.mlp.up_proj``) are grouped by
    block number and role. When every block holds the same roles the phrase is
    ``"90 MLP projections in 30 blocks (mlp.gate_proj, mlp.up_proj, mlp.down_proj)"``;
    otherwise each role is counted (``"mlp.c_fc ×2, lm_head"``). Names outside numbered
    blocks are listed after ``"plus"``.

    Args:
        names: Tracked module names, in model order.
        max_roles: Roles listed before the rest is summarised as ``"… (k more)"``.

    Returns:
        The phrase (``"no layers"`` when ``names`` is empty).

    Example:
        >>> describe_layers([f"h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")])
        '4 MLP projections in 2 blocks (mlp.c_fc, mlp.c_proj)'
    """
    names = list(names)
    if not names:
        return "no layers"
    blocks: dict[str, list[str]] = {}  # block → roles in it
    roles: list[str] = []  # distinct roles, first-seen order
    other: list[str] = []
    for name in names:
        m = _BLOCK.match(name)
        if m is None:
            other.append(name)
            continue
        block, role = f"{m['prefix']}.{m['block']}", m["role"]
        blocks.setdefault(block, []).append(role)
        if role not in roles:
            roles.append(role)
    if not blocks:
        return _listed(f"{len(names)} layers", names, max_roles)
    count = sum(len(r) for r in blocks.values())
    uniform = all(sorted(r) == sorted(roles) for r in blocks.values())
    if uniform:
        shown = roles
    else:
        per_role = {r: sum(rs.count(r) for rs in blocks.values()) for r in roles}
        shown = [f"{r} ×{k}" for r, k in per_role.items()]
    n_blocks = len(blocks)
    head = f"{count} {_kind(roles)} in {n_blocks} block{'s' if n_blocks != 1 else ''}"
    phrase = _listed(head, shown, max_roles)
    if other:
        extra = ", ".join(other[:max_roles])
        if len(other) > max_roles:
            extra += f", … ({len(other) - max_roles} more)"
        phrase += f", plus {extra}"
    return phrase


def _listed(head: str, items: Sequence[str], max_items: int) -> str:
    """``head (a, b, c)``, the list cut after ``max_items``."""
    items = list(items)
    shown = ", ".join(items[:max_items])
    if len(items) > max_items:
        shown += f", … ({len(items) - max_items} more)"
    return f"{head} ({shown})"


def one_line(text: str, width: int = 80) -> str:
    """``text`` on one line (newlines as ``⏎``, runs of spaces collapsed), cut to ``width``.

    Example:
        >>> one_line("a  b\\nc", 4)
        'a b…'
    """
    flat = re.sub(r"[ \t]+", " ", text.replace("\r", "").replace("\n", " ⏎ ")).strip()
    return flat if len(flat) <= width else flat[: max(width - 1, 0)].rstrip() + "…"


def record_meta(record: dict) -> dict[str, str]:
    """A record's metadata as strings: every field except the text, without empty values
    (``None``, ``""``), so that a record without metadata shows no chips."""
    return {
        k: str(v)
        for k, v in record.items()
        if k not in ("text", "prompt", "completion", "messages", "contrast")
        and v is not None
        and str(v).strip() != ""
    }
