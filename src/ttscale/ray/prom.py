"""One Prometheus scrape for every replica: each replica's `/metrics` text, every sample
labelled ``replica="i"``, families merged so each ``# HELP`` / ``# TYPE`` appears once.

Labelled rather than summed: counters, histograms and most gauges add up
(``sum without (replica) (...)`` in PromQL), but a rate such as the prefix-cache hit rate does
not, and per-replica series are what shows an imbalance.
"""

from __future__ import annotations

from collections.abc import Mapping


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def merge_metrics(texts: Mapping[str, str]) -> str:
    """``texts``: replica label -> that replica's exposition text. Unparsable text is skipped
    (its replica's ``ttscale_replica_up`` says why there is nothing)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for replica, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for fam in parsed:
            if fam.name.endswith("_created"):
                continue
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                if s.name.endswith("_created"):  # creation timestamps: noise once merged
                    continue
                labels = {**s.labels, "replica": replica}
                cells = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{s.name}{{{cells}}} {_value(s.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        out += lines
    return "\n".join(out) + "\n" if out else ""


__all__ = ["merge_metrics"]
