"""imgcls: from a folder of images to an evaluated model you can trust.

    import imgcls
    run = imgcls.train(imgcls.load_config(overrides=["data.path=digits", "train.epochs=15"]))
    metrics = imgcls.evaluate(run, split="test")
    rows = imgcls.load(run).predict(["image.png"])
    imgcls.export(run)                                         # run/export/model.onnx + export.json
    imgcls.write_report(run)                                   # run/report.html
    folder = imgcls.sweep(None, ["data.path=digits", "optim.lr=1e-3,3e-4"], seeds=[1, 2, 3])
    imgcls.compare([folder])                                   # mean ± std per configuration, paired test

The public names load on first use (PEP 562), so that `import imgcls.prediction` with an ONNX model
never imports torch or timm. Modules are nouns (`imgcls.training`, `imgcls.evaluation`, ...) and the verbs
they define are re-exported here (`imgcls.train`, `imgcls.evaluate`, ...).
"""

from __future__ import annotations

import importlib

__all__ = [
    "Classifier", "Config", "ImgclsError", "OnnxClassifier", "calibrate", "compare", "cross_validate", "diagnose",
    "evaluate", "export", "find_learning_rate", "list_models", "load", "load_config", "predict", "run_doctor", "serve",
    "sweep", "train", "tune", "write_report",
]

# public name -> the module that defines it
_SOURCES = {
    "Classifier": "imgcls.prediction", "OnnxClassifier": "imgcls.prediction", "load": "imgcls.prediction",
    "predict": "imgcls.prediction", "Config": "imgcls.config", "load_config": "imgcls.config",
    "ImgclsError": "imgcls.errors", "diagnose": "imgcls.doctor", "run_doctor": "imgcls.doctor",
    "calibrate": "imgcls.evaluation", "evaluate": "imgcls.evaluation",
    "compare": "imgcls.comparison", "cross_validate": "imgcls.sweeps", "sweep": "imgcls.sweeps", "tune": "imgcls.sweeps",
    "export": "imgcls.exporting", "find_learning_rate": "imgcls.lr_finder", "list_models": "imgcls.models",
    "serve": "imgcls.serving", "train": "imgcls.training", "write_report": "imgcls.report",
}


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
