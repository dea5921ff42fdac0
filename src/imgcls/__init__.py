"""imgcls: from a folder of images to an evaluated model you can trust.

    import imgcls
    run = imgcls.train(imgcls.load_config(overrides=["data.path=digits", "train.epochs=15"]))
    metrics = imgcls.evaluate(run, split="test")
    rows = imgcls.load(run).predict(["image.png"])
    imgcls.export(run)                                         # run/export/model.onnx + export.json
    imgcls.write_report(run)                                   # run/report.html
    folder = imgcls.sweep(None, ["data.path=digits", "optim.lr=1e-3,3e-4"], seeds=[1, 2, 3])
    imgcls.compare([folder])                                   # mean ± std per configuration, paired test

The public names load on first use (PEP 562), so that `import imgcls.predict` with an ONNX model
never imports torch or timm. Several verbs share their module's name (`imgcls.train` is a module
and a function): the import system sets the package attribute to the module after loading it, so
`_Package.__setattr__` keeps the function there instead, as an eager `from imgcls.train import
train` used to.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = [
    "Classifier", "Config", "ImgclsError", "OnnxClassifier", "calibrate", "compare", "cross_validate", "evaluate",
    "export", "find_learning_rate", "list_models", "load", "load_config", "predict", "serve", "sweep", "train",
    "tune", "write_report",
]

# public name -> the module that defines it
_SOURCES = {
    "Classifier": "imgcls.predict", "OnnxClassifier": "imgcls.predict", "load": "imgcls.predict",
    "predict": "imgcls.predict", "Config": "imgcls.config", "load_config": "imgcls.config",
    "ImgclsError": "imgcls.errors", "calibrate": "imgcls.evaluate", "evaluate": "imgcls.evaluate",
    "compare": "imgcls.compare", "cross_validate": "imgcls.sweep", "sweep": "imgcls.sweep", "tune": "imgcls.sweep",
    "export": "imgcls.export", "find_learning_rate": "imgcls.lr_finder", "list_models": "imgcls.models",
    "serve": "imgcls.serve", "train": "imgcls.train", "write_report": "imgcls.report",
}


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # `import imgcls.train` ends with setattr(imgcls, "train", <module>): keep the verb instead
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
