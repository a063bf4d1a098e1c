"""The one place that picks where a study computes: in this process, or as tasks on Ray.

Both backends are executors (``executor.py``) computing with the same functions
(``stages.py``); ``execute.py`` asks this module for one and knows neither.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from art_study.config import ExperimentConfig
from art_study.data import MnistData
from art_study.study.cache import StageCache
from art_study.study.executor import Executor
from art_study.study.local_backend import LocalExecutor
from art_study.study.ray_backend import RayExecutor, RayOptions, import_ray

#: builds the executor once the data is loaded: (config, data per seed, stage cache, progress)
ExecutorFactory = Callable[[ExperimentConfig, dict[int, MnistData], StageCache, bool], Executor]

__all__ = ["ExecutorFactory", "RayOptions", "choose_backend"]


def choose_backend(ray_options: RayOptions | None) -> ExecutorFactory:
    """The executor of the backend: in-process without ``ray_options``, else Ray tasks.

    Chosen before anything else is done so that a backend that cannot run (Ray not installed)
    fails before the store, the data or a run is touched; Ray itself is imported only here.
    """
    if ray_options is None:
        return LocalExecutor
    import_ray()
    return functools.partial(RayExecutor, options=ray_options)
