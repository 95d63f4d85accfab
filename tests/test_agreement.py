import numpy as np
import pytest

from clfpipe.contract.metrics import compare


def test_within_scaled_tolerance_passes():
    ref = np.array([[90.0, 1.0, -3.0], [0.5, 2.0, 0.1]])
    result = compare(ref, ref + 5e-3, rtol=1e-4, atol=1e-5)  # 5e-3 < 1e-4 * 90 + 1e-5
    assert result.passed and result.top1_agreement == 1.0
    assert result.tolerance == pytest.approx(9.01e-3)


def test_large_diff_or_top1_flip_fails():
    ref = np.array([[1.0, 0.99999], [3.0, 0.0]])
    assert not compare(ref, ref + np.array([[0, 2e-5], [0, 0]]), rtol=1e-4, atol=1e-5).passed  # top-1 flips
    assert not compare(ref, ref + 0.1, rtol=1e-4, atol=1e-5).passed
    with pytest.raises(ValueError, match="equal shape"):
        compare(ref, ref[:1], 1e-4, 1e-5)
