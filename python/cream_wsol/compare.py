"""``cream-wsol reproduce compare OUT [--against FILE]``: a reproduction beside a published one.

A user who reruns the README's ``reproduce`` command on another machine gets other numbers:
twelve float32 epochs on another CPU model (other oneDNN kernels and summation orders) take
the weights along another path, and every metric follows. What should agree across machines
is the claims' verdicts, and the numbers within their seed spread. This command shows both:

* one row per test metric that both runs have (mean over the seeds on each side), with the
  difference and whether it lies within the seed spread (|difference| <= the larger of the two
  sides' sample standard deviations over the seeds);
* each claim's verdict on both sides;
* exit status 0 when every claim's verdict agrees on every configuration both runs have,
  1 when one differs, 2 for a usage mistake (a missing file, nothing in common).

The published side is a *summary* (:func:`summarize`: the aggregate means, standard
deviations and verdicts of a ``results.json``, without the per-run records, the figures or
the timings). Without ``--against``, the summary shipped with the package that matches the
run's scope is used: a ``--quick`` run against ``published/quick.json``, a full embedded run
against ``published/full.json``. ``--against`` takes another summary or any ``results.json``.
Maintainers regenerate a shipped summary from a fresh run with
``python -m cream_wsol.compare summarize OUT/results.json > python/cream_wsol/published/NAME.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["summarize", "load_summary", "compare", "format_comparison", "published_path", "main", "SUMMARY_FORMAT"]

SUMMARY_FORMAT = "cream_wsol.reproduce-summary/1"
PUBLISHED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published")
# metrics left out of the rows: counts, not measurements
_SKIP_KEYS = {"num_images"}


class CompareError(ValueError):
    """A usage mistake: a file that is missing or of another kind, or nothing to compare."""


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def summarize(results: Mapping[str, Any]) -> Dict[str, Any]:
    """The comparable part of a reproduce's ``results.json``: per configuration (regime-backbone)
    the mean / std / n of every test metric and of test classification, and every claim's
    verdict with its mean and std."""
    if "aggregate" not in results:
        raise CompareError("not a reproduce results.json (no 'aggregate'); give OUT/results.json of cream-wsol "
                           "reproduce or a summary written by `python -m cream_wsol.compare summarize`")
    configs: Dict[str, Any] = {}
    for cfg, agg in results["aggregate"].items():
        metrics = {name: {k: {"mean": _num(s.get("mean")), "std": _num(s.get("std")), "n": s.get("n")}
                          for k, s in mets.items() if k not in _SKIP_KEYS}
                   for name, mets in agg.get("metrics_test", {}).items()}
        cls = {k: {"mean": _num(s.get("mean")), "std": _num(s.get("std")), "n": s.get("n")}
               for k, s in agg.get("classification_test", {}).items()}
        claims = {c: {"verdict": v.get("verdict"), "mean": _num(v.get("mean")), "std": _num(v.get("std"))}
                  for c, v in agg.get("claims", {}).items()}
        configs[cfg] = {"seeds": list(agg.get("seeds", [])), "metrics_test": metrics,
                        "classification_test": cls, "claims": claims}
    return {"format": SUMMARY_FORMAT, "quick": bool(results.get("quick")), "source": results.get("source", "synthetic"),
            "seeds": list(results.get("seeds", [])), "versions": results.get("versions", {}),
            "machine": results.get("machine"), "configs": configs}


def load_summary(path: str) -> Dict[str, Any]:
    """A summary from a summary file, a ``results.json``, or a reproduce output folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such file (give a reproduce output folder, its results.json, or a summary)")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: not a reproduce results.json or summary")
    if data.get("format") == SUMMARY_FORMAT:
        return data
    try:
        return summarize(data)
    except CompareError as exc:
        raise CompareError(f"{path}: {exc}") from None


def published_path(summary: Mapping[str, Any]) -> str:
    """The shipped summary matching a run's scope (quick or full, embedded data only)."""
    if summary.get("source", "synthetic") != "synthetic":
        raise CompareError("no published run exists for your own data set: give --against FILE (e.g. another "
                           "run's results.json)")
    name = "quick.json" if summary.get("quick") else "full.json"
    path = os.path.join(PUBLISHED_DIR, name)
    if not os.path.isfile(path):
        raise CompareError(f"this version ships no published {'--quick' if summary.get('quick') else 'full'} run "
                           f"({path} is missing): give --against FILE")
    return path


def _within(diff: float, s1: Optional[float], s2: Optional[float]) -> Optional[bool]:
    spread = max([s for s in (s1, s2) if s is not None], default=None)
    if spread is None:
        return None
    return abs(diff) <= spread + 1e-12


def compare(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> Dict[str, Any]:
    """Rows, claims and whether every verdict agrees, for the configurations both summaries have."""
    common = [c for c in ours["configs"] if c in theirs["configs"]]
    only_ours = [c for c in ours["configs"] if c not in theirs["configs"]]
    only_theirs = [c for c in theirs["configs"] if c not in ours["configs"]]
    if not common:
        raise CompareError(f"nothing in common: this run has {', '.join(ours['configs']) or 'no configuration'}, "
                           f"the published one {', '.join(theirs['configs']) or 'none'}")
    rows: List[Dict[str, Any]] = []
    claims: List[Dict[str, Any]] = []
    for c in common:
        a, b = ours["configs"][c], theirs["configs"][c]
        for group in ("classification_test", "metrics_test"):
            ga, gb = a.get(group, {}), b.get(group, {})
            items = ([(k, ga[k], gb[k]) for k in ga if k in gb] if group == "classification_test" else
                     [(f"{name} {k}", ga[name][k], gb[name][k]) for name in ga if name in gb
                      for k in ga[name] if k in gb[name]])
            for label, sa, sb in items:
                ma, mb = sa.get("mean"), sb.get("mean")
                if ma is None or mb is None:
                    continue
                d = ma - mb
                rows.append({"config": c, "quantity": label if group == "metrics_test" else f"classification {label}",
                             "ours": ma, "ours_std": sa.get("std"), "theirs": mb, "theirs_std": sb.get("std"),
                             "diff": d, "within": _within(d, sa.get("std"), sb.get("std"))})
        for claim in a["claims"]:
            if claim not in b["claims"]:
                continue
            va, vb = a["claims"][claim], b["claims"][claim]
            claims.append({"config": c, "claim": claim, "ours": va["verdict"], "ours_mean": va["mean"],
                           "ours_std": va["std"], "theirs": vb["verdict"], "theirs_mean": vb["mean"],
                           "theirs_std": vb["std"], "agree": va["verdict"] == vb["verdict"]})
    return {"common": common, "only_ours": only_ours, "only_theirs": only_theirs, "rows": rows, "claims": claims,
            "agree": all(c["agree"] for c in claims), "seeds": (ours.get("seeds"), theirs.get("seeds"))}


def _f(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _pm(m, s) -> str:
    return "-" if m is None else (_f(m) if s is None else f"{_f(m)} ± {_f(s)}")


def format_comparison(res: Mapping[str, Any], ours_label: str, theirs_label: str) -> str:
    """Markdown: the verdicts first, then every number (in points, as the report prints them)."""
    n_in = sum(1 for r in res["rows"] if r["within"])
    n_rated = sum(1 for r in res["rows"] if r["within"] is not None)
    lines = [f"# This run ({ours_label}) beside {theirs_label}", ""]
    s_ours, s_theirs = res["seeds"]
    if s_ours != s_theirs:
        lines += [f"Seeds differ: this run {s_ours}, the published one {s_theirs}.", ""]
    if res["only_ours"] or res["only_theirs"]:
        lines += [f"Compared: {', '.join(res['common'])}. Only in this run: {', '.join(res['only_ours']) or '-'}; "
                  f"only in the published one: {', '.join(res['only_theirs']) or '-'}.", ""]
    agree = sum(1 for c in res["claims"] if c["agree"])
    lines += [f"**Verdicts: {agree} of {len(res['claims'])} agree.** Numbers: {n_in} of {n_rated} within the seed "
              f"spread (|difference| <= the larger std over the seeds; {len(res['rows']) - n_rated} rows with one seed "
              "cannot be rated).", "",
              "| configuration | claim | this run (D) | other run (D) | agree |", "|---|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['config']} | {c['claim']} | {c['ours']} ({_pm(c['ours_mean'], c['ours_std'])}) | "
                     f"{c['theirs']} ({_pm(c['theirs_mean'], c['theirs_std'])}) | {'yes' if c['agree'] else '**no**'} |")
    lines += ["", "| configuration | quantity (test) | this run | other run | difference | within the spread |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        w = "-" if r["within"] is None else ("yes" if r["within"] else "no")
        lines.append(f"| {r['config']} | {r['quantity']} | {_pm(r['ours'], r['ours_std'])} | "
                     f"{_pm(r['theirs'], r['theirs_std'])} | {_f(r['diff'], 2)} | {w} |")
    return "\n".join(lines) + "\n"


def run_compare(out: str, against: Optional[str] = None, write: Optional[str] = None) -> int:
    ours = load_summary(out)
    path = against or published_path(ours)
    theirs = load_summary(path)
    if bool(ours.get("quick")) != bool(theirs.get("quick")):
        raise CompareError(f"scopes differ: this run is {'a --quick' if ours.get('quick') else 'a full'} run, {path} "
                           f"{'a --quick' if theirs.get('quick') else 'a full'} one")
    res = compare(ours, theirs)
    label = f"published, {theirs.get('machine') or 'machine not recorded'}"
    text = format_comparison(res, ours.get("machine") or out, label if against is None else path)
    print(text, flush=True)
    if write:
        with open(write, "w") as fh:
            fh.write(text)
    return 0 if res["agree"] else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cream-wsol reproduce compare",
                                 description="put a reproduce's results beside a published run; exit 0 when every "
                                             "claim's verdict agrees")
    ap.add_argument("out", help="the reproduce output folder (or its results.json)")
    ap.add_argument("--against", help="a summary or results.json to compare with (default: the published run "
                                      "shipped with the package that matches the run's scope)")
    ap.add_argument("--write", help="also write the comparison (Markdown) to this file")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``cream-wsol reproduce compare``; ``python -m cream_wsol.compare summarize RESULTS`` prints a summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summarize"]:
        if len(argv) != 2:
            print("error: usage: python -m cream_wsol.compare summarize OUT/results.json", file=sys.stderr)
            return 2
        try:
            print(json.dumps(load_summary(argv[1]), indent=1, sort_keys=True))
        except CompareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    a = build_parser().parse_args(argv)
    try:
        return run_compare(a.out, a.against, a.write)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
