"""Losses (positive weights, NaN masking, agreement with torch's BCEWithLogits) and the imbalance samplers."""

import numpy as np
import pytest
import torch

from training.losses import (
    AsymmetricLoss,
    FocalLoss,
    WeightedBCE,
    label_counts,
    make_loss,
    pos_weight_from_labels,
)
from training.sampling import ClassAwareSampler, EpochShuffleSampler, make_sampler

pytestmark = pytest.mark.unit
NAN = float("nan")


def _labels() -> np.ndarray:
    # label 0: 1 pos / 3 neg; label 1: 2 pos / 1 neg + 1 unknown; label 2: 0 pos; label 3: 1 pos / 399 neg
    y = np.zeros((400, 4), dtype=np.float32)
    y[:4, 0] = [1, 0, 0, 0]
    y[:4, 1] = [1, 1, 0, NAN]
    y[4:, :3] = NAN
    y[0, 3] = 1
    return y


def test_pos_weight_is_negatives_over_positives_on_known_targets_clamped() -> None:
    y = _labels()
    n_pos, n_neg = label_counts(y)
    assert n_pos.tolist() == [1, 2, 0, 1] and n_neg.tolist() == [3, 1, 4, 399]
    w = pos_weight_from_labels(y)
    # 3/1; 1/2 -> clamped up to 1; no positives -> upper bound; 399 -> clamped down to 100
    assert w.tolist() == [3.0, 1.0, 100.0, 100.0]
    assert pos_weight_from_labels(y, clamp=(0.1, 1000.0)).tolist() == pytest.approx([3.0, 0.5, 1000.0, 399.0])


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((2, 2, 2))])
def test_pos_weight_rejects_non_matrix(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        pos_weight_from_labels(bad)


def test_pos_weight_rejects_empty_clamp() -> None:
    with pytest.raises(ValueError, match="clamp"):
        pos_weight_from_labels(_labels(), clamp=(5.0, 1.0))


def test_weighted_bce_equals_torch_without_unknowns() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 5, generator=g) * 3
    targets = (torch.rand(16, 5, generator=g) < 0.3).float()
    pw = torch.tensor([1.0, 2.0, 5.0, 10.0, 50.0])
    ours = WeightedBCE(pw.numpy())(logits, targets)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, targets)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(WeightedBCE()(logits, targets), torch.nn.BCEWithLogitsLoss()(logits, targets))


def test_unknown_targets_are_masked_out_of_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(8, 3, generator=g) * 2).requires_grad_()
    targets = (torch.rand(8, 3, generator=g) < 0.5).float()
    targets[0, 0] = targets[3, 2] = targets[5, 1] = NAN
    pw = np.array([2.0, 3.0, 4.0], dtype=np.float32)
    loss = WeightedBCE(pw)(logits, targets)
    known = ~torch.isnan(targets)
    per = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach(), torch.nan_to_num(targets), pos_weight=torch.from_numpy(pw), reduction="none"
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(per[known].mean().item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()


def test_all_unknown_batch_gives_zero_loss() -> None:
    logits = torch.randn(4, 2)
    targets = torch.full((4, 2), NAN)
    for loss_fn in (WeightedBCE(), FocalLoss(), AsymmetricLoss()):
        assert loss_fn(logits, targets).item() == 0.0


def test_sum_and_count_gives_exact_average_across_batches() -> None:
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(10, 4, generator=g), (torch.rand(10, 4, generator=g) < 0.4).float()
    targets[2, 1] = NAN
    fn = WeightedBCE(np.full(4, 2.0, np.float32))
    s1, c1 = fn.sum_and_count(logits[:3], targets[:3])
    s2, c2 = fn.sum_and_count(logits[3:], targets[3:])
    assert c1 + c2 == 39
    assert ((s1 + s2) / (c1 + c2)).item() == pytest.approx(fn(logits, targets).item(), rel=1e-6)


def test_focal_and_asl_reduce_to_bce_without_focusing() -> None:
    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(12, 3, generator=g), (torch.rand(12, 3, generator=g) < 0.5).float()
    bce = torch.nn.BCEWithLogitsLoss()(logits, targets)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, targets), bce, rtol=1e-6)
    assert torch.allclose(AsymmetricLoss(gamma_pos=0.0, gamma_neg=0.0, clip=0.0)(logits, targets), bce, rtol=1e-5)


def test_focal_loss_down_weights_easy_examples() -> None:
    logits = torch.tensor([[4.0], [0.1]])  # confident and correct vs uncertain, both positive
    targets = torch.ones(2, 1)
    ratio_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    terms, _ = FocalLoss(gamma=2.0).elementwise(logits, targets)
    assert (terms[0] / terms[1]).item() < (ratio_bce[0] / ratio_bce[1]).item() / 10


def test_asl_discards_easy_negatives_below_the_clip() -> None:
    logits = torch.tensor([[-5.0]])  # p = 0.0067 < clip 0.05
    terms, _ = AsymmetricLoss().elementwise(logits, torch.zeros(1, 1))
    assert terms.item() == 0.0


def test_make_loss_and_shape_errors() -> None:
    assert isinstance(make_loss("wbce", np.ones(2, np.float32)), WeightedBCE)
    assert isinstance(make_loss("focal"), FocalLoss) and isinstance(make_loss("asl"), AsymmetricLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")
    with pytest.raises(ValueError, match="differ"):
        WeightedBCE()(torch.zeros(2, 3), torch.zeros(3, 2))


# -- samplers ------------------------------------------------------------------------------------------------
def test_shuffle_sampler_matches_distributed_sampler_order_and_shards() -> None:
    from torch.utils.data.distributed import DistributedSampler

    n = 11
    for rank in (0, 1):
        ours = EpochShuffleSampler(n, seed=5, rank=rank, world_size=2)
        ref: DistributedSampler = DistributedSampler(list(range(n)), num_replicas=2, rank=rank, shuffle=True, seed=5)  # type: ignore[arg-type]
        ours.set_epoch(3)
        ref.set_epoch(3)
        assert [i for i, _ in ours] == list(ref)
        assert {e for _, e in ours} == {3}
    union = [i for r in (0, 1) for i, _ in EpochShuffleSampler(n, seed=5, rank=r, world_size=2)]
    assert set(union) == set(range(n)) and len(union) == 12  # padded by one, as DistributedSampler


def test_class_aware_sampler_balances_classes_and_is_seeded() -> None:
    y = np.zeros((1000, 2), dtype=np.float32)
    y[:10, 0] = 1  # rare label
    y[10:510, 1] = 1  # frequent label; 490 images with no positive
    y[990:, 0] = NAN  # unknown never counts as positive
    s = ClassAwareSampler(y, seed=1)
    drawn = np.array([i for i, _ in s])
    share_rare = np.isin(drawn, np.arange(10)).mean()
    assert 0.25 < share_rare < 0.42  # about 1/3 (3 pools), against 1 % without class-aware sampling
    assert s.pools[0].tolist() == list(range(10))  # the unknown rows 990.. are not in the rare label's pool
    again = [i for i, _ in ClassAwareSampler(y, seed=1)]
    assert again == drawn.tolist()
    s.set_epoch(1)
    assert [i for i, _ in s] != drawn.tolist()


def test_make_sampler_errors() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("oversample", np.zeros((3, 1)), 0)
    with pytest.raises(ValueError, match="rank"):
        EpochShuffleSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one image"):
        ClassAwareSampler(np.zeros((0, 2)))


def test_cli_choices_match_the_implementations() -> None:
    from training.losses import LOSSES
    from training.recipes import CHOICES
    from training.sampling import SAMPLERS

    assert CHOICES["loss"] == LOSSES and CHOICES["sampler"] == SAMPLERS
