"""KVDumper (debug aid of the GPU chunked-prefill check): what it records per request and when."""

from types import SimpleNamespace

import torch

from sglang_mage.kv_dump import KVDumper, load_dumps


def test_records_each_request_kv_at_slot_free(tmp_path):
    layers, slots = 3, 64
    k = [torch.randn(slots, 2, 8) for _ in range(layers)]
    v = [torch.randn(slots, 2, 8) for _ in range(layers)]
    pool = SimpleNamespace(get_kv_buffer=lambda i: (k[i], v[i]))
    r2t = torch.zeros(4, 32, dtype=torch.int32)
    r2t[1, :12] = torch.arange(10, 22)
    r2t[2, :8] = torch.arange(40, 48)
    dumper = KVDumper(str(tmp_path), pool, r2t, layers)

    def fwd(rows, prefix, extend, ids):
        dumper.on_forward(SimpleNamespace(req_pool_indices=torch.tensor(rows), extend_prefix_lens_cpu=prefix,
                                          extend_seq_lens_cpu=extend, input_ids=torch.tensor(ids)))

    fwd([1, 2], [0, 0], [8, 4], list(range(100, 108)) + [7, 7, 7, 7])
    fwd([1, 2], [8, 4], [4, 4], [1] * 8)
    dumper.on_free(None)  # a cache flush is not a request finishing
    dumper.on_free(3)  # a slot that never ran
    dumper.on_free(1)
    dumper.on_free(2)
    recs = load_dumps(str(tmp_path))
    assert set(recs) == {tuple(range(100, 108)), (7, 7, 7, 7)}
    r1 = recs[tuple(range(100, 108))]
    assert r1["seq_len"] == 12
    assert torch.equal(r1["k_first"], k[0][10:22]) and torch.equal(r1["v_last"], v[2][10:22])
    assert recs[(7, 7, 7, 7)]["seq_len"] == 8 and torch.equal(recs[(7, 7, 7, 7)]["k_last"], k[2][40:48])
