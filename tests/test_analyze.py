"""Error analysis, calibration, rejection thresholds and training-curve figures, on hand-built
predictions whose answers are worked out in the comments and on synthetic samples whose labels are
drawn from known probabilities (so their calibration is known)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.analyze import (
    auroc, calibrated_probabilities, error_summary, expected_calibration_error, fit_temperature, mistakes,
    most_confused, negative_log_likelihood, overfitting_epoch, rejection_threshold, reliability_curve,
    save_gallery, save_reliability_diagram, save_training_curves,
)
from imgcls.errors import ImgclsError

DPI = 110  # analyze.FIGURE_DPI: figure inches x this = PNG pixels


def drawn_sample(seed: int, size: int = 40_000, classes: int = 5, sharpen: float = 1.0):
    """(logits x sharpen, labels) where each label is drawn from softmax(logits): with sharpen=1 the
    probabilities are perfectly calibrated by construction; sharpen=3 makes them overconfident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(size, classes)) * 2.0
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    uniform = rng.random((size, 1))
    labels = np.minimum((uniform > probabilities.cumsum(axis=1)).sum(axis=1), classes - 1)
    return torch.from_numpy(logits * sharpen).float(), torch.from_numpy(labels)


def two_class(confidences, correct):
    """Probabilities [c, 1 - c] (prediction: class 0, c > 0.5) with label 0 when correct, else 1."""
    probabilities = np.array([[c, 1 - c] for c in confidences])
    labels = np.array([0 if ok else 1 for ok in correct])
    return probabilities, labels


# --- calibration ---------------------------------------------------------------------------------

def test_ece_by_hand():
    probabilities, labels = two_class([0.92, 0.96, 0.65, 0.62], [True, False, True, False])
    # 10 bins: (0.9, 1] holds 0.92 and 0.96: accuracy 0.5, confidence 0.94, gap 0.44, weight 2/4 -> 0.22
    #          (0.6, 0.7] holds 0.65 and 0.62: accuracy 0.5, confidence 0.635, gap 0.135, weight 2/4 -> 0.0675
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.2875)
    curve = reliability_curve(probabilities, labels, bins=10)
    assert curve["count"] == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert curve["confidence"][6] == pytest.approx(0.635) and curve["accuracy"][9] == 0.5
    assert curve["accuracy"][0] is None and curve["lower"][6] == pytest.approx(0.6)


def test_bins_include_their_upper_edge():
    # Guo et al. bin m is ((m-1)/M, m/M]: a confidence of exactly 0.5 belongs to the lower of two bins
    curve = reliability_curve(np.array([[0.5, 0.5], [0.8, 0.2]]), np.array([0, 0]), bins=2)
    assert curve["count"] == [1, 1]


def test_ece_rejects_bad_bins():
    with pytest.raises(ImgclsError, match="bins"):
        expected_calibration_error(np.array([[0.7, 0.3]]), np.array([0]), bins=0)


def test_calibrated_sample_has_small_ece_and_overconfident_large():
    logits, labels = drawn_sample(seed=0)
    calibrated = expected_calibration_error(calibrated_probabilities(logits), labels)
    overconfident = expected_calibration_error(calibrated_probabilities(logits * 3), labels)
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_temperature_undoes_overconfidence_on_held_out_data():
    validation_logits, validation_labels = drawn_sample(seed=1, sharpen=3.0)
    temperature = fit_temperature(validation_logits, validation_labels)
    assert 2.5 < temperature < 3.5  # the sharpening it has to undo is exactly 3
    test_logits, test_labels = drawn_sample(seed=2, sharpen=3.0)
    nll_before = negative_log_likelihood(test_logits, test_labels)
    assert negative_log_likelihood(test_logits, test_labels, temperature) < nll_before - 0.1
    before = expected_calibration_error(calibrated_probabilities(test_logits), test_labels)
    after = expected_calibration_error(calibrated_probabilities(test_logits, temperature), test_labels)
    assert after < 0.02 < before


def test_temperature_sharpens_an_underconfident_model():
    logits, labels = drawn_sample(seed=3, size=10_000, sharpen=0.5)
    assert 1.5 < 1 / fit_temperature(logits, labels) < 2.5


def test_temperature_on_degenerate_validation_splits():
    logits = torch.eye(4).repeat(5, 1) * 10
    # every sample right with a wide margin: sharper is always better, the fit goes below 1
    assert 0.05 <= fit_temperature(logits, torch.arange(4).repeat(5)) < 1
    # every sample confidently wrong: flatter is always better, T runs off and is clamped at 20
    assert fit_temperature(logits, (torch.arange(4) + 1).remainder(4).repeat(5)) == 20.0


def test_temperature_keeps_the_predicted_class():
    logits, _ = drawn_sample(seed=4, size=200)
    assert torch.equal(calibrated_probabilities(logits, 2.7).argmax(dim=1), logits.argmax(dim=1))
    assert torch.allclose(calibrated_probabilities(logits, 2.7).sum(dim=1), torch.ones(200, dtype=torch.float64))


def test_negative_log_likelihood_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # softmax: 0.75, 0.25
    assert negative_log_likelihood(logits, torch.tensor([0])) == pytest.approx(-math.log(0.75))
    # T = 2: softmax(log 3 / 2, 0) = sqrt 3 / (sqrt 3 + 1)
    assert negative_log_likelihood(logits, torch.tensor([1]), 2.0) == pytest.approx(math.log(math.sqrt(3) + 1))


# --- open-set rejection --------------------------------------------------------------------------

# confidence / correct:  0.9 yes, 0.9 no (a tie), 0.8 yes, 0.8 yes, 0.7 no, 0.6 yes
# precision of confidence >= t:  t=0.9: 1/2   t=0.8: 3/4   t=0.7: 3/5   t=0.6: 4/6
TIED = two_class([0.9, 0.9, 0.8, 0.8, 0.7, 0.6], [True, False, True, True, False, True])


def test_rejection_threshold_by_hand_with_ties():
    result = rejection_threshold(*TIED, target_precision=0.75)
    # not monotone: 0.9 misses the target, 0.8 meets it, lower ones miss it again
    assert result["threshold"] == pytest.approx(0.8)
    assert result["precision"] == pytest.approx(0.75)
    assert result["coverage"] == pytest.approx(4 / 6)
    assert result["reason"] is None and result["target_precision"] == 0.75
    assert rejection_threshold(*TIED, target_precision=0.6)["coverage"] == 1.0


def test_rejection_threshold_none_when_impossible():
    # 1.0 would be reachable only by splitting the 0.9 tie and keeping its right half
    result = rejection_threshold(*TIED, target_precision=1.0)
    assert result["threshold"] is None and result["precision"] is None and result["coverage"] is None
    assert "0.750" in result["reason"]  # the best achievable precision is stated
    all_wrong = rejection_threshold(*two_class([0.9, 0.7], [False, False]))
    assert all_wrong["threshold"] is None and "no confidence threshold" in all_wrong["reason"]
    with pytest.raises(ImgclsError, match="target precision"):
        rejection_threshold(*TIED, target_precision=1.5)


def test_rejection_threshold_reaches_target_with_maximum_coverage():
    logits, labels = drawn_sample(seed=5, size=3000)
    probabilities = calibrated_probabilities(logits)
    result = rejection_threshold(probabilities, labels, target_precision=0.9)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).numpy()
    confidence = confidence.numpy()
    accepted = confidence >= result["threshold"]
    assert correct[accepted].mean() >= 0.9
    assert accepted.mean() == pytest.approx(result["coverage"]) and 0.05 < result["coverage"] < 1
    # every lower threshold misses the target: none keeps more samples
    for lower in np.unique(confidence[confidence < result["threshold"]]):
        assert correct[confidence >= lower].mean() < 0.9


# --- error analysis ------------------------------------------------------------------------------

def test_most_confused_both_directions():
    names = ["ant", "bee", "cat", "dog"]
    # true ant (10): 6 ant, 3 bee, 1 cat;  true bee (5): 4 bee, 1 ant;  true cat (4): 1 cat, 3 bee;  dog (2): right
    labels = [0] * 10 + [1] * 5 + [2] * 4 + [3] * 2
    predicted = [0] * 6 + [1] * 3 + [2] + [1] * 4 + [0] + [2] + [1] * 3 + [3] * 2
    rows = most_confused(labels, predicted, names)
    assert [(row["class_a"], row["class_b"]) for row in rows] == [("ant", "bee"), ("cat", "bee"), ("ant", "cat")]
    first, second, third = rows
    assert (first["a_as_b"], first["b_as_a"], first["total"]) == (3, 1, 4)
    assert first["a_as_b_rate"] == pytest.approx(3 / 10) and first["b_as_a_rate"] == pytest.approx(1 / 5)
    assert (second["a_as_b"], second["a_as_b_rate"], second["b_as_a"], second["b_as_a_rate"]) == (3, 0.75, 0, 0.0)
    assert (third["a_as_b"], third["a_as_b_rate"], third["total"]) == (1, 0.1, 1)
    assert len(most_confused(labels, predicted, names, limit=2)) == 2
    assert most_confused([0, 1], [0, 1], ["a", "b"]) == []


# probabilities per sample over 6 classes (logits are their logs); true class in brackets
#   0: right                      [1] .1 .5 .1 .1 .1 .1
#   1: wrong, confident, true 2nd [1] .94 .02 .01 .01 .01 .01
#   2: wrong, unsure, true last   [5] .3 .25 .2 .15 .07 .03
#   3: wrong, confident, true last [5] .91 .03 .02 .02 .015 .005
#   4: right, confident           [0] .95 .01 .01 .01 .01 .01
SIX = torch.log(torch.tensor([
    [0.1, 0.5, 0.1, 0.1, 0.1, 0.1],
    [0.94, 0.02, 0.01, 0.01, 0.01, 0.01],
    [0.3, 0.25, 0.2, 0.15, 0.07, 0.03],
    [0.91, 0.03, 0.02, 0.02, 0.015, 0.005],
    [0.95, 0.01, 0.01, 0.01, 0.01, 0.01],
]))
SIX_LABELS = torch.tensor([1, 1, 5, 5, 0])
SIX_NAMES = ["a", "b", "c", "d", "e", "f"]
SIX_PATHS = [f"images/{index}.png" for index in range(5)]


def test_error_summary_counts():
    summary = error_summary(SIX, SIX_LABELS)
    assert (summary["n"], summary["errors"], summary["error_rate"]) == (5, 3, pytest.approx(0.6))
    assert summary["top_k"] == 5
    assert summary["errors_true_in_top5"] == 1 and summary["errors_true_in_top5_share"] == pytest.approx(1 / 3)
    assert summary["confident_errors"] == 2 and summary["confident_errors_share"] == pytest.approx(2 / 3)
    perfect = error_summary(torch.eye(3), torch.arange(3))
    assert perfect["errors"] == 0 and perfect["confident_errors_share"] is None and perfect["top_k"] == 3


def test_mistakes_by_loss_and_by_confidence():
    by_loss = mistakes(SIX, SIX_LABELS, SIX_PATHS, SIX_NAMES, order="loss")
    assert [row["index"] for row in by_loss] == [3, 1, 2]  # true probability .005 < .02 < .03
    worst = by_loss[0]
    assert (worst["path"], worst["true"], worst["predicted"]) == ("images/3.png", "f", "a")
    assert worst["loss"] == pytest.approx(-math.log(0.005), rel=1e-5)
    assert worst["true_probability"] == pytest.approx(0.005, rel=1e-5)
    assert worst["confidence"] == pytest.approx(0.91, rel=1e-5)
    by_confidence = mistakes(SIX, SIX_LABELS, SIX_PATHS, SIX_NAMES, order="confidence")
    assert [row["index"] for row in by_confidence] == [1, 3, 2]  # .94 > .91 > .3
    assert len(mistakes(SIX, SIX_LABELS, SIX_PATHS, SIX_NAMES, limit=1)) == 1
    with pytest.raises(ImgclsError, match="loss or confidence"):
        mistakes(SIX, SIX_LABELS, SIX_PATHS, SIX_NAMES, order="surprise")


def test_auroc_by_hand():
    probabilities = np.array([
        [0.9, 0.05, 0.05], [0.4, 0.5, 0.1],  # true 0
        [0.4, 0.55, 0.05], [0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.3, 0.6, 0.1],  # true 1
    ])
    labels = np.array([0, 0, 1, 1, 1, 1])
    result = auroc(probabilities, labels, num_classes=3)
    # class 0: positives .9 .4 against negatives .4 .1 .2 .3: .9 wins 4, .4 wins 3 and ties 1 -> 7.5 / 8
    # class 1: positives .55 .8 .6 .6 all above negatives .05 .5 -> 1; class 2 never occurs -> undefined
    assert result["per_class"] == [pytest.approx(0.9375), 1.0, None]
    assert result["macro"] == pytest.approx((0.9375 + 1.0) / 2)
    one_class = auroc(np.array([[0.8, 0.2], [0.6, 0.4]]), np.array([0, 0]), num_classes=2)
    assert one_class == {"per_class": [None, None], "macro": None}


# --- figures -------------------------------------------------------------------------------------

def png_size(path):
    with Image.open(path) as image:
        image.load()
        return image.format, image.size, np.asarray(image.convert("RGB"))


def test_gallery_with_an_unreadable_file(tmp_path):
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (60, 40), colour).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    paths = [tmp_path / "0.png", tmp_path / "1.png", tmp_path / "broken.jpg", tmp_path / "gone.png"]
    rows = [{"path": str(path), "true": "cat", "predicted": "dog", "confidence": 0.97} for path in paths]
    written = save_gallery(rows, tmp_path / "gallery.png", "highest-loss mistakes", columns=3)
    kind, size, pixels = png_size(written)
    assert kind == "PNG" and size == (round(3 * 2.2 * DPI), round((2 * 2.6 + 0.4) * DPI))
    assert (pixels == (128, 128, 128)).all(axis=2).sum() > 1000  # the grey "unreadable" tiles
    assert (pixels == (200, 30, 30)).all(axis=2).sum() > 1000  # the first image is drawn
    empty = save_gallery([], tmp_path / "empty.png", "no mistakes")
    assert png_size(empty)[0] == "PNG"
    with pytest.raises(ImgclsError, match="crop, pad or squish"):
        save_gallery(rows, tmp_path / "typo.png", "typo", resize="fit")


def test_reliability_diagram(tmp_path):
    logits, labels = drawn_sample(seed=6, size=2000, sharpen=3.0)
    curves = {"before (T=1)": calibrated_probabilities(logits), "after (T=3)": calibrated_probabilities(logits, 3.0)}
    kind, size, _ = png_size(save_reliability_diagram(curves, labels, tmp_path / "reliability.png"))
    assert kind == "PNG" and size == (round(5.5 * DPI), round(6.2 * DPI))


# --- training curves -----------------------------------------------------------------------------

def test_overfitting_epoch():
    epochs = [1, 2, 3, 4, 5, 6]
    assert overfitting_epoch([1.0, 0.8, 0.6, 0.65, 0.7, 0.75], epochs) == 3  # rises after epoch 3
    assert overfitting_epoch([1.0, 0.9, 0.8, 0.7, 0.65, 0.6], epochs) is None  # still falling
    assert overfitting_epoch([1.0, 0.8, 0.6, 0.601, 0.602, 0.603], epochs) is None  # flat within 1%
    assert overfitting_epoch([1.0, 0.8, 0.6, 0.7, 0.9, 0.605], epochs) is None  # back near the minimum
    assert overfitting_epoch([0.6, 0.7], [1, 2]) is None  # one epoch after the minimum is not a trend
    # epoch numbers, not positions (a resumed run may start later); a diverged NaN epoch is skipped
    assert overfitting_epoch([0.5, 0.4, float("nan"), 0.45, 0.5], [11, 12, 13, 14, 15]) == 12


def metrics_rows(val_losses, val_accuracies):
    """metrics.csv rows as tracking.read_metrics returns them: every value a string."""
    return [
        {"epoch": str(epoch), "train_loss": f"{1.5 / epoch:.4g}", "train_acc1": f"{min(1, 0.5 + 0.1 * epoch):.4g}",
         "val_loss": str(loss), "val_acc1": str(accuracy), "val_acc5": "1", "lr": "0.001"}
        for epoch, (loss, accuracy) in enumerate(zip(val_losses, val_accuracies), start=1)
    ]


def test_training_curves_mark_best_and_overfitting(tmp_path):
    rows = metrics_rows([1.0, 0.7, 0.6, 0.68, 0.75], [0.5, 0.7, 0.78, 0.8, 0.79])
    result = save_training_curves(rows, tmp_path / "curves.png")
    assert result == {"best_epoch": 4, "overfit_epoch": 3}  # best val_acc1 at 4, val loss lowest at 3
    assert save_training_curves(rows, tmp_path / "by_loss.png", monitor="val_loss")["best_epoch"] == 3
    assert save_training_curves(rows, tmp_path / "given.png", best_epoch=2)["best_epoch"] == 2
    kind, size, _ = png_size(tmp_path / "curves.png")
    assert kind == "PNG" and size == (11 * DPI, round(4.2 * DPI))
    with pytest.raises(ImgclsError, match="val_macro_f1"):
        save_training_curves(rows, tmp_path / "missing.png", monitor="val_macro_f1")


def test_training_curves_one_epoch(tmp_path):
    result = save_training_curves(metrics_rows([0.9], [0.6]), tmp_path / "one.png")
    assert result == {"best_epoch": 1, "overfit_epoch": None}
    assert png_size(tmp_path / "one.png")[0] == "PNG"
    with pytest.raises(ImgclsError, match="empty"):
        save_training_curves([], tmp_path / "none.png")
