import torch

from clfpipe.contract.tta import DETERMINISTIC_VIEWS, View
from clfpipe.nn.tta import apply_view, average_probs


def test_views_keep_shape_and_flip_is_an_involution():
    x = torch.randn(2, 3, 32, 32)
    for view in DETERMINISTIC_VIEWS:
        assert apply_view(view, x).shape == x.shape
    assert torch.equal(apply_view(View("identity"), x), x)
    flip = View("f", flip=True)
    assert torch.equal(apply_view(flip, apply_view(flip, x)), x)
    assert torch.equal(apply_view(flip, x)[..., 0], x[..., -1])


def test_average_is_the_mean_of_per_view_probabilities():
    torch.manual_seed(0)
    w = torch.randn(3 * 16 * 16, 4)
    forward = lambda t: t.flatten(1) @ w  # noqa: E731
    x = torch.randn(5, 3, 16, 16)
    expected = torch.stack([torch.softmax(forward(apply_view(v, x)), -1) for v in DETERMINISTIC_VIEWS]).mean(0)
    got = average_probs(forward, x, "softmax")
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(5))
    assert torch.equal(average_probs(forward, x, "softmax"), got)  # deterministic: the same twice
    multi = average_probs(forward, x, "sigmoid")
    assert torch.allclose(multi, torch.stack([torch.sigmoid(forward(apply_view(v, x))) for v in DETERMINISTIC_VIEWS]).mean(0), atol=1e-6)
