"""A short training and evaluation in a fresh process, for ``test_numerics.py``.

``python tests/numerics_child.py MODE MNIST_DIR`` trains the paper's 2-conv CNN for one epoch on
a stratified MNIST slice, evaluates it clean and under our FGSM, and prints one JSON line: the
sha256 of the weights, the metrics as exact hex floats, and the numerics fingerprint. A fresh
process because oneDNN is chosen once, when TensorFlow is imported; the parent sets the CPU
affinity (the core count TensorFlow sees).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys


def main(mode: str, mnist_dir: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from art_study import numerics

    numerics.prepare(mode)
    import numpy as np

    from art_study.attacks.fgsm import FGSM
    from art_study.config import ModelConfig, TrainConfig
    from art_study.data import load_mnist
    from art_study.models import accuracy, build_cnn, compile_model, one_hot
    from art_study.study.stages import seed_everything

    numerics.apply(mode, 2, 2)
    data = load_mnist(mnist_dir, n_train=600, n_test=200, seed=0, download=False)
    seed_everything(0)
    train = TrainConfig(batch_size=50)
    model = compile_model(build_cnn(ModelConfig(filters=[8, 16, 16, 16, 16], dense_units=32)),
                          train)
    model.fit(data.x_train, one_hot(data.y_train), batch_size=train.batch_size, epochs=1, verbose=0)
    weights = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes()
                                      for w in model.get_weights())).hexdigest()
    adv = FGSM(model, batch_size=100).generate(data.x_test, one_hot(data.y_test), 0.1)
    logits = model.predict(data.x_test, batch_size=100, verbose=0)
    metrics = {"clean": accuracy(model, data.x_test, data.y_test),
               "fgsm_0.1": accuracy(model, adv, data.y_test),
               "logit_sum": float(np.sum(logits, dtype=np.float64))}
    print(json.dumps({"weights": weights, "metrics": {k: float(v).hex() for k, v in
                                                      metrics.items()},
                      "fingerprint": numerics.fingerprint()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
