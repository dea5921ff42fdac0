"""imgcls: from a folder of images to an evaluated model you can trust.

    import imgcls
    run = imgcls.train(imgcls.load_config(overrides=["data.path=digits", "train.epochs=15"]))
    metrics = imgcls.evaluate(run, split="test")
    rows = imgcls.load(run).predict(["image.png"])
    imgcls.write_report(run)                                   # run/report.html
    folder = imgcls.sweep(None, ["data.path=digits", "optim.lr=1e-3,3e-4"], seeds=[1, 2, 3])
    imgcls.compare([folder])                                   # mean ± std per configuration, paired test

The functions are imported eagerly: `imgcls.train` is both a module and a function, and a lazy
wrapper would be replaced by the module as soon as anything imports `imgcls.train`. Heavy optional
pieces (timm, scikit-learn, matplotlib) still load only when used.
"""

from imgcls.compare import compare
from imgcls.config import Config, load_config
from imgcls.errors import ImgclsError
from imgcls.evaluate import calibrate, evaluate
from imgcls.lr_finder import find_learning_rate
from imgcls.models import list_models
from imgcls.predict import Classifier, load
from imgcls.report import write_report
from imgcls.sweep import cross_validate, sweep, tune
from imgcls.train import train

__all__ = [
    "Classifier", "Config", "ImgclsError", "calibrate", "compare", "cross_validate", "evaluate", "find_learning_rate",
    "list_models", "load", "load_config", "predict", "sweep", "train", "tune", "write_report",
]


def predict(run, paths, topk: int = 5, device: str = "auto", reject: str | float | None = None) -> list[dict]:
    """Predict image files with a run's model: one dict per file (see `Classifier.predict`); `reject`
    ("auto" or a confidence) answers `unknown` below the threshold."""
    return load(run, device).predict(paths, topk=topk, reject=reject)
