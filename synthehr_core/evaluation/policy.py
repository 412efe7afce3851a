"""Release policy and verdicts: thresholds (a YAML file, ``release_policy.yml`` by default) turned into a pass /
warn / fail / inconclusive status per check, a verdict per property and one release decision with its reasons.

A check reads one metric and, when the evaluation computed one, its 95 % bootstrap interval. An interval wider
than the check's ``max_width`` makes the check *inconclusive* ("too few records to conclude") unless the whole
interval lies past the fail threshold. The decision is "do not release" when a check named in ``fail_on`` fails,
"release with warnings" when anything else fails, warns or is inconclusive, else "release".
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import storage
from ..errors import ConfigError, bullet_list, show
from ..yamlio import load_yaml

PROPERTIES = ("privacy", "fidelity", "longitudinal", "temporal", "rules", "utility")
STATUS_ORDER = {"not run": 0, "pass": 1, "inconclusive": 2, "warn": 3, "fail": 4}
DO_NOT_RELEASE, WITH_WARNINGS, RELEASE = "do not release", "release with warnings", "release"


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    property: Literal["privacy", "fidelity", "longitudinal", "temporal", "rules", "utility"]
    metric: str
    worse: Literal["higher", "lower"]
    warn: float | None = None
    fail: float | None = None
    max_width: float | None = Field(default=None, gt=0)
    ceiling: str | None = None     # a metric (e.g. the held-out real baseline): a value at least as good passes
    meaning: str = ""


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    small_cell_k: int = Field(10, ge=1)
    max_interval_width: float = Field(0.2, gt=0)
    fail_on: list[str] = Field(default_factory=list)
    checks: dict[str, Check]
    licences: dict[str, str] = Field(default_factory=dict)
    source: str = Field(default="", exclude=True)
    digest: str = Field(default="", exclude=True)

    def gated(self, fail_on: list[str] | None = None) -> set[str]:
        """Check ids whose failure stops a release: ``fail_on`` names check ids or whole properties."""
        names = self.fail_on if fail_on is None else fail_on
        out = set()
        for n in names:
            out |= {c for c, chk in self.checks.items() if n in (c, chk.property)}
        return out


def default_policy_path() -> Path:
    return Path(str(resources.files("synthehr_core") / "evaluation" / "release_policy.yml"))


def load_policy(path: str | Path | None = None) -> Policy:
    """The release policy at ``path`` (local or object-store URI), or the bundled default."""
    where = str(path) if path else str(default_policy_path())
    if not storage.exists(where):
        raise ConfigError(f"release policy {where!r} does not exist. Pass a YAML file (copy "
                          f"{default_policy_path()} and edit it) or leave --policy out for the default.")
    text = storage.read_text(where)
    data = load_yaml(text, where)  # bounded: size, aliases, nesting (synthehr_core.yamlio)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a release policy is a mapping with a 'checks' key, got {type(data).__name__}.")
    try:
        policy = Policy(**data, source=where, digest=hashlib.sha256(text.encode()).hexdigest()[:16])
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: "
                 + ("unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden"
                    else f"{e['msg']} (got {show(e.get('input'))})")  # never echo an unknown key's value
                 for e in exc.errors()]
        raise ConfigError(f"{where}: invalid release policy:\n" + bullet_list(lines)) from None
    check_fail_on(policy, policy.fail_on, f"{where}: fail_on")
    return policy


def check_fail_on(policy: Policy, names: list[str], where: str = "--fail-on") -> list[str]:
    known = set(policy.checks) | set(PROPERTIES)
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"{where}: unknown check or property {bad}; choose from the checks "
                          f"{sorted(policy.checks)} or the properties {list(PROPERTIES)} (or 'none').")
    return names


def parse_fail_on(policy: Policy, text: str | None) -> list[str] | None:
    """``--fail-on`` as given on the command line: comma-separated names, ``none``, or None = the policy's."""
    if text is None or text == "":
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return [] if names == ["none"] else check_fail_on(policy, names)


def _past(x: float, threshold: float | None, worse: str) -> bool:
    return threshold is not None and (x > threshold if worse == "higher" else x < threshold)


def judge(check_id: str, chk: Check, metrics: dict, intervals: dict, default_width: float) -> dict:
    """One check's status, value, interval and the sentence that explains it."""
    v = metrics.get(chk.metric)
    row = {"check": check_id, "property": chk.property, "metric": chk.metric, "meaning": chk.meaning,
           "value": v, "warn": chk.warn, "fail": chk.fail, "worse": chk.worse, "interval": None, "n": None}
    if v is None:
        return {**row, "status": "not run", "reason": f"{chk.metric} was not computed (see the notes)."}
    iv = intervals.get(chk.metric)
    status = "fail" if _past(v, chk.fail, chk.worse) else "warn" if _past(v, chk.warn, chk.worse) else "pass"
    side = "above" if chk.worse == "higher" else "below"
    reason = {"fail": f"{v:.4g} is {side} the fail threshold {chk.fail:g}",
              "warn": f"{v:.4g} is {side} the warning threshold {chk.warn:g}" if chk.warn is not None else "",
              "pass": f"{v:.4g} is within the thresholds"}[status]
    ceil = metrics.get(chk.ceiling) if chk.ceiling else None
    if status != "pass" and ceil is not None and not _past(v, ceil, chk.worse):
        status, reason = "pass", (f"{v:.4g} is past the threshold but as good as held-out real data ({ceil:.4g}, "
                                  "the ceiling for a cohort of this size)")
    if iv is not None:
        row["interval"], row["n"] = (iv["lo"], iv["hi"]), iv.get("n")
        width = chk.max_width or default_width
        far = iv["lo"] if chk.worse == "higher" else iv["hi"]
        if iv["hi"] - iv["lo"] > width and not (status == "fail" and _past(far, chk.fail, chk.worse)):
            status = "inconclusive"
            reason = (f"too few records to conclude: {v:.4g}, 95% interval {iv['lo']:.3g} to {iv['hi']:.3g} "
                      f"(wider than {width:g}) from {iv.get('n_text') or iv.get('n')} records")
        else:
            reason += f" (95% interval {iv['lo']:.3g} to {iv['hi']:.3g})"
    return {**row, "status": status, "reason": reason}


def verdicts(metrics: dict, intervals: dict, policy: Policy, fail_on: list[str] | None = None) -> dict:
    """``{"decision", "reasons", "properties": {name: status}, "checks": [...], "gated": [...]}``."""
    gated = policy.gated(fail_on)
    checks = [judge(c, chk, metrics, intervals, policy.max_interval_width) for c, chk in policy.checks.items()]
    for row in checks:
        row["gated"] = row["check"] in gated
    props = {}
    for p in PROPERTIES:
        st = [r["status"] for r in checks if r["property"] == p]
        props[p] = max(st, key=STATUS_ORDER.get) if st else "not run"
    blocking = [r for r in checks if r["gated"] and r["status"] == "fail"]
    other = [r for r in checks if r not in blocking and r["status"] in ("fail", "warn", "inconclusive")]
    decision = DO_NOT_RELEASE if blocking else WITH_WARNINGS if other else RELEASE
    other.sort(key=lambda r: -STATUS_ORDER[r["status"]])
    reasons = [f"{'BLOCKING: ' if r in blocking else ''}{r['check'].replace('_', ' ')} ({r['property']}, "
               f"{r['status']}): {r['reason']}. Measures: {r['meaning']}." for r in blocking + other]
    return {"decision": decision, "reasons": reasons, "properties": props, "checks": checks,
            "gated": sorted(gated), "policy": {"source": policy.source, "sha256_16": policy.digest,
                                               "small_cell_k": policy.small_cell_k, "fail_on": sorted(gated)}}

