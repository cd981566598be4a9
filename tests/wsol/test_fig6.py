"""Fig. 6 and the Table 1 deltas (issue 23) on small fake inputs in paper_reg._run_methods' shape."""
import os

import pytest

from cream_wsol.fig6 import deltas_table, fig6_curves, fig6_figure, fig6_section, fig6_table


def _res(box, box_c, px=None, px_c=None, curve=(0.0, 0.0, 0.0), curve_c=(0.0, 0.0, 0.0)):
    return {"MaxBoxAccV2": {"method": box, "method + CREAM": box_c},
            "PxAP": {"method": px, "method + CREAM": px_c},
            "curve": {"method": list(curve), "method + CREAM": list(curve_c)},
            "thresholds": [0.0, 0.5, 1.0], "top1": 50.0, "time_s": {"train": 1.0, "evaluate": 1.0}}


def _two_runs():
    r1 = {"cam": _res(50.0, 60.0, 40.0, 45.0, (10, 20, 30), (20, 30, 40)),
          "has": _res(52.0, 63.0, 41.0, 44.0, (12, 22, 32), (22, 32, 42)),
          "spg": _res(55.0, 61.0, 42.0, 47.0, (14, 24, 34), (24, 34, 44)),
          "adl": _res(48.0, 58.0, 39.0, 43.0)}
    r2 = {"cam": _res(54.0, 62.0, 42.0, 45.0, (30, 40, 50), (40, 50, 60)),
          "has": _res(54.0, 65.0, 43.0, 46.0, (32, 42, 52), (42, 52, 62)),
          "spg": _res(57.0, 67.0, 44.0, 47.0, (34, 44, 54), (44, 54, 64)),
          "adl": _res(50.0, 62.0, 41.0, 45.0)}
    return [r1, r2]


def test_curves_both_panels_mean_over_runs():
    c = fig6_curves(_two_runs())
    assert c["thresholds"] == [0.0, 0.5, 1.0]
    assert list(c["left"]) == ["CAM", "HaS", "SPG", "CREAM_Base"]
    assert c["left"]["CAM"] == [20.0, 30.0, 40.0]
    assert c["left"]["CREAM_Base"] == [30.0, 40.0, 50.0]  # CREAM on the CAM run
    assert list(c["right"]) == ["HaS", "HaS + CREAM", "SPG", "SPG + CREAM"]
    assert c["right"]["SPG + CREAM"] == [34.0, 44.0, 54.0]


def test_table_has_figure_methods_then_extras():
    t = fig6_table(_two_runs())
    lines = t["markdown"].splitlines()
    assert lines[0] == "| method | MaxBoxAccV2 | MaxBoxAccV2 + CREAM | PxAP | PxAP + CREAM |"
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| CAM", "| HaS", "| SPG", "| ADL (extra)"]
    assert lines[3] == "| HaS | 53.0 ± 1.4 | 64.0 ± 1.4 | 42.0 ± 1.4 | 45.0 ± 1.4 |"
    assert t["numbers"]["SPG"]["MaxBoxAccV2 (method + CREAM)"]["values"] == [61.0, 67.0]


def test_deltas_hand_computed():
    d = deltas_table(_two_runs())
    n = d["numbers"]
    # SPG - CAM per run: 5, 3 -> mean 4, std sqrt(2); SPG + CREAM - SPG: 6, 10 -> 8, sqrt(8)
    assert n["SPG"]["MaxBoxAccV2 - CAM"]["values"] == [5.0, 3.0]
    assert n["SPG"]["MaxBoxAccV2 - CAM"]["mean"] == pytest.approx(4.0)
    assert n["SPG"]["MaxBoxAccV2 - CAM"]["std"] == pytest.approx(2 ** 0.5)
    assert n["SPG"]["MaxBoxAccV2 + CREAM - MaxBoxAccV2"]["mean"] == pytest.approx(8.0)
    assert n["CAM"]["MaxBoxAccV2 - CAM"] is None
    assert n["CAM"]["MaxBoxAccV2 + CREAM - MaxBoxAccV2"]["values"] == [10.0, 8.0]  # CREAM_Base - CAM
    assert n["ADL"]["PxAP - CAM"]["values"] == [-1.0, -1.0]
    rows = d["markdown"].splitlines()
    assert rows[0] == ("| method | MaxBoxAccV2 | method - CAM | + CREAM - method | PxAP | method - CAM | "
                       "+ CREAM - method |")
    assert rows[4] == "| SPG | 56.0 ± 1.4 | +4.0 ± 1.4 | +8.0 ± 2.8 | 43.0 ± 1.4 | +2.0 ± 0.0 | +4.0 ± 1.4 |"
    assert rows[2].startswith("| CAM | 52.0 ± 2.8 | - | +9.0 ± 1.4 |")


def test_one_run_no_pxap_missing_methods_and_errors(tmp_path):
    run = {"cam": _res(50.0, 60.0, curve=(1, 2, 3)), "has": _res(52.0, 63.0)}
    d = deltas_table(run)  # one mapping = one run
    assert "| HaS | 52.0 | +2.0 | +11.0 | n/a | n/a | n/a |" in d["markdown"]
    s = fig6_section({"methods": run}, str(tmp_path))  # a run_reg_parts run dict works too
    assert os.path.getsize(s["figures"]["fig6"]) > 1000
    assert any("without SPG" in note for note in s["notes"])
    assert set(s["tables"]) == {"Fig. 6", "Table 1 deltas"}
    with pytest.raises(ValueError, match="no 'cam'"):
        fig6_table({"has": _res(1.0, 2.0)})
    with pytest.raises(ValueError, match="no results"):
        fig6_table([])
    bad = {"cam": dict(_res(1.0, 2.0), curve={"method": [1.0], "method + CREAM": [1.0]})}
    with pytest.raises(ValueError, match="curve"):
        fig6_curves(bad)


def test_figure_file(tmp_path):
    p = fig6_figure(_two_runs(), str(tmp_path / "f" / "fig6.png"))
    assert p.endswith("fig6.png") and os.path.getsize(p) > 1000
