"""imgcls: from a folder of images to an evaluated model you can trust.

    import imgcls
    run = imgcls.train(imgcls.load_config(overrides=["data.path=digits", "train.epochs=5"]))
    metrics = imgcls.evaluate(run, split="test")
    rows = imgcls.load(run).predict(["image.png"])
"""

from imgcls.config import Config, load_config
from imgcls.errors import ImgclsError

__all__ = ["Config", "ImgclsError", "evaluate", "list_models", "load", "load_config", "predict", "train"]


# Imported on first use, so that `import imgcls` (and `imgcls --help`) stays fast: torch, timm and
# scikit-learn load only when a function that needs them is called.
def train(*args, **kwargs):
    from imgcls.train import train as _train

    return _train(*args, **kwargs)


train.__doc__ = "Train a classifier and return its run folder; see imgcls.train.train."


def evaluate(*args, **kwargs):
    from imgcls.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


evaluate.__doc__ = "Evaluate a run on a split or another dataset; see imgcls.evaluate.evaluate."


def load(*args, **kwargs):
    from imgcls.predict import load as _load

    return _load(*args, **kwargs)


load.__doc__ = "Load a run's model artifact as a Classifier; see imgcls.predict.load."


def predict(run, paths, topk: int = 5, device: str = "auto"):
    """Predict image files (a list of paths) with a run's model: one dict per file."""
    return load(run, device).predict(paths, topk=topk)


def list_models(pattern: str = "*"):
    from imgcls.models import list_models as _list_models

    return _list_models(pattern)
