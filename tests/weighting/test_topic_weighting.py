"""ToReMi topic weights: per-sample means of topic weights (0 without a topic, as the reference),
normalised to the batch size by default, raw with normalize=False."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer.spec import SpecError
from mixer.weighting.params import TopicParams
from mixer.weighting.topic import sample_weights, sample_weights_np, weights_from_params

TW = [0.5, 0.2, 0.3, 0.0]


def test_single_topic_ids() -> None:
    ids = torch.tensor([0, 1, 2, 0])
    w = sample_weights(ids, TW)
    raw = np.array([0.5, 0.2, 0.3, 0.5])
    np.testing.assert_allclose(w.numpy(), raw * 4 / raw.sum(), rtol=1e-6)
    assert w.sum().item() == pytest.approx(4, rel=1e-6)


def test_several_topics_with_padding_and_a_sample_without_topic() -> None:
    ids = torch.tensor([[0, 1, -1], [2, -1, -1], [-1, -1, -1], [0, 1, 2]])
    raw = np.array([(0.5 + 0.2) / 2, 0.3, 0.0, (0.5 + 0.2 + 0.3) / 3])
    want = raw * 4 / raw.sum()
    np.testing.assert_allclose(sample_weights(ids, TW).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(sample_weights_np(ids.numpy(), TW), want, rtol=1e-12)
    np.testing.assert_allclose(sample_weights(ids, TW, normalize=False).numpy(), raw, rtol=1e-6)
    np.testing.assert_allclose(sample_weights_np(ids.numpy(), TW, normalize=False), raw, rtol=1e-12)


def test_torch_equals_numpy_reference_and_is_detached() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 10, size=(257, 3))
    tw = torch.tensor(rng.random(10), requires_grad=True)
    w = sample_weights(torch.tensor(ids), tw)
    assert not w.requires_grad and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), sample_weights_np(ids, tw.detach().numpy()), rtol=1e-12)
    w32 = sample_weights(torch.tensor(ids), tw.detach().float())
    assert w32.dtype == torch.float32 and w32.sum().item() == pytest.approx(257, rel=1e-5)


def test_topics_the_version_does_not_cover_keep_the_initial_weight() -> None:
    # The service may not have weighted topic 7 yet: it has the weight every topic starts with.
    ids = torch.tensor([[7, -1], [0, 7], [1, -1]])
    raw = np.array([1.0, (0.5 + 1.0) / 2, 0.2])
    np.testing.assert_allclose(sample_weights(ids, TW).numpy(), raw * 3 / raw.sum(), rtol=1e-6)
    np.testing.assert_allclose(sample_weights_np(ids.numpy(), TW), raw * 3 / raw.sum(), rtol=1e-12)


def test_zero_weight_topics_drop_out_and_an_all_zero_batch_is_uniform() -> None:
    w = sample_weights(torch.tensor([3, 0]), TW)
    assert w.tolist() == [0.0, 2.0]
    assert torch.equal(sample_weights(torch.tensor([3, 3, 3]), TW), torch.ones(3))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="1 topic id\\(s\\) below -1"):
        sample_weights(torch.tensor([-2]), TW)
    with pytest.raises(ValueError, match=r"topic_weights\[1\]"):
        sample_weights(torch.tensor([0]), [1.0, float("nan")])
    with pytest.raises(ValueError, match="finite and >= 0"):
        sample_weights(torch.tensor([0]), [-1.0])
    with pytest.raises(ValueError, match="integers"):
        sample_weights(torch.tensor([0.0]), TW)
    with pytest.raises(ValueError, match="empty"):
        sample_weights(torch.zeros(0, dtype=torch.long), TW)


def test_params_from_a_version() -> None:
    ids = torch.tensor([0, 1])
    assert torch.equal(weights_from_params(ids, {}), torch.ones(2))
    np.testing.assert_allclose(weights_from_params(ids, {"topic_weights": [3, 1]}).numpy(), [1.5, 0.5])
    raw = weights_from_params(ids, {"topic_weights": [3, 1], "normalize": False})
    np.testing.assert_allclose(raw.numpy(), [3.0, 1.0])
    assert TopicParams.parse({"topic_weights": [1, 2]}).to_dict() == {
        "topic_weights": [1.0, 2.0],
        "normalize": True,
    }
    bad_params = (
        {"topic_weights": [0, 0]},
        {"topic_weights": [1, -1]},
        {"topic_weights": "x"},
        {"other": 1},
        {"normalize": 1},
    )
    for bad in bad_params:
        with pytest.raises(SpecError):
            TopicParams.parse(bad)
