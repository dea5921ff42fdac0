"""imgcls: from a folder of images to an evaluated model you can trust.

    import imgcls
    run = imgcls.train(imgcls.load_config(overrides=["data.path=digits", "train.epochs=15"]))
    metrics = imgcls.evaluate(run, split="test")
    rows = imgcls.load(run).predict(["image.png"])

The functions are imported eagerly: `imgcls.train` is both a module and a function, and a lazy
wrapper would be replaced by the module as soon as anything imports `imgcls.train`. Heavy optional
pieces (timm, scikit-learn, matplotlib) still load only when used.
"""

from imgcls.config import Config, load_config
from imgcls.errors import ImgclsError
from imgcls.evaluate import evaluate
from imgcls.models import list_models
from imgcls.predict import Classifier, load
from imgcls.train import train

__all__ = ["Classifier", "Config", "ImgclsError", "evaluate", "list_models", "load", "load_config", "predict", "train"]


def predict(run, paths, topk: int = 5, device: str = "auto") -> list[dict]:
    """Predict image files with a run's model: one dict per file (see `Classifier.predict`)."""
    return load(run, device).predict(paths, topk=topk)
