"""The kernel plot reads kernels.json rows as bench_kernels.py writes them and writes a PNG beside them."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))


def test_plot_writes_png(tmp_path):
    from plot_kernels import main

    rows = [{"context": c, "k": k, "B": 32, "batch": 1, "q_heads": 28, "kv_heads": 4, "head_dim": 128,
             "method": m, "us": us, "gbps": 1.0, **({"selector": "mean"} if m == "mage_first_step" else {})}
            for c in (32768, 131072) for m, k, us in (("flashinfer_dense", None, 200.0), ("dense_step", None, 200.0),
                                                    ("mage_sparse", 512, 10.0), ("mage_first_step", 512, 230.0),
                                                    ("mage_sparse", 2048, 20.0))]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"rows": rows}))
    out = main(str(path))
    assert out.endswith("kernels.png") and os.path.getsize(out) > 1000


def test_sweep_plot_writes_png(tmp_path):
    from plot_kernels import sweep

    rows = [{"batch": 1, "k": 512, "num_splits": n, "block_m": 64, "block_n": 32, "merge_block_m": mm, "pdl": pdl,
             "num_stages": None, "us_graph": 10.0 + n + (mm or 0) / 16}
            for n in (4, 8) for mm in (None, 16) for pdl in ("off", "full")]
    rows.append({"batch": 1, "k": 512, "pdl": "off", "timeline": {}, "us_graph": 12.0, "num_splits": 6,
                 "block_m": None, "block_n": None})  # timeline rows are not bars
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"rows": [], "split_sweep": rows}))
    out = sweep(str(path))
    assert out.endswith("sweep_sweep.png") and os.path.getsize(out) > 1000
