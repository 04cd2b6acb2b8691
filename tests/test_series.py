"""CSV series: parsing and its errors, the split by time, standardisation, windows, baselines."""

import numpy as np
import pytest

from transformer_jax import series
from transformer_jax.errors import UserError

CSV = "date,a,b,c\n2000-01-01,1,10,5\n2000-04-01,2,20,6\n\n2000-07-01,4,30,7\n"


def test_parse_csv_takes_the_named_columns_forecast_first_then_covariates():
    table = series.parse_csv(CSV, ("b", "a"), ("c",), "date")
    np.testing.assert_array_equal(table.values, [[10, 1, 5], [20, 2, 6], [30, 4, 7]])
    assert table.names == ("b", "a", "c") and table.targets == 2
    assert table.time == ("2000-01-01", "2000-04-01", "2000-07-01")
    assert table.row("2000-04-01") == 1


def test_without_a_time_column_rows_are_labelled_by_number():
    table = series.parse_csv(CSV, ("a",))
    assert table.time == ("0", "1", "2") and table.row("2") == 2
    with pytest.raises(UserError, match="no row is labelled '3'; the data runs from 0 to 2"):
        table.row("3")


def test_column_names_split_a_comma_list():
    assert series.column_names(" a, b ,c") == ("a", "b", "c")
    assert series.column_names(None) == ()


@pytest.mark.parametrize("text, columns, needle", [
    (CSV, ("a", "z"), "has no column 'z'; its header names 'date', 'a', 'b', 'c'"),
    ("a,b\n1,2\n3,x\n", ("a", "b"), "line 3, column 'b': 'x', not a number"),
    ("a,b\n1,2\n3,\n", ("a", "b"), "line 3, column 'b': a missing value"),
    ("a,b\n1,2\nnan,4\n", ("a", "b"), "line 3, column 'a': 'nan' is not a finite number"),
    ("a,b\n1,2\n3\n", ("a",), "line 3: 1 fields, the header has 2"),
    ("a,b\n", ("a",), "has no data rows"),
    ("", ("a",), "has no column 'a'; its header names nothing"),
])
def test_bad_csv_gives_a_one_line_user_error(text, columns, needle):
    with pytest.raises(UserError) as e:
        series.parse_csv(text, columns, where="data.csv")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("times", [("2000-04-01", "2000-01-01"), ("3", "3"), ("2", "1.5")])
def test_time_labels_out_of_order_are_refused(times):
    text = "t,a\n" + "".join(f"{t},{i}\n" for i, t in enumerate(times))
    with pytest.raises(UserError, match="does not increase .* sort the rows by time"):
        series.parse_csv(text, ("a",), time_column="t")


def test_free_form_time_labels_are_taken_in_file_order():
    text = "t,a\n1959Q2,1\n1959Q1,2\n"
    assert series.parse_csv(text, ("a",), time_column="t").time == ("1959Q2", "1959Q1")


def test_the_split_keeps_the_first_rows_for_training():
    assert series.train_rows(100, 0.2) == 80
    assert series.train_rows(10, 0.25) == 8  # as split_text: the held-out part rounds down


def test_scaler_standardises_with_its_own_statistics_and_inverts():
    train = np.array([[1.0, 10.0], [3.0, 30.0]])
    scaler = series.Scaler.fit(train, ("a", "b"))
    np.testing.assert_allclose(scaler.apply(train), [[-1, -1], [1, 1]])
    np.testing.assert_allclose(scaler.apply(np.array([[5.0, 0.0]])), [[3, -2]])
    np.testing.assert_allclose(scaler.invert(np.array([[3.0]])), [[5.0]])  # first column
    again = series.Scaler.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(again.mean, scaler.mean)
    np.testing.assert_array_equal(again.std, scaler.std)


def test_a_constant_training_column_is_refused():
    with pytest.raises(UserError, match="column 'b' is constant in the training part"):
        series.Scaler.fit(np.array([[1.0, 2.0], [3.0, 2.0]]), ("a", "b"))


def test_windows_end_at_each_given_row():
    values = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(series.histories(values, np.array([3, 9]), 3)[..., 0],
                                  [[0, 1, 2, 3], [6, 7, 8, 9]])


def test_random_walk_repeats_the_last_value():
    y = np.array([[1.0], [4.0], [2.0]])
    np.testing.assert_array_equal(series.random_walk(y, np.array([1, 2])), [[1.0], [4.0]])


def _ar2(y_prev1, y_prev2):
    """The noiseless AR(2) of two series used below."""
    return np.stack([0.5 + 1.2 * y_prev1[..., 0] - 0.5 * y_prev2[..., 0],
                     -0.3 * y_prev1[..., 1] + 0.4 * y_prev2[..., 1]], axis=-1)


def test_least_squares_ar_fits_the_training_rows_only_and_predicts_from_actual_lags():
    y = np.zeros((60, 2))
    y[:2] = [[1.0, 0.5], [0.3, -1.0]]
    for t in range(2, 60):
        y[t] = _ar2(y[t - 1], y[t - 2])
    ends = np.arange(42, 60)
    np.testing.assert_allclose(series.autoregression(y, 40, 2, ends), y[ends], atol=1e-8)
    shifted = y.copy()
    shifted[40:] += 100.0  # the validation rows change; a fit on the first 40 rows does not
    np.testing.assert_allclose(series.autoregression(shifted, 40, 2, ends),
                               _ar2(shifted[ends - 1], shifted[ends - 2]), atol=1e-6)


def test_rmse_is_per_series():
    np.testing.assert_allclose(series.rmse(np.array([[1.0, 0.0], [1.0, 0.0]]),
                                           np.array([[0.0, 0.0], [2.0, 3.0]])),
                               [1.0, np.sqrt(4.5)])
