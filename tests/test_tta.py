import torch

from clfpipe.tta import DETERMINISTIC_VIEWS, View, average_probs


def test_views_keep_shape_and_flip_is_an_involution():
    x = torch.randn(2, 3, 32, 32)
    for view in DETERMINISTIC_VIEWS:
        assert view(x).shape == x.shape
    assert torch.equal(View("identity")(x), x)
    flip = View("f", flip=True)
    assert torch.equal(flip(flip(x)), x)
    assert torch.equal(flip(x)[..., 0], x[..., -1])


def test_average_is_the_mean_of_per_view_probabilities():
    torch.manual_seed(0)
    w = torch.randn(3 * 16 * 16, 4)
    forward = lambda t: t.flatten(1) @ w  # noqa: E731
    x = torch.randn(5, 3, 16, 16)
    expected = torch.stack([torch.softmax(forward(v(x)), -1) for v in DETERMINISTIC_VIEWS]).mean(0)
    got = average_probs(forward, x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(5))
    assert torch.equal(average_probs(forward, x), got)  # deterministic: the same twice
    multi = average_probs(forward, x, multi_label=True)
    assert torch.allclose(multi, torch.stack([torch.sigmoid(forward(v(x))) for v in DETERMINISTIC_VIEWS]).mean(0), atol=1e-6)
