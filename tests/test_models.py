"""The paper's CNN as a function of its config, and its ART wrapper."""

from __future__ import annotations

import numpy as np
import pytest

from art_study.config import ModelConfig
from art_study.models import build_cnn, to_art


@pytest.mark.parametrize(("n_conv", "n_pool"), [(2, 2), (3, 3), (4, 4), (5, 4)])
def test_depths_build_with_pooling_while_the_map_allows(n_conv: int, n_pool: int) -> None:
    model = build_cnn(ModelConfig(n_conv=n_conv))
    names = [layer.name for layer in model.layers]
    assert sum(n.startswith("conv") for n in names) == n_conv
    assert sum(n.startswith("bn") for n in names) == n_conv
    assert sum(n.startswith("pool") for n in names) == n_pool
    assert model.get_layer("dense").units == 256
    assert model.output_shape == (None, 10)


def test_outputs_are_logits_and_art_wrapper_keeps_them() -> None:
    model = build_cnn(ModelConfig(n_conv=2))
    from art_study.config import TrainConfig
    from art_study.models import compile_model

    compile_model(model, TrainConfig())
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    logits = model.predict(x, verbose=0)
    # No softmax at the end: rows do not sum to one and may be negative.
    assert not np.allclose(logits.sum(axis=1), 1.0)
    clf = to_art(model)
    assert clf.clip_values[0] == 0.0 and clf.clip_values[1] == 1.0
    assert clf.nb_classes == 10
    np.testing.assert_allclose(clf.predict(x), logits, rtol=1e-5, atol=1e-5)
