"""bench/models.py's synthetic GGUFs load and run natively (scaled-down shapes: the real ones are large)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from bench.models import Shape, ensure_synthetic, synthetic_path
from service.engine.models.gguf_source import GGUFSource
from service.engine.models.onnx_builder import Precision, build_decoder
from tests.engine.quant_model import Decoder

SMALL = Shape("small", hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2, rope_theta=10000.0)
# 384 is not a multiple of 256: the K-quant file falls back to Q5_0 for matrices that read it.
ODD = Shape("odd", hidden=384, intermediate=512, layers=1, heads=6, kv_heads=2, rope_theta=10000.0)


@pytest.mark.parametrize(
    ("shape", "qtype"), [(SMALL, T.Q8_0), (ODD, T.Q4_K)], ids=lambda v: getattr(v, "name", str(v))
)
def test_synthetic_gguf_runs_natively(tmp_path: Path, smollm2_gguf: Path, shape: Shape, qtype: T) -> None:
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    path = ensure_synthetic(tmp_path, shape, qtype)
    assert path == synthetic_path(tmp_path, shape, qtype)
    assert ensure_synthetic(tmp_path, shape, qtype).stat().st_mtime_ns == path.stat().st_mtime_ns  # reused

    source = GGUFSource(path)
    assert source.config.vocab_size == 49152
    kinds = {t.tensor_type for t in source.reader.tensors if len(t.shape) == 2}
    assert kinds == ({qtype, T.Q5_0} if shape is ODD else {qtype})
    (tmp_path / "native").mkdir()
    model_file = tmp_path / "native" / "model.onnx"
    build_decoder(source, model_file, precision=Precision.NATIVE, max_positions=64)
    decoder = Decoder(model_file)
    past = {
        f"past_key_values.0.{kind}": np.zeros((1, shape.kv_heads, 0, shape.head_dim), dtype=np.float32)
        for kind in ("key", "value")
    }
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    logits = decoder.session.run(None, {**feeds, **past})[0]
    assert logits.shape == (1, 1, 49152)
    assert np.isfinite(logits).all()
