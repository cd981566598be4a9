"""Which CUDA EM variant runs (csrc/cuda/variant.h, issue 18): until a device run
has verified the cluster kernel, ``auto`` (and no setting) picks the generic
kernel and the cluster kernel is opt-in with CREAM_KERNELS_CUDA_VARIANT=cluster.
The rule is host-only C++, exposed as _C.cuda_em_variant in every build, so it is
checked here without a GPU; on a GPU cuda_em_plan is checked to follow it."""
import re
from pathlib import Path

import pytest
import torch

from cream_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
ENV = "CREAM_KERNELS_CUDA_VARIANT"

needs_c = pytest.mark.skipif(_ext.cuda_em_variant() is None, reason="cream_kernels._C is not built")


@needs_c
@pytest.mark.parametrize("value", [None, "", "auto"])
def test_auto_is_generic_until_verified_on_hardware(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    v = _ext.cuda_em_variant()
    assert v["cluster_verified_on_hardware"] is False
    assert v["variant"] == "generic"
    assert "until a device run has verified the cluster kernel" in v["why"] and "=cluster opts in" in v["why"]


@needs_c
def test_explicit_variants(monkeypatch):
    monkeypatch.setenv(ENV, "generic")
    assert _ext.cuda_em_variant() == {"variant": "generic", "why": f"{ENV}=generic",
                                      "cluster_verified_on_hardware": False}
    monkeypatch.setenv(ENV, "cluster")
    v = _ext.cuda_em_variant()
    assert v["variant"] == "cluster" and "not yet verified on hardware" in v["why"]


@needs_c
@pytest.mark.parametrize("bad", ["Cluster", "none", "1"])
def test_bad_value_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(ValueError, match=rf"{ENV} must be one of auto, generic, cluster; got '{bad}'"):
        _ext.cuda_em_variant()


def test_the_dispatch_uses_the_rule():
    """em.cu launches the cluster kernel only when the rule says cluster (and a plan
    fits), and reports the rule's reason for generic: no other variant switch."""
    em = (ROOT / "csrc/cuda/em.cu").read_text()
    assert em.count("em_variant_from_env()") == 2  # the launch and the plan report
    assert "choice.variant == EmVariant::kCluster ? cuda::plan_em_cluster" in em
    assert re.search(r"if \(choice\.variant == EmVariant::kCluster\) \{\s*const cuda::EmPlan plan = "
                     r"cuda::plan_em_cluster\(p, device\);", em)
    assert "getenv" not in em
    header = (ROOT / "csrc/cuda/variant.h").read_text()
    assert "constexpr bool kClusterVerifiedOnHardware = false;" in header


def test_readme_documents_the_opt_in():
    readme = (ROOT / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith(f"| `{ENV}`"))
    assert "generic" in row and "opt-in" in row and "not yet verified on hardware" in row


@pytest.mark.skipif(not (_ext.with_cuda() and torch.cuda.is_available()), reason="needs a CUDA build and a GPU")
def test_plan_follows_the_rule_on_a_gpu(monkeypatch):
    args = dict(B=256, d=2048, N=28 * 28, dtype=torch.bfloat16)
    monkeypatch.delenv(ENV, raising=False)
    plan = _ext.cuda_em_plan(**args)
    assert plan["variant"] == "generic" and "until a device run" in plan["why"]
    monkeypatch.setenv(ENV, "generic")
    assert _ext.cuda_em_plan(**args)["why"] == f"{ENV}=generic"
    monkeypatch.setenv(ENV, "cluster")
    plan = _ext.cuda_em_plan(**args)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert plan["variant"] == "cluster", plan
    else:
        assert plan["variant"] == "generic" and "compute capability 9.0" in plan["why"]
