"""Ray node-label selectors (resources.engine_label_selector, resources.cpu_label_selector):
their syntax, checked with the config, and whether a node's labels satisfy one.

A selector maps a label key to an expression, as Ray's ``label_selector`` option takes it (Ray
2.49+, ``ray/_private/label_utils.py``): ``"v"`` (the node's value is v), ``"!v"`` (is not v),
``"in(a,b)"`` (is one of them), ``"!in(a,b)"`` (is none of them). A node without the key fails
the first two positive forms and satisfies the negative ones, as Ray's autoscaler scheduler reads
them (``ray/autoscaler/v2/scheduler.py``, ``_satisfies_label_constraints``) and Kubernetes' NotIn.
Nodes get labels from ``ray start --labels`` and from Ray itself (``ray.io/node-id``,
``ray.io/accelerator-type``, and on KubeRay ``ray.io/market-type``, ``ray.io/node-group``...).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from capjob.config.groups import require

# Ray's label name/value syntax (label_utils.LABEL_REGEX); a key may have a DNS-style prefix.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^(?P<neg>!)?(?:in\((?P<set>{_NAME}(?:, ?{_NAME})*)\)|(?P<one>{_NAME}))$")
# Labels every node carries, one value per node: no use in naming what a cluster offers.
NODE_ID_LABEL = "ray.io/node-id"


def parse_expression(expression: str) -> Optional[tuple[bool, frozenset[str]]]:
    """(negated, values) of one selector expression, or None when it is not Ray's syntax."""
    match = _VALUE.match(str(expression))
    if match is None:
        return None
    values = match.group("set").split(",") if match.group("set") else [match.group("one")]
    return bool(match.group("neg")), frozenset(v.strip() for v in values)


def validate_label_selector(selector: Mapping[str, str], key: str) -> None:
    """Raises ConfigError naming `key` for a label key or expression Ray would refuse."""
    for label, expression in (selector or {}).items():
        require(bool(_KEY.match(str(label))), key, f"{label!r} is not a Ray label key (name or prefix/name, "
                                                   "letters, digits, '-', '_', '.')")
        require(parse_expression(str(expression)) is not None, f"{key}.{label}",
                f"{expression!r} is not a label selector value; use v, !v, in(a,b) or !in(a,b)")


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when a node with `labels` satisfies every expression of `selector` ({} matches all)."""
    for label, expression in (selector or {}).items():
        parsed = parse_expression(str(expression))
        if parsed is None:
            return False
        negated, values = parsed
        if (labels.get(label) in values) == negated:
            return False
    return True


def format_selector(selector: Mapping[str, str]) -> str:
    """`k=v, k2=!in(a,b)`: a selector as the error lines and the plan show it."""
    return ", ".join(f"{k}={v}" for k, v in sorted((selector or {}).items()))


def cluster_labels(node_labels: list[Mapping[str, str]]) -> str:
    """The distinct labels of the given nodes' label maps, as `k=v` (node ids left out), or "none"."""
    found = sorted({f"{k}={v}" for labels in node_labels for k, v in labels.items() if k != NODE_ID_LABEL})
    return ", ".join(found) or "none"
