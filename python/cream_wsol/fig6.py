"""The paper's Fig. 6 in its shape, and its Table 1 read as deltas (issue 23).

Input: the per-method results of ``paper_reg._run_methods`` -- one mapping per run (seed)::

    {method: {"MaxBoxAccV2": {"method": x, "method + CREAM": y},
              "PxAP": {"method": x or None, "method + CREAM": y or None},
              "curve": {"method": [BoxAccV2 per tau], "method + CREAM": [...]},
              "thresholds": [tau...], "top1": ..., "time_s": ...}}

with ``"cam"`` the CREAM_Base run itself (its ``"method + CREAM"`` is CREAM_Base). A list
of such mappings (one per seed) gives mean ± std; a run dict holding them under
``"methods"`` (``paper_reg.run_reg_parts``'s ``runs``) is accepted too. BoxAccV2 is the mean
of BoxAcc over IoU 30/50/70, as ``_run_methods`` stores it.

* :func:`fig6_figure` -- left: BoxAccV2 against tau for CAM, HaS, SPG and CREAM_Base (CREAM
  on the CAM run); right: HaS and SPG, each without (solid) and with CREAM (dashed).
* :func:`fig6_table` -- the numbers beside it: MaxBoxAccV2 / PxAP with and without CREAM for
  CAM, HaS, SPG, then the other methods present (ADL, CutMix, ACoL) marked as extras.
* :func:`deltas_table` -- Table 1 as the paper reads it: each method minus CAM, and each
  method + CREAM minus the method (paired per run, then mean ± std over runs).
* :func:`fig6_section` -- all three at once (tables, numbers, figure path).

Methods absent from the results are left out (and said so in the notes); only ``"cam"`` is
required.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["LABELS", "FIG6_LEFT", "FIG6_RIGHT", "EXTRAS", "fig6_curves", "fig6_table", "deltas_table",
           "fig6_figure", "fig6_section"]

LABELS = {"cam": "CAM", "has": "HaS", "spg": "SPG", "acol": "ACoL", "adl": "ADL", "cutmix": "CutMix"}
FIG6_LEFT = ("cam", "has", "spg")  # + CREAM_Base (CREAM on the CAM run)
FIG6_RIGHT = ("has", "spg")
EXTRAS = ("acol", "adl", "cutmix")  # in the table, after the figure's methods
_METRICS = ("MaxBoxAccV2", "PxAP")
_COLORS = {"cam": "tab:gray", "has": "tab:blue", "spg": "tab:green", "acol": "tab:purple", "adl": "tab:orange",
           "cutmix": "tab:brown", "cream_base": "tab:red"}

Results = Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]


def _runs(results: Results) -> List[Mapping[str, Any]]:
    """One ``{method: result}`` mapping per run."""
    runs = [results] if isinstance(results, Mapping) else list(results)
    runs = [r["methods"] if "methods" in r and isinstance(r["methods"], Mapping) else r for r in runs]
    if not runs:
        raise ValueError("fig6: no results given")
    for i, r in enumerate(runs):
        if "cam" not in r:
            raise ValueError(f"fig6: run {i} has no 'cam' result (the CREAM_Base run); it has {sorted(r)}")
    common = set(runs[0])
    for r in runs[1:]:
        common &= set(r)
    return [{m: r[m] for m in r if m in common} for r in runs]


def _order(present: Sequence[str]) -> List[str]:
    known = [m for m in FIG6_LEFT + EXTRAS if m in present]
    return known + sorted(m for m in present if m not in known)


def _label(m: str) -> str:
    return LABELS.get(m, m)


def _stat(values: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
    vals = [float(v) for v in values if v is not None]
    if not vals or len(vals) < len(values):  # a metric missing in some run: not comparable
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def _fmt(st: Optional[Mapping[str, Any]], signed: bool = False) -> str:
    if st is None:
        return "n/a"
    s = f"{st['mean']:+.1f}" if signed else f"{st['mean']:.1f}"
    return s + (f" ± {st['std']:.1f}" if st["n"] > 1 else "")


def _md(header: List[str], rows: List[List[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fig6_curves(results: Results) -> Dict[str, Any]:
    """The curves of both panels, averaged over runs: ``{"thresholds": [...], "left": {label:
    curve}, "right": {label: curve}}`` (right labels "HaS", "HaS + CREAM", ...)."""
    runs = _runs(results)
    th = np.asarray(runs[0]["cam"]["thresholds"], dtype=float)

    def mean_curve(m: str, key: str) -> List[float]:
        cs = [np.asarray(r[m]["curve"][key], dtype=float) for r in runs]
        if any(c.shape != th.shape for c in cs):
            raise ValueError(f"fig6: the {m!r} curve ({key}) has {cs[0].shape} points, the thresholds {th.shape}")
        return np.mean(cs, axis=0).tolist()

    left = {_label(m): mean_curve(m, "method") for m in FIG6_LEFT if m in runs[0]}
    left["CREAM_Base"] = mean_curve("cam", "method + CREAM")
    right: Dict[str, List[float]] = {}
    for m in FIG6_RIGHT:
        if m in runs[0]:
            right[_label(m)] = mean_curve(m, "method")
            right[f"{_label(m)} + CREAM"] = mean_curve(m, "method + CREAM")
    return {"thresholds": th.tolist(), "left": left, "right": right}


def _table_numbers(runs: List[Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for m in _order(list(runs[0])):
        out[m] = {f"{met} ({k})": _stat([r[m][met].get(k) for r in runs])
                  for met in _METRICS for k in ("method", "method + CREAM")}
    return out


def fig6_table(results: Results) -> Dict[str, Any]:
    """``{"markdown": str, "numbers": {label: {"MaxBoxAccV2 (method)": stat, ...}}}``: CAM (its
    "+ CREAM" is CREAM_Base), HaS, SPG, then the extras present (ADL, CutMix, ACoL)."""
    runs = _runs(results)
    num = _table_numbers(runs)
    rows = []
    for m, cols in num.items():
        name = _label(m) + (" (extra)" if m not in FIG6_LEFT else "")
        rows.append([name] + [_fmt(cols[c]) for c in ("MaxBoxAccV2 (method)", "MaxBoxAccV2 (method + CREAM)",
                                                     "PxAP (method)", "PxAP (method + CREAM)")])
    md = _md(["method", "MaxBoxAccV2", "MaxBoxAccV2 + CREAM", "PxAP", "PxAP + CREAM"], rows)
    return {"markdown": md, "numbers": {_label(m): v for m, v in num.items()}}


def deltas_table(results: Results) -> Dict[str, Any]:
    """Table 1's deltas: per method, ``method - CAM`` and ``method + CREAM - method`` for
    MaxBoxAccV2 and PxAP, differences taken per run, then mean ± std. CAM's own row has
    ``CREAM_Base - CAM`` as its CREAM delta. ``{"markdown", "numbers"}``."""
    runs = _runs(results)
    num: Dict[str, Dict[str, Any]] = {}

    def diff(a, b):
        return None if a is None or b is None else float(a) - float(b)

    for m in _order(list(runs[0])):
        row = {}
        for met in _METRICS:
            row[f"{met}"] = _stat([r[m][met].get("method") for r in runs])
            row[f"{met} - CAM"] = (None if m == "cam" else
                                   _stat([diff(r[m][met].get("method"), r["cam"][met].get("method")) for r in runs]))
            row[f"{met} + CREAM - {met}"] = _stat([diff(r[m][met].get("method + CREAM"), r[m][met].get("method"))
                                                   for r in runs])
        num[_label(m)] = row
    rows = []
    for label, row in num.items():
        cells = [label]
        for met in _METRICS:
            cells += [_fmt(row[met]), "-" if label == "CAM" else _fmt(row[f"{met} - CAM"], True),
                      _fmt(row[f"{met} + CREAM - {met}"], True)]
        rows.append(cells)
    md = _md(["method", "MaxBoxAccV2", "method - CAM", "+ CREAM - method",
              "PxAP", "method - CAM", "+ CREAM - method"], rows)
    return {"markdown": md, "numbers": num}


def fig6_figure(results: Results, path: str) -> str:
    """Fig. 6: left, BoxAccV2 vs tau for CAM, HaS, SPG and CREAM_Base; right, HaS and SPG
    without (solid) and with CREAM (dashed). Returns ``path`` (PNG)."""
    from .figures import _plt, _save

    c = fig6_curves(results)
    th = np.asarray(c["thresholds"])
    plt = _plt()
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(8.0, 3.0), sharey=True)
    for label, curve in c["left"].items():
        key = "cream_base" if label == "CREAM_Base" else next(m for m, v in LABELS.items() if v == label)
        ax_l.plot(th, curve, color=_COLORS.get(key, "black"), lw=1.5 if label == "CREAM_Base" else 1.2, label=label)
    for m in FIG6_RIGHT:
        lab = _label(m)
        if lab in c["right"]:
            ax_r.plot(th, c["right"][lab], color=_COLORS[m], lw=1.2, label=lab)
            ax_r.plot(th, c["right"][f"{lab} + CREAM"], color=_COLORS[m], lw=1.2, ls="--", label=f"{lab} + CREAM")
    for ax, title in ((ax_l, "CAM, HaS, SPG and CREAM_Base"), (ax_r, "with CREAM (dashed)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tau")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. --methods adl: neither HaS nor SPG was trained
            ax.text(0.5, 0.5, "HaS / SPG not trained", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax_l.set_ylabel("BoxAccV2 (%)")
    fig.suptitle("BoxAccV2 (mean of IoU 30/50/70) against tau (cf. paper Fig. 6)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 110)


def fig6_section(results: Results, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """The Fig. 6 table, the deltas table and (with ``out_dir``) the figure:
    ``{"tables": {"Fig. 6", "Table 1 deltas"}, "numbers": {...}, "figures": {"fig6": path},
    "notes": [...]}``."""
    runs = _runs(results)
    present = set(runs[0])
    t = fig6_table(runs)
    d = deltas_table(runs)
    notes = [f"{len(runs)} run(s); " + ("mean ± std over runs, deltas paired per run." if len(runs) > 1
                                        else "one run.")]
    missing = [_label(m) for m in FIG6_LEFT if m not in present]
    if missing:
        notes.append(f"Fig. 6 without {', '.join(missing)}: not in the results.")
    out = {"tables": {"Fig. 6": t["markdown"], "Table 1 deltas": d["markdown"]},
           "numbers": {"Fig. 6": t["numbers"], "Table 1 deltas": d["numbers"], "curves": fig6_curves(runs)},
           "figures": {}, "notes": notes}
    if out_dir is not None:
        out["figures"]["fig6"] = fig6_figure(runs, os.path.join(out_dir, "fig6.png"))
    return out
