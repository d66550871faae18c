"""The delta stream: threaded read-ahead gives the same deltas as inline reads, and its errors
surface in the consumer."""

from __future__ import annotations

import pytest
import torch
from fixtures.lora import layer_names, true_deltas

from lbm_registry.errors import CheckpointError
from lbm_registry.lbm.checkpoint import CheckpointReader
from lbm_registry.lora.stream import DeltaStream

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("threaded", [False, True])
def test_stream_yields_exact_deltas(tiny_base_path, make_tuned, threaded):
    tuned = make_tuned(rank=4)
    want = true_deltas(tiny_base_path, tuned)
    modules = layer_names(tiny_base_path)
    seen = []
    with DeltaStream(CheckpointReader(tiny_base_path), CheckpointReader(tuned), modules,
                     thread_min_numel=0 if threaded else 10**12) as stream:
        for d in stream:
            assert torch.equal(d.matrix, want[d.module])
            assert d.sq_norm == pytest.approx(float(want[d.module].double().norm() ** 2), rel=1e-5)
            seen.append(d.module)
    assert seen == list(modules)


def test_threaded_stream_raises_worker_errors_and_stops_early(tiny_base_path, tmp_path):
    from lbm_registry.lbm.checkpoint import save_safetensors

    r = CheckpointReader(tiny_base_path)
    sd = {k: v.clone() for k, v in r.items()}
    modules = layer_names(tiny_base_path)
    bad = list(modules)[500]
    sd[f"denoiser.{bad}.weight"][0, 0] = float("inf")
    tuned = save_safetensors(sd, tmp_path / "inf.safetensors", r.metadata)
    stream = DeltaStream(r, CheckpointReader(tuned), modules, thread_min_numel=0)
    with pytest.raises(CheckpointError, match=bad):
        for _ in stream:
            pass
    # breaking out early stops the worker
    stream = DeltaStream(r, CheckpointReader(tuned), modules, thread_min_numel=0)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert stream._thread is not None and not stream._thread.is_alive()


def test_read_does_not_use_the_memory_map(tiny_base_path):
    r = CheckpointReader(tiny_base_path)
    key = "denoiser.conv_in.weight"
    buf = torch.empty(10**6, dtype=torch.uint8)
    t = r.read(key, buf)
    assert torch.equal(t, r.get(key))
    assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()   # read into the buffer
