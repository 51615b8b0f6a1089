"""The README's tour runs as written (the block between the tour markers)."""
import os
import re
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tour_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- tour[^>]*-->\s*```python\n(.*?)```\s*<!-- /tour -->", text, re.S)
    assert m, "README.md has no tour block between <!-- tour --> and <!-- /tour -->"
    script = tmp_path / "tour.py"
    script.write_text(m.group(1), encoding="utf-8")
    ns = runpy.run_path(str(script))
    assert ns["K"].shape == (40, 40, 3, 3) and ns["K_te"].shape == (10, 40, 3, 3)
    assert ns["fit"].test.shape == (10, 3) and ns["infl"].shape == (10, 40, 3)
    assert ns["jv"].shape == (40, 3) and ns["Kv"].shape == (40, 3) and ns["evals"].shape == (4,)
    assert ns["loss"].item() > 0
