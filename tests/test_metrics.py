"""metrics: values against hand-computed numbers, the names per problem, direction, and predictions from logits."""

import math
import warnings

import numpy as np
import pytest

from finetune.metrics import (
    METRICS,
    compute_metrics,
    higher_is_better,
    is_improvement,
    metrics_for,
)
from finetune.problems import get
from finetune.recipe import DEFAULT_METRICS

# ---------------------------------------------------------------------------------------------------------------
# Single-label classification: y = [0, 1, 2, 2, 1], p = [0, 2, 2, 2, 1]
#   class 0: tp 1, fp 0, fn 0 -> f1 1
#   class 1: tp 1, fp 0, fn 1 -> precision 1, recall 1/2, f1 2/3
#   class 2: tp 2, fp 1, fn 0 -> precision 2/3, recall 1, f1 4/5
SINGLE_TRUE = np.array([0, 1, 2, 2, 1])
SINGLE_PRED = np.array([0, 2, 2, 2, 1])


def test_accuracy_is_fraction_of_exact_matches():
    assert compute_metrics(["accuracy"], SINGLE_TRUE, SINGLE_PRED) == {"accuracy": pytest.approx(4 / 5)}


def test_f1_macro_is_unweighted_mean_of_per_class_f1():
    value = compute_metrics(["f1_macro"], SINGLE_TRUE, SINGLE_PRED)["f1_macro"]
    assert value == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)


def test_f1_micro_equals_accuracy_for_single_label():
    # pooled tp = 4, fp = 1, fn = 1 -> precision = recall = f1 = 4/5
    assert compute_metrics(["f1_micro"], SINGLE_TRUE, SINGLE_PRED)["f1_micro"] == pytest.approx(4 / 5)


def test_precision_and_recall_macro():
    values = compute_metrics(["precision_macro", "recall_macro"], SINGLE_TRUE, SINGLE_PRED)
    assert values["precision_macro"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert values["recall_macro"] == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_f1_weighted_weights_by_support():
    value = compute_metrics(["f1_weighted"], SINGLE_TRUE, SINGLE_PRED)["f1_weighted"]
    assert value == pytest.approx((1 * 1 + 2 * 2 / 3 + 2 * 4 / 5) / 5)


def test_matthews_binary_by_hand():
    # tp 1, tn 2, fp 0, fn 1: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 2 / sqrt(12)
    value = compute_metrics(["matthews"], np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))["matthews"]
    assert value == pytest.approx(2 / math.sqrt(12))


def test_matthews_is_zero_for_a_constant_prediction_and_minus_one_for_inverted():
    y = np.array([0, 1, 0, 1])
    assert compute_metrics(["matthews"], y, np.zeros(4, dtype=int))["matthews"] == 0.0
    assert compute_metrics(["matthews"], y, 1 - y)["matthews"] == pytest.approx(-1.0)


def test_f1_of_a_class_never_predicted_is_zero_not_nan():
    value = compute_metrics(["f1_macro"], np.array([0, 1, 1]), np.array([1, 1, 1]))["f1_macro"]
    # class 0: f1 0 (zero_division=0); class 1: precision 2/3, recall 1, f1 4/5
    assert value == pytest.approx((0 + 4 / 5) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Multi-label: indicator matrices.
MULTI_TRUE = np.array([[1, 0, 1], [0, 1, 0]])
MULTI_PRED = np.array([[1, 0, 0], [0, 1, 0]])


def test_multi_label_accuracy_is_exact_match_over_the_label_set():
    assert compute_metrics(["accuracy"], MULTI_TRUE, MULTI_PRED)["accuracy"] == pytest.approx(0.5)


def test_multi_label_f1_micro_and_macro():
    values = compute_metrics(["f1_micro", "f1_macro"], MULTI_TRUE, MULTI_PRED)
    # micro: tp 2, fp 0, fn 1 -> precision 1, recall 2/3, f1 4/5; macro: labels 1, 1, 0
    assert values["f1_micro"] == pytest.approx(4 / 5)
    assert values["f1_macro"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# Regression: y = [1, 2, 3, 4], p = [1, 2, 3, 7] -> errors 0, 0, 0, 3.
REG_TRUE = np.array([1.0, 2.0, 3.0, 4.0])
REG_PRED = np.array([1.0, 2.0, 3.0, 7.0])


def test_regression_errors_by_hand():
    values = compute_metrics(["mse", "rmse", "mae", "r2"], REG_TRUE, REG_PRED)
    assert values["mse"] == pytest.approx(9 / 4)
    assert values["rmse"] == pytest.approx(3 / 2)
    assert values["mae"] == pytest.approx(3 / 4)
    # r2 = 1 - SS_res / SS_tot = 1 - 9 / 5
    assert values["r2"] == pytest.approx(-0.8)


def test_perfect_regression():
    values = compute_metrics(["mse", "rmse", "mae", "r2", "pearson", "spearman"], REG_TRUE, REG_TRUE.copy())
    assert values == pytest.approx({"mse": 0.0, "rmse": 0.0, "mae": 0.0, "r2": 1.0, "pearson": 1.0, "spearman": 1.0})


def test_pearson_by_hand():
    # deviations y: -1.5 -0.5 0.5 1.5 (sum sq 5); p: -2.25 -1.25 -0.25 3.75 (sum sq 20.75); cross sum 9.5
    value = compute_metrics(["pearson"], REG_TRUE, REG_PRED)["pearson"]
    assert value == pytest.approx(9.5 / math.sqrt(5 * 20.75))


def test_spearman_is_rank_based():
    # a monotone but non-linear prediction has rank correlation 1 while pearson is below 1
    values = compute_metrics(["spearman", "pearson"], REG_TRUE, REG_PRED)
    assert values["spearman"] == pytest.approx(1.0)
    assert values["pearson"] < 0.99
    # one swapped pair: rank differences 1, -1, 0, 0 -> 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert compute_metrics(["spearman"], REG_TRUE, np.array([2.0, 1.0, 3.0, 4.0]))["spearman"] == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["pearson", "spearman"])
@pytest.mark.parametrize(
    "y, p",
    [
        (np.array([1.0, 2.0, 3.0]), np.array([5.0, 5.0, 5.0])),  # constant prediction
        (np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])),  # constant target
        (np.array([1.0]), np.array([2.0])),  # a single example
    ],
)
def test_correlation_of_constant_input_is_zero_without_warnings(name, y, p):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning would mean the guard did not run
        value = compute_metrics([name], y, p)[name]
    assert value == 0.0
    assert not math.isnan(value)


def test_compute_metrics_returns_plain_floats_in_the_order_asked():
    values = compute_metrics(["f1_macro", "accuracy"], SINGLE_TRUE, SINGLE_PRED)
    assert list(values) == ["f1_macro", "accuracy"]
    assert all(type(v) is float for v in values.values())  # json.dump-able, not numpy scalars


# ---------------------------------------------------------------------------------------------------------------
# Names per problem, and direction.


# What each problem's data looks like, a perfect prediction of it and a worse one: every metric offered for a
# problem must compute on that problem's data and rank the perfect model above the worse one (its direction).
PROBLEM_DATA = {
    "single_label": (np.array([0, 1, 2, 2, 1, 0]), np.array([0, 2, 2, 1, 1, 1])),
    "multi_label": (np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]),
                    np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1]])),
    "regression": (np.array([1.0, 2.0, 3.5, 4.0, 6.0]), np.array([1.5, 1.0, 4.5, 3.0, 5.0])),
}


@pytest.mark.parametrize("problem", sorted(PROBLEM_DATA))
def test_every_metric_of_a_problem_computes_and_ranks_a_perfect_model_first(problem):
    truth, worse = PROBLEM_DATA[problem]
    names = metrics_for(problem)
    assert set(DEFAULT_METRICS[problem]) <= set(names)  # a recipe's defaults are offered for its problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a metric that warns on its own problem's data is the wrong metric
        perfect_values = compute_metrics(names, truth, truth.copy())
        worse_values = compute_metrics(names, truth, worse)
    for name in names:
        perfect, bad = perfect_values[name], worse_values[name]
        assert math.isfinite(perfect) and math.isfinite(bad), name
        assert is_improvement(name, perfect, bad) and not is_improvement(name, bad, perfect), (name, perfect, bad)


def test_classification_metrics_are_not_offered_for_regression_nor_matthews_for_label_sets():
    truth, predicted = PROBLEM_DATA["multi_label"]
    with pytest.raises(ValueError):  # why matthews is single-label only: it cannot score label sets
        METRICS["matthews"][2](truth, predicted)
    assert "matthews" not in metrics_for("multi_label")
    assert not set(metrics_for("regression")) & set(metrics_for("single_label"))


def test_metrics_for_unknown_problem_is_empty():
    assert metrics_for("ranking") == []


def test_loss_is_lower_is_better():
    assert higher_is_better("loss") is False


def test_is_improvement_first_value_always_improves():
    assert is_improvement("loss", 10.0, None)
    assert is_improvement("accuracy", 0.0, None)


@pytest.mark.parametrize("name", ["loss", "rmse"])
def test_is_improvement_lower_is_better(name):
    assert is_improvement(name, 0.5, 0.6)
    assert not is_improvement(name, 0.7, 0.6)
    assert not is_improvement(name, 0.6, 0.6)  # a tie keeps the earlier checkpoint


def test_is_improvement_higher_is_better():
    assert is_improvement("accuracy", 0.9, 0.8)
    assert not is_improvement("accuracy", 0.7, 0.8)
    assert not is_improvement("accuracy", 0.8, 0.8)


# ---------------------------------------------------------------------------------------------------------------
# Predictions from logits.


def test_single_label_prediction_is_argmax():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [-5.0, -4.0, -3.0]])
    np.testing.assert_array_equal(get("single_label").predict(logits), [1, 0, 2])


def test_multi_label_prediction_thresholds_the_sigmoid():
    logits = np.array([[2.0, -2.0, 0.0], [1.0, 0.5, -0.1]])
    # sigmoid: [0.881, 0.119, 0.5], [0.731, 0.622, 0.475]; 0.5 itself is not above the threshold
    predicted = get("multi_label").predict(logits)
    np.testing.assert_array_equal(predicted, [[1, 0, 0], [1, 1, 0]])
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(get("multi_label").predict(logits, threshold=0.7), [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(get("multi_label").predict(logits, threshold=0.1), [[1, 1, 1], [1, 1, 1]])


def test_multi_label_prediction_with_extreme_logits():
    with np.errstate(over="ignore"):
        predicted = get("multi_label").predict(np.array([[1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_array_equal(predicted, [[1, 0]])


def test_regression_prediction_is_the_flat_output():
    predicted = get("regression").predict(np.array([[0.5], [-1.25], [3.0]]))
    assert predicted.shape == (3,)
    np.testing.assert_allclose(predicted, [0.5, -1.25, 3.0])


def test_predictions_feed_metrics_end_to_end():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    predicted = get("single_label").predict(logits)
    assert compute_metrics(["accuracy"], np.array([0, 1, 1, 0]), predicted) == {"accuracy": pytest.approx(0.75)}
